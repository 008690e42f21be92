"""The training loop: sample a batch, forward, hand-written backward, update.

The manual path runs with autograd off; the update reads exactly the gradient
buffers that the gradient check verifies (the optimizer's own list).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .data import SPLITS, make_dataset
from .errors import HandgradError
from .gradcheck import check_model, format_table, passed
from .model import DEFAULTS, ModelConfig, build_model
from .optim import SGD, step_schedule
from .sample import generate

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainConfig:
    data: str | None = None  # None: the built-in names
    out: str = "out"
    model: str = "mlp"
    split: str = "words"
    block_size: int | None = None  # None: the model's default
    n_embd: int | None = None
    n_hidden: int | None = None
    n_layers: int | None = None
    steps: int = 10_000
    batch_size: int = 32
    lr: float = 1.0
    seed: int = 42
    eval_every: int = 1000
    log_every: int = 100
    grad: str = "manual"  # or "autograd", to compare
    check: bool = True  # gradient check on one batch before the first step
    check_every: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    num_samples: int = 20
    extra: dict = field(default_factory=dict)

    def model_config(self, vocab_size: int) -> ModelConfig:
        d = dict(DEFAULTS[self.model])
        for k in ("block_size", "n_embd", "n_hidden", "n_layers"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return ModelConfig(model=self.model, vocab_size=vocab_size, **d)


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise HandgradError(f"unknown device {name!r}: use cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HandgradError("device cuda requested but no CUDA GPU is available")
    return torch.device(name)


@torch.no_grad()
def evaluate(model, X: torch.Tensor, Y: torch.Tensor, chunk: int = 65536) -> float:
    """Mean loss over a whole split, in eval mode (BatchNorm's running statistics)."""
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for i in range(0, len(Y), chunk):
            total += float(model.forward(X[i:i + chunk], Y[i:i + chunk])) * len(Y[i:i + chunk])
        return total / max(len(Y), 1)
    finally:
        model.train(was_training)
        model.clear_saved()


def autograd_step(model, x, y) -> torch.Tensor:
    """Reference gradients: autograd accumulates into the same buffers the optimizer reads."""
    params, grads = model.parameters(), model.grads()
    for p, g in zip(params, grads):
        p.requires_grad_(True)
        g.zero_()
        p.grad = g
    try:
        with torch.enable_grad():
            loss = model.forward(x, y)
            loss.backward()
        for p, g in zip(params, grads):
            if p.grad is not g:  # autograd replaced the buffer: copy into the one the optimizer holds
                g.copy_(p.grad)
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    return loss.detach()


def manual_step(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        model.zero_grad()
        loss = model.forward(x, y)
        model.backward()
    return loss


class Progress:
    """A progress bar on a terminal; plain lines otherwise."""

    def __init__(self, total: int, initial: int = 0):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_losses(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
    va = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    if tr:
        ax.plot(*zip(*tr), label="train (batch)", alpha=0.6, linewidth=0.8)
    if va:
        ax.plot(*zip(*va), label="val (whole split)", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def train(cfg: TrainConfig) -> dict:
    """Train, evaluate, sample and save; returns run.json's content."""
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    out_dir = Path(cfg.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise HandgradError(f"output path exists and is not a folder: {out_dir}")
    ds = make_dataset(cfg.data, block_size=cfg.model_config(0).block_size, split=cfg.split, seed=cfg.seed)
    sizes = ds.sizes()
    print(f"data: {ds.source}: {len(ds.words)} distinct items, vocabulary {len(ds.vocab)}, "
          f"context {ds.block_size}; examples train {sizes['train']:,} / val {sizes['val']:,} / test {sizes['test']:,}")
    if sizes["train"] == 0:
        raise HandgradError("the training split is empty")
    mcfg = cfg.model_config(len(ds.vocab))
    model = build_model(mcfg, seed=cfg.seed, device=device, dtype=dtype)
    optimizer = SGD(model.parameters(), model.grads(), lr=cfg.lr)
    print(f"model: {mcfg.model}, {model.num_params():,} parameters; gradients: {cfg.grad}; device {device}, {cfg.dtype}")
    X = {s: ds.X[s].to(device) for s in SPLITS}
    Y = {s: ds.Y[s].to(device) for s in SPLITS}

    if cfg.check:
        gen = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randint(0, sizes["train"], (min(cfg.batch_size, sizes["train"]),), generator=gen).to(device)
        results = check_model(model, X["train"][idx], Y["train"][idx], grads=optimizer.grads)
        worst = max(r.max_abs_diff for r in results)
        if not passed(results):
            print(format_table(results), file=sys.stderr)
            raise HandgradError("gradient check failed before training: the manual backward disagrees with autograd")
        print(f"gradient check: {len(results)} tensors match autograd (max abs diff {worst:.1e}); the optimizer reads these buffers")

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    metrics: list[dict] = []
    step_fn = manual_step if cfg.grad == "manual" else autograd_step
    ntrain = sizes["train"]
    progress = Progress(cfg.steps)
    torch.manual_seed(cfg.seed)  # the batch order, as the seed notebook: reseed, then randint per step
    t0 = time.perf_counter()
    with open(metrics_path, "w", encoding="utf-8") as mf:
        for step in range(cfg.steps):
            lr = step_schedule(step, cfg.steps, cfg.lr)
            idx = torch.randint(0, ntrain, (cfg.batch_size,)).to(device)
            x, y = X["train"][idx], Y["train"][idx]
            if cfg.check_every and step % cfg.check_every == 0:
                results = check_model(model, x, y, grads=optimizer.grads)
                if not passed(results):
                    bad = [r.name for r in results if not r.close]
                    raise HandgradError(f"step {step}: manual gradients disagree with autograd for {', '.join(bad)}")
            loss = step_fn(model, x, y)
            last = step == cfg.steps - 1
            log = step % cfg.log_every == 0 or last
            evaluate_now = cfg.eval_every and (step % cfg.eval_every == 0 or last)
            if log or evaluate_now:
                loss_value = float(loss)
                if not math.isfinite(loss_value):
                    raise HandgradError(f"step {step}: the loss became {loss_value}; lower the learning rate (--lr)")
                rec = {"step": step, "lr": lr, "train_loss": loss_value}
                if evaluate_now:
                    rec["val_loss"] = evaluate(model, X["val"], Y["val"])
                rec["elapsed"] = time.perf_counter() - t0
                mf.write(json.dumps(rec) + "\n")
                metrics.append(rec)
                if evaluate_now:
                    rate = (step + 1) / max(rec["elapsed"], 1e-9)
                    progress.write(f"step {step:>7} | lr {lr:.4g} | train {loss_value:.4f} | val {rec['val_loss']:.4f} | {rate:,.0f} steps/s")
            optimizer.step(lr)
            progress.update(1, float(loss) if progress.bar is not None and step % 50 == 0 else 0.0)
    progress.close()
    elapsed = time.perf_counter() - t0

    final = {s: evaluate(model, X[s], Y[s]) for s in SPLITS}
    print(f"final loss (eval mode): train {final['train']:.4f} | val {final['val']:.4f} | test {final['test']:.4f} "
          f"({cfg.steps:,} steps in {elapsed:.1f}s, {cfg.steps / max(elapsed, 1e-9):,.0f} steps/s)")
    samples = generate(model, ds.vocab, cfg.num_samples, seed=cfg.seed, device=device)
    print("samples:")
    for s in samples:
        print(f"  {s}")
    checkpoint.save_model(out_dir, model, ds.vocab)
    checkpoint.atomic_write_bytes(out_dir / "samples.txt", ("\n".join(samples) + "\n").encode("utf-8"))
    run = {
        "config": asdict(cfg),
        "model_config": mcfg.to_dict(),
        "num_params": model.num_params(),
        "data": {"source": ds.source, "items": len(ds.words), "sizes": sizes},
        "vocab": ds.vocab.chars,
        "final": final,
        "steps_per_s": cfg.steps / max(elapsed, 1e-9),
        "elapsed": elapsed,
        "torch": torch.__version__,
    }
    checkpoint.atomic_write_json(out_dir / "run.json", run)
    plot_losses(metrics, out_dir / "loss.png")
    print(f"saved to {out_dir}/: model.safetensors, model.json, run.json, metrics.jsonl, loss.png, samples.txt")
    return run
