"""The training loop: sample a batch, forward, hand-written backward, update.

The manual path runs with autograd off; the update reads exactly the gradient
buffers that the gradient check verifies (the optimizer's own list).
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from . import checkpoint, diagnostics, fastpath, parallel
from .data import (BUILTIN_NAME, IGNORE, SPLITS, Dataset, check_batch, make_model_data, pack_batch, trim_batch,
                   usual_packed_rows)
from .divergence import DivergenceWatch
from .errors import HandgradError
from .fastpath import manual_step  # the eager manual step: zero_grad, forward, backward
from .gradcheck import check_model, format_table, passed
from .model import DEFAULTS, SEQUENCE_MODELS, TRAINING, Model, ModelConfig, build_model
from .optim import COSINE_FINAL_FRACTION, WeightAverage, evaluated, learning_rate, make_optimizer
from .sample import generate

DTYPES = {"float32": torch.float32, "float64": torch.float64}


MODEL_SETTINGS = ("block_size", "n_embd", "n_hidden", "n_layers", "n_heads", "dropout", "attn_dropout", "tie_weights")
ONLY_FOR = {  # model settings that only some families have: (those families, what the others lack)
    "n_heads": (("transformer",), "attention"),
    "attn_dropout": (("transformer",), "attention"),
    "tie_weights": (("transformer",), "output layer to tie to a token table"),
    "dropout": (("transformer", "rnn", "gru", "lstm"), "dropout layers"),
    "trim": (tuple(sorted(SEQUENCE_MODELS)), "batches of whole items to trim"),
    "pack": (("transformer",), "attention to keep items that share a row apart"),
}
OWN_RECIPE = "mlp"  # a model of one's own trains with the seed's recipe where nothing says otherwise


@dataclass
class TrainConfig:
    """Every setting of a training run, as `handgrad train`'s flags set them. None: the model's default
    (model.DEFAULTS, model.TRAINING); `resolved` fills those in, and run.json records the values used."""

    data: str | None = None  # None: the built-in names
    out: str = "out"
    model: str = "mlp"
    split: str = "words"
    block_size: int | None = None  # None: the model's default
    n_embd: int | None = None
    n_hidden: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None  # the transformer's attention heads
    dropout: float | None = None  # the transformer's and recurrent models' dropout probability
    attn_dropout: float | None = None  # the transformer's dropout of attention weights
    tie_weights: bool | None = None  # the transformer's output layer tied to the token table
    steps: int | None = None  # None here and below: the model's default (model.TRAINING)
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None  # sgd, momentum or adamw
    schedule: str | None = None  # step (the seed's) or cosine (with warm-up)
    warmup: int | None = None
    lr_floor: float | None = None  # where the cosine schedule ends, as a fraction of lr; None: the model's (0.01)
    weight_decay: float | None = None
    momentum: float | None = None  # of the momentum optimizer; None: 0.9
    trim: int | None = None  # sequence models: each batch cut to its longest item, in multiples of this (0: not cut)
    pack: bool | None = None  # the transformer: each batch's items packed several to a row (data.pack_batch)
    ema: float | None = None  # decay of the weights' moving average that evaluation uses (optim.WeightAverage); 0: none
    diagnostics: bool = False  # tanh saturation and gradient-to-data ratios at each evaluation
    seed: int = 42
    eval_every: int = 1000
    log_every: int = 100
    save_every: int = 1000  # steps between checkpoints (0: only at the start, the end and on Ctrl-C)
    stop_at: int = 0  # save and stop after this many steps, the schedule still spanning `steps` (0: run to the end)
    grad: str = "manual"  # or "autograd", to compare
    impl: str = "auto"  # manual step: eager, replay, compiled, cudagraph (fastpath), or auto (fastpath.choose_impl)
    check: bool = True  # gradient check on one batch before the first step
    check_every: int = 0
    device: str = "cpu"
    reduce: str = "once"  # a run of several processes: sum the gradients once after the backward, or in buckets
    threads: int | None = None  # CPU threads; None: see `cpu_threads`
    dtype: str = "float32"
    num_samples: int = 20

    def resolved(self, refuse_idle: bool = True) -> "TrainConfig":
        """A copy with every setting left as None filled in from the model's defaults; with `refuse_idle`,
        the settings given that would do nothing are refused first (`refuse_idle_settings`)."""
        if refuse_idle:
            refuse_idle_settings(self)
        d = asdict(self)
        recipe = TRAINING.get(self.model, TRAINING[OWN_RECIPE])
        if d["schedule"] == "step" and d["warmup"] is None:
            d["warmup"] = 0  # the step schedule has no warm-up, whatever the model's cosine one would be
        for k, v in recipe.items():
            if d[k] is None:
                d[k] = v
        if d["pack"] is None:
            d["pack"] = False  # the families whose recipe does not pack
        if d["ema"] is None:
            d["ema"] = 0.0  # the families whose recipe evaluates the last weights
        if d["lr_floor"] is None:
            d["lr_floor"] = COSINE_FINAL_FRACTION
        if d["trim"] is None or (d["pack"] and self.trim is None):
            d["trim"] = 0  # the families whose recipe does not trim; a packed batch has no padding to cut
        if d["optimizer"] == "momentum" and d["momentum"] is None:
            d["momentum"] = 0.9
        for k, v in DEFAULTS.get(self.model, {}).items():
            if d[k] is None:
                d[k] = v
        return TrainConfig(**d)

    def model_config(self, vocab_size: int, block_size: int | None = None) -> ModelConfig:
        """The model this config builds over a vocabulary of `vocab_size`; `block_size`, where given,
        is the data's context (a sequence model's positions come from the data)."""
        d = dict(DEFAULTS[self.model])
        for k in MODEL_SETTINGS:
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if block_size is not None:
            d["block_size"] = block_size
        return ModelConfig(model=self.model, vocab_size=vocab_size, sequences=self.model in SEQUENCE_MODELS, **d)

    def dataset(self) -> Dataset:
        """The data this config trains on (`data.make_model_data`): for a sequence model, whole items over
        `block_size` positions (None: the longest item's); else examples of `block_size` ids."""
        return make_model_data(self.model in SEQUENCE_MODELS, self.data, self.block_size, self.split, self.seed)


def refuse_idle_settings(cfg: TrainConfig) -> None:
    """A setting given that would change nothing is an error, not a silent no-op."""
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise HandgradError(f"--lr {cfg.lr:g}: the learning rate must be a positive number (0 would not train)")
    for name in ("steps", "batch_size"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise HandgradError(f"{flag_name(name)} must be at least 1, got {value}")
    recipe = TRAINING.get(cfg.model, TRAINING[OWN_RECIPE])
    schedule = cfg.schedule or recipe["schedule"]
    steps = cfg.steps or recipe["steps"]
    if cfg.lr_floor is not None and schedule != "cosine":
        raise HandgradError(f"--lr-floor {cfg.lr_floor:g}: the {schedule} schedule has no floor; it belongs to --schedule cosine")
    if cfg.lr_floor is not None and not 0 <= cfg.lr_floor < 1:
        raise HandgradError(f"--lr-floor {cfg.lr_floor:g}: the cosine schedule ends at this fraction of --lr, in [0, 1)")
    if cfg.ema and not 0 < cfg.ema < 1:
        raise HandgradError(f"--ema {cfg.ema:g}: the moving average's decay must be in (0, 1) (0: none)")
    if cfg.warmup and schedule != "cosine":
        raise HandgradError(f"--warmup {cfg.warmup}: the {schedule} schedule has no warm-up; it belongs to --schedule cosine")
    if cfg.warmup is not None and cfg.warmup and cfg.warmup >= steps:
        raise HandgradError(f"--warmup {cfg.warmup} is not shorter than the run's {steps:,} steps: the learning rate "
                            f"would never reach its peak")
    optimizer = cfg.optimizer or recipe["optimizer"]
    if cfg.momentum is not None and optimizer != "momentum":
        raise HandgradError(f"--momentum belongs to --optimizer momentum; the {optimizer} optimizer would ignore it")
    if cfg.stop_at and cfg.stop_at > steps:
        raise HandgradError(f"--stop-at {cfg.stop_at:,} is beyond the run's {steps:,} steps (--steps): the run would "
                            f"end before it")
    for setting, (families, what) in ONLY_FOR.items():
        value = getattr(cfg, setting)
        if value is not None and cfg.model not in families:
            given = ({True: flag_name(setting), False: flag_name(setting).replace("--", "--no-", 1)}.get(value)
                     if isinstance(value, bool) else f"{flag_name(setting)} {value}")  # a switch: its flag
            raise HandgradError(f"{given}: the {cfg.model} has no {what}; it belongs to --model {' or '.join(families)}")
    if cfg.trim and (cfg.pack if cfg.pack is not None else recipe.get("pack", False)):
        raise HandgradError(f"--trim {cfg.trim} with --pack: a packed batch has no padding to cut; pass --no-pack to trim")
    if cfg.model == "mlp" and cfg.n_layers not in (None, 1):
        raise HandgradError(f"--n-layers {cfg.n_layers}: the mlp has one hidden layer; --model deep-mlp stacks several")


def idle_setting_warnings(cfg: TrainConfig, given: TrainConfig) -> list[str]:
    """Defaults that do not fit the run as given: said in one line each, the run going ahead."""
    warnings = []
    if cfg.schedule == "cosine" and given.warmup is None and cfg.warmup >= cfg.steps:
        warnings.append(f"warning: the default warm-up of {cfg.warmup:,} steps is not shorter than the run's "
                        f"{cfg.steps:,}, so the learning rate never reaches its peak; pass --warmup N below {cfg.steps:,}")
    return warnings


SMALL_BATCH = 256  # up to this many rows a step is many tiny ops, which extra threads only slow down
TORCH_THREADS = torch.get_num_threads()  # torch's default (the cores, or OMP_NUM_THREADS), before any run sets it


def require_threads(threads: int) -> int:
    if threads < 1:
        raise HandgradError(f"--threads must be at least 1, got {threads}")
    return threads


def cpu_threads(threads: int | None, rows: int) -> int:
    """Threads for the CPU ops: as asked, else one for steps of few rows and torch's default (every core) for
    more. The rows are those a step's ops read at once (`step_rows`)."""
    if threads is not None:
        return require_threads(threads)
    return 1 if rows <= SMALL_BATCH else TORCH_THREADS


def step_rows(model: str, batch_size: int, positions: int) -> int:
    """The rows each op of a step reads: the batch's examples or items, and for the transformer, whose every
    layer reads all positions at once, the items times their positions (64 names of 16 positions: 1,024;
    with two threads its step takes about 0.7x the time of one, docs/models.md). A recurrent layer steps
    through the positions, each op reading the batch's rows only."""
    return batch_size * (positions if model == "transformer" else 1)


def require_batch_statistics(model, batch_size: int) -> None:
    """BatchNorm in training mode divides by the batch's standard deviation: one example has none."""
    if batch_size < 2 and any(name.endswith("running_var") for name, _ in model.named_buffers()):
        raise HandgradError(f"--batch-size {batch_size} with BatchNorm: the variance of a batch of one example "
                            "is undefined; use --batch-size 2 or more")


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise HandgradError(f"unknown device {name!r}: use cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HandgradError("device cuda requested but no CUDA GPU is available")
    return torch.device(name)


@torch.no_grad()
def evaluate(model, X: torch.Tensor, Y: torch.Tensor, chunk: int = 2048, group: parallel.Group | None = None) -> float:
    """Mean loss over a whole split, in eval mode (BatchNorm's running statistics). With the `group`
    of a data-parallel run, each rank scores its share of the rows and the sums are summed over the ranks.

    Chunks of 2048 rows, through the fused view of the model (its first layer gathers from
    precomputed tables at this size): a 21,141-row split took 53.6 ms as one chunk, 16.4 ms in
    2048-row chunks and 14.3 ms through the fused view, on one CPU core.
    """
    was_training = model.training
    model.eval()
    net = fastpath.fused(model)
    if group is not None:
        rows = group.rows(len(Y))
        X, Y = X[rows], Y[rows]
    try:
        total, counted = 0.0, 0
        for i in range(0, len(Y), chunk):
            n = int((Y[i:i + chunk] != IGNORE).sum())  # the targets the loss counts (sequence data pads)
            if n:
                total += float(net.forward(X[i:i + chunk], Y[i:i + chunk])) * n
            counted += n
        if group is not None:
            sums = torch.tensor([total, counted], dtype=torch.float64, device=group.device)
            group.all_reduce_(sums)
            total, counted = float(sums[0]), int(sums[1])
        return total / max(counted, 1)
    finally:
        model.train(was_training)
        net.clear_saved()
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


@contextlib.contextmanager
def gc_frozen():
    """Leave what exists now (torch's modules, the model, the data) out of the garbage collector's
    full passes, which otherwise rescan those hundreds of thousands of objects every few thousand
    small-batch steps: about 5% of a seed run's time. Undone on the way out, unless the caller had
    frozen objects already."""
    ours = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        yield
    finally:
        if ours:
            gc.unfreeze()


@contextlib.contextmanager
def repeatable_sums():
    """On several threads, torch's accumulating scatter (the token table's gradient) adds in whatever order
    its threads land, eager and compiled alike: two runs, or a run and its resumed continuation, would part
    in the last bits. Torch's deterministic algorithms (a fixed order; a warning, not an error, for an op
    that has none) keep them equal bit for bit; one thread needs nothing. Undone on the way out."""
    if torch.get_num_threads() == 1 or torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


class Progress:
    """A progress bar on a terminal; plain lines otherwise."""

    def __init__(self, total: int, initial: int = 0):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None:
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
    checkpoint.atomic_write_figure(path, fig)
    plt.close(fig)


def train(cfg: TrainConfig, resume: checkpoint.Checkpoint | None = None) -> dict:
    """`handgrad train`: build the data and the model that `cfg` describes, then hand them to `fit`;
    returns run.json's content.

    With `resume` (from `resume_config`), continue that checkpoint's run: weights,
    optimizer state, generators, metrics, so the result is bit-identical to an
    uninterrupted run.
    """
    if cfg.model not in TRAINING:
        raise HandgradError(f"unknown model {cfg.model!r}: choose one of {', '.join(TRAINING)}")
    given, cfg = cfg, cfg.resolved(refuse_idle=resume is None)  # `fit` resolves `given` again, and says what it fills in
    device = parallel.local_device(resolve_device(cfg.device))  # several processes on GPUs: one each
    torch.set_num_threads(cpu_threads(cfg.threads, cfg.batch_size))  # until `fit` knows the data's positions
    step_path(cfg, device, resume)  # a bad --impl refused before anything is loaded or written
    prepare_run_folder(Path(cfg.out), fresh=resume is None)
    ds = cfg.dataset()
    model = build_model(cfg.model_config(len(ds.vocab), ds.block_size), seed=cfg.seed, device=device,
                        dtype=DTYPES[cfg.dtype])
    return fit(model, ds, given, resume=resume)


def step_path(cfg: TrainConfig, device: torch.device, resume: checkpoint.Checkpoint | None) -> tuple[str, str]:
    """The path the manual step takes (fastpath.choose_impl), and why. A resumed run left to `--impl auto`
    takes the saved run's path, whatever the steps left would choose: another path does other arithmetic
    (BatchNorm's sums, the fused table layer), and the resumed run would not end bit for bit where the
    uninterrupted one does."""
    saved = resume.meta.get("step_impl") if resume is not None else None
    if cfg.impl == "auto" and saved in fastpath.IMPLS and saved != "auto" and (saved != "cudagraph" or device.type == "cuda"):
        fastpath.choose_impl(saved, cfg.grad, cfg.steps, cfg.batch_size, cfg.diagnostics, device.type,
                             torch.get_num_threads(), cfg.model)  # still possible here
        return saved, "auto: the saved run's path, so that the resumed run continues it bit for bit"
    start = resume.step if resume is not None else 0
    return fastpath.choose_impl(cfg.impl, cfg.grad, cfg.steps - start, cfg.batch_size, cfg.diagnostics, device.type,
                                torch.get_num_threads(), cfg.model)


def refuse_for_processes(cfg: TrainConfig, model, world: int, impl: str, why: str, sequences: bool) -> tuple[str, str]:
    """What a run of several processes cannot do, refused in one line; else its step path: the eager
    step, or the compiled one where one process would take it (`impl`, `why`) on data whose every
    target counts. A replayed step would leave out the sums that the ranks exchange."""
    if cfg.grad != "manual":
        raise HandgradError(f"--grad {cfg.grad} runs in one process; a run of {world} processes sums the hand-written "
                            "gradients (--grad manual)")
    if cfg.impl not in ("auto", "eager", "compiled"):
        raise HandgradError(f"--impl {cfg.impl} runs in one process; a run of {world} processes takes the eager or "
                            "the compiled step (--impl eager, compiled or auto)")
    if cfg.impl == "compiled" and sequences:
        raise HandgradError(f"--impl compiled: a run of {world} processes compiles only models of fixed contexts "
                            "(each rank's share of a sequence batch's counted targets changes every step)")
    if cfg.diagnostics:
        raise HandgradError("--diagnostics measures one process's activations; it runs without torchrun")
    if cfg.reduce not in parallel.REDUCE_MODES:
        raise HandgradError(f"--reduce {cfg.reduce}: choose one of {', '.join(parallel.REDUCE_MODES)}")
    if cfg.batch_size < world:
        raise HandgradError(f"--batch-size {cfg.batch_size} is smaller than the {world} processes: each needs rows")
    for name, layer in model.net.named_modules():
        if "running_var" in layer.buffers and not getattr(layer, "syncs_across_ranks", False):
            raise HandgradError(f"layer {name or 'net'} ({type(layer).__name__}) keeps batch statistics of its own "
                                f"process's rows; a run of {world} processes needs BatchNorm1d, which shares them")
    if impl == "compiled" and not sequences:
        return "compiled", why
    return "eager", f"a run of {world} processes takes the eager step (the replayed one would miss the ranks' sums)"


def resume_changes(cfg: TrainConfig, resume: checkpoint.Checkpoint, impl: str, world: int = 1) -> list[str]:
    """One line for each change that makes a resumed run other arithmetic than the run it continues."""
    saved = resume.meta.get("config") or {}
    said = []
    saved_world = resume.meta.get("world_size") or 1
    if saved_world != world:  # the same run, its sums in another order: equal up to rounding
        said.append(f"{world} process{'es' if world > 1 else ''} where the saved run had {saved_world}")
    steps_saved = resume.meta.get("step_impl")
    if steps_saved not in (None, impl):
        said.append(f"the saved run's steps ran {steps_saved}, these run {impl}")
    for key in ("device", "threads"):
        if saved.get(key) is not None and saved[key] != getattr(cfg, key):
            said.append(f"{flag_name(key)} {getattr(cfg, key)} where the saved run had {saved[key]}")
    if not said:
        return []
    return [f"warning: {'; '.join(said)}: the resumed run will not be bit-identical to an uninterrupted one"]


def prepare_run_folder(out_dir: Path, fresh: bool) -> None:
    """Refuse a run folder that cannot take this run, before anything is printed or written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise HandgradError(f"output path exists and is not a folder: {out_dir}")
    if fresh:
        checkpoint.refuse_existing_run(out_dir)


def fit(model, data, config: TrainConfig | None = None, *, resume: bool | checkpoint.Checkpoint = False,
        **settings) -> dict:
    """Train `model` (a `Model`: layers and loss, any layers that keep the layer contract) on `data`
    (a `Dataset` from `make_dataset`): the gradient check, the training loop with checkpoints, the
    divergence watch and Ctrl-C, then the final losses, samples, run.json and loss.png in the run
    folder, exactly as `handgrad train` does (it builds its model and data, then calls this).

    Settings come from `config` (a `TrainConfig`), then from keyword arguments (`out="runs/mine"`,
    `steps=2000`, ...); those left unset take the model family's recipe (model.TRAINING; the seed's
    for a model of one's own). The model's own device, dtype and context length are the run's.
    `resume=True` continues the run saved in the run folder (the same model and data, rebuilt);
    returns run.json's content.

    Started as several processes (`torchrun --nproc-per-node N`, or with torch.distributed already
    initialised by the caller), each process trains on its share of every batch and the run follows
    the one-process run (`parallel`); rank 0 alone prints and writes the run folder.
    """
    with parallel.quiet_unless_rank_0():  # the other ranks of a data-parallel run print nothing
        return run_fit(model, data, config, resume, settings)


def run_fit(model, data, config: TrainConfig | None, resume: bool | checkpoint.Checkpoint, settings: dict) -> dict:
    if not isinstance(model, Model):
        raise HandgradError(f"fit trains a handgrad Model (layers and a loss), got {type(model).__name__}; "
                            "wrap a Sequential as Model(config, net)")
    if not isinstance(data, Dataset):
        raise HandgradError(f"fit needs a Dataset from handgrad.make_dataset, got {type(data).__name__}")
    given = replace(config or TrainConfig(), **settings)
    params = model.parameters()
    if not params:
        raise HandgradError("the model has no parameters to train")
    device, dtype = params[0].device, params[0].dtype
    if dtype not in DTYPES.values():
        raise HandgradError(f"the model's parameters are {dtype}; handgrad trains float32 or float64")
    mc = model.config
    if mc.sequences != data.sequences:
        kinds = {True: "whole items (make_sequence_dataset)", False: "examples of a context (make_dataset)"}
        raise HandgradError(f"the model reads {kinds[mc.sequences]}; the data holds {kinds[data.sequences]}")
    if mc.block_size != data.block_size or mc.vocab_size != len(data.vocab):
        raise HandgradError(f"the model takes contexts of {mc.block_size} over a vocabulary of {mc.vocab_size}; the data "
                            f"has {data.block_size} and {len(data.vocab)} (len(data.vocab) counts the boundary token)")
    # the run is the model's and the data's: its config records them, whatever `config` said
    used = [k for k in MODEL_SETTINGS if k not in ONLY_FOR or mc.model in ONLY_FOR[k][0]]
    given = replace(given, model=mc.model, **{k: getattr(mc, k) for k in used},
                    data=None if data.source == BUILTIN_NAME else data.source, split=data.split_mode,
                    device=str(device), dtype=next(k for k, v in DTYPES.items() if v == dtype))
    if resume is True:
        overrides = {k: v for k, v in asdict(given).items() if v != getattr(TrainConfig, k, None)}
        given, resume = resume_config(given.out, overrides)
    resume = resume or None
    cfg = given.resolved(refuse_idle=resume is None)  # a resumed run's settings were checked when it started
    if cfg.ema and any(name.endswith("running_var") for name, _ in model.named_buffers()):  # before any folder is touched
        raise HandgradError(f"--ema {cfg.ema:g}: the {mc.model}'s BatchNorm statistics are its trained weights', not "
                            "their average's; --ema belongs to models without BatchNorm (transformer, rnn, gru, lstm)")
    for line in idle_setting_warnings(cfg, given):
        print(line, file=sys.stderr)
    torch.set_num_threads(cpu_threads(cfg.threads, step_rows(cfg.model, cfg.batch_size, data.block_size)))
    cfg = replace(cfg, threads=torch.get_num_threads())  # recorded as used
    start = resume.step if resume is not None else 0
    impl, why = step_path(cfg, device, resume)
    world = parallel.world_size()
    if world > 1:
        impl, why = refuse_for_processes(cfg, model, world, impl, why, data.sequences)
    if resume is not None:
        for line in resume_changes(cfg, resume, impl, world):
            print(line, file=sys.stderr)
    out_dir = Path(cfg.out)
    prepare_run_folder(out_dir, fresh=resume is None)
    group = parallel.join(device) if world > 1 else None  # every check above is every rank's alike
    writes = group is None or group.writes
    ds = data
    sizes = ds.sizes()
    rows = "items (whole, padded)" if ds.sequences else "examples"
    print(f"data: {ds.source}: {len(ds.words)} distinct items, vocabulary {len(ds.vocab)}, "
          f"context {ds.block_size}; {rows} train {sizes['train']:,} / val {sizes['val']:,} / test {sizes['test']:,}")
    if sizes["train"] == 0:
        raise HandgradError("the training split is empty")
    optimizer = make_optimizer(cfg.optimizer, model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    average = WeightAverage(optimizer.params, cfg.ema) if cfg.ema else None
    print(f"optimizer: {cfg.optimizer}, lr {cfg.lr:g}, {cfg.schedule} schedule"
          + (f", warm-up {cfg.warmup}" if cfg.schedule == "cosine" else "")
          + (f" down to {cfg.lr_floor:g} x lr" if cfg.schedule == "cosine" and cfg.lr_floor != COSINE_FINAL_FRACTION else "")
          + (f", weight decay {cfg.weight_decay:g}" if cfg.weight_decay else "")
          + f"; {cfg.steps:,} steps of batch {cfg.batch_size}"
          + (f"; evaluated with the weights' moving average (decay {cfg.ema:g})" if average else ""))
    print(f"model: {mc.model}, {model.num_params():,} parameters; gradients: {cfg.grad}; device {device}, {cfg.dtype}")
    if group is not None:
        print(f"processes: {group.world} ({group.backend}), each on its share of every batch of {cfg.batch_size}; "
              f"gradients summed {'once after the backward' if cfg.reduce == 'once' else 'in buckets during the backward'}")
    require_batch_statistics(model, cfg.batch_size)
    data_meta = {"source": ds.source, "split": ds.split_mode, "seed": ds.seed, "items": len(ds.words),
                 "sha256": checkpoint.data_fingerprint(ds.words)}
    max_item_len = max(map(len, ds.words))  # `sample`'s default --max-len
    if resume is not None:
        checkpoint.check_resumable(resume, mc.to_dict(), data_meta)
        resume.restore(model, optimizer, average)
        print(f"resuming {resume.path} at step {resume.step:,} of {cfg.steps:,}")
    X = {s: ds.X[s].to(device) for s in SPLITS}
    Y = {s: ds.Y[s].to(device) for s in SPLITS}

    def batch_of(x, y):
        """The batch a step runs on, from the items drawn: packed several to a row, or trimmed, as the run says."""
        return pack_batch(x, y) if cfg.pack else trim_batch(x, y, cfg.trim)

    if cfg.check:
        x, y = (t.to(device) for t in batch_of(*check_batch(ds, cfg.batch_size, cfg.seed)))

        def check_before_training(net, failure: str) -> str:
            """Check `net` on the batch into the optimizer's buffers; stop on a mismatch, else the summary."""
            results = check_model(net, x, y, grads=optimizer.grads)
            if not passed(results):
                print(format_table(results), file=sys.stderr)
                raise HandgradError(f"gradient check failed before training: {failure}")
            return f"{len(results)} tensors match autograd (max abs diff {max(r.max_abs_diff for r in results):.1e})"

        summary = check_before_training(model, "the manual backward disagrees with autograd")
        print(f"gradient check: {summary}; the optimizer reads these buffers")
        if impl == "compiled":  # the compiled step runs the fused view's layers: check those too, at this batch size
            view = fastpath.fused(model)
            summary = check_before_training(view, "the compiled step's fused layers disagree with autograd "
                                                  "(--impl eager avoids them)")
            print(f"gradient check of the compiled step's layers ({', '.join(view.net.layers)}): {summary}")

    metrics_path = out_dir / checkpoint.METRICS
    metrics = []
    if writes:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temporaries(out_dir)
        metrics = checkpoint.continue_metrics(metrics_path, start)
    step_fn = manual_step if cfg.grad == "manual" else autograd_step
    if impl in fastpath.FAST_IMPLS and group is None:
        rows = usual_packed_rows(ds.Y["train"], cfg.batch_size) if cfg.pack and impl == "compiled" else None
        if rows is not None:
            why += f"; packed batches padded to {rows} rows and compiled, the rare larger ones stepped eagerly"
        step_fn = fastpath.compiled_train_step(model, impl, report=lambda line: print(line, file=sys.stderr), rows=rows)
    print(f"step: {cfg.grad} gradients, {impl} ({why})")
    ntrain = sizes["train"]
    last_saved = start if resume is not None else None

    def left_on_disk() -> str:
        if last_saved is None:
            return "; no checkpoint had been saved"
        return (f"; the checkpoint of step {last_saved:,} is left as it was, to continue with: "
                f"handgrad train -o {out_dir} --resume --lr LOWER")

    names = [name for name, _ in model.named_parameters()]  # optimizer.grads follow the parameters' order
    state = [(f"the weight {n}", p) for n, p in zip(names, optimizer.params)]
    state += [(f"the running statistic {n}", b) for n, b in model.named_buffers() if b.is_floating_point()]
    start_loss = next((r["train_loss"] for r in metrics if r.get("step") == 0 and "train_loss" in r), None)
    if group is not None:  # rank 0's, which read the metrics: every rank's watch the same
        start_loss = parallel.from_rank_0(group, start_loss)
    watch = DivergenceWatch(list(zip(names, optimizer.grads)), cfg.lr, left_on_disk, model.grad_buffer, state=state,
                            vocab_size=len(ds.vocab), start_loss=start_loss)

    def save(step: int) -> None:
        """Only a run checked finite is saved; metrics reach the disk before the checkpoint that counts them."""
        with torch.inference_mode(False):  # what is saved (state copies, counters) made as ordinary tensors
            write_checkpoint(step)

    def write_checkpoint(step: int) -> None:
        nonlocal last_saved
        watch.check()
        watch.check_state(step)
        if writes:
            mf.flush()
            os.fsync(mf.fileno())
            checkpoint.save_checkpoint(out_dir, step=step, model=model, optimizer=optimizer, average=average,
                                       vocab=ds.vocab, device=device, meta={"config": asdict(cfg), "data": data_meta,
                                                            "elapsed": time.perf_counter() - t0, "step_impl": impl,
                                                            "max_item_len": max_item_len, **processes})
        last_saved = step

    processes = {"world_size": world, "backend": group.backend if group is not None else None}
    progress = Progress(cfg.steps, initial=start)
    if resume is not None:
        resume.restore_rng(device)  # after everything above that seeds or draws
    else:
        torch.manual_seed(cfg.seed)  # the batch order, as the seed notebook: reseed, then randint per step
    t0 = time.perf_counter() - (resume.meta["elapsed"] if resume is not None else 0.0)
    Xtrain, Ytrain = X["train"], Y["train"]
    # the manual eager and replayed steps run with autograd off: the loop stays in inference mode, rather
    # than each step entering and leaving it (fastpath.in_inference_mode)
    manual_eager = cfg.grad == "manual" and impl in ("eager", "replay")  # the layers' own calls, one by one
    loop_mode = torch.inference_mode() if manual_eager else contextlib.nullcontext()
    if group is not None:  # this rank's rows of every batch, and the sums over the ranks
        ranks = parallel.DataParallel(group, model, optimizer, cfg.batch_size, impl, cfg.reduce,
                                      IGNORE if ds.sequences else None, average)
    voted_stop = False

    def stopping() -> bool:
        """Ctrl-C seen: in one process, as it comes (between steps); in several, as the ranks voted in the step."""
        return stop.requested if group is None else voted_stop

    stops_on = (signal.SIGINT, signal.SIGTERM) if group is not None else (signal.SIGINT,)  # torchrun: SIGTERM
    metrics_file = metrics_path if writes else os.devnull
    with (checkpoint.StopAtStepBoundary(stops_on) as stop, open(metrics_file, "a", encoding="utf-8") as mf,
          gc_frozen(), repeatable_sums(), loop_mode):
        if resume is None:  # the untrained state, so that a run that diverges early still leaves one to resume
            save(0)
        for step in range(start, cfg.steps):
            lr = learning_rate(cfg.schedule, step, cfg.steps, cfg.lr, cfg.warmup, cfg.lr_floor)
            idx = torch.randint(0, ntrain, (cfg.batch_size,))  # drawn on the CPU on any device: one batch order
            if idx.device != device:
                idx = idx.to(device)
            checking = cfg.check_every and step % cfg.check_every == 0
            own_rows = group is not None and not ds.sequences and not checking
            if own_rows:  # this rank's rows alone: a packed batch needs them all, a check the whole batch
                x, y = ranks.gather(Xtrain, Ytrain, idx)
            else:
                x, y = batch_of(Xtrain.index_select(0, idx), Ytrain.index_select(0, idx))
            if checking:  # the whole batch, on every rank alike
                with torch.inference_mode(False):  # autograd's reference needs a batch it can save for its backward
                    results = check_model(model, x.clone(), y.clone(), grads=optimizer.grads)
                if not passed(results):
                    bad = [r.name for r in results if not r.close]
                    raise HandgradError(f"step {step}: manual gradients disagree with autograd for {', '.join(bad)}")
            if group is None:
                loss = step_fn(model, x, y)
            else:
                loss, voted_stop = ranks.step(x, y, stop.requested, whole=not own_rows)
            watch.observe(step, loss)
            last = step == cfg.steps - 1
            log = step % cfg.log_every == 0 or last
            evaluate_now = cfg.eval_every and (step % cfg.eval_every == 0 or last)
            if log or evaluate_now:
                loss_value = float(loss)
                watch.check()
                watch.check_state(step)
                rec = {"step": step, "lr": lr, "train_loss": loss_value}
                if evaluate_now and cfg.diagnostics:  # before evaluate, which drops the batch's activations
                    rec.update(diagnostics.measure(model))
                if evaluate_now:
                    with evaluated(average):
                        rec["val_loss"] = evaluate(model, X["val"], Y["val"], group=group)
                    watch.check_value(step, "validation loss", rec["val_loss"])
                    if group is not None:
                        ranks.check_same_state(step)
                rec["elapsed"] = time.perf_counter() - t0
                mf.write(json.dumps(rec) + "\n")
                metrics.append(rec)
                if evaluate_now:
                    rate = (step + 1) / max(rec["elapsed"], 1e-9)
                    progress.write(f"step {step:>7} | lr {lr:.4g} | train {loss_value:.4f} | val {rec['val_loss']:.4f} | {rate:,.0f} steps/s")
            optimizer.step(lr)
            if average is not None:
                average.update()
            # reading the loss syncs with the device: only every 50 steps, and only for the bar
            progress.update(1, float(loss) if progress.bar is not None and step % 50 == 0 else None)
            done = step + 1
            if stopping() or (cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps) or done == cfg.stop_at:
                save(done)
            if done == cfg.stop_at and done < cfg.steps:
                progress.close()
                print(f"stopped as asked after step {done:,} of {cfg.steps:,}; the state is saved in {out_dir}/; "
                      f"continue with: handgrad train -o {out_dir} --resume")
                return {"stopped_at": done}
            if stopping():
                progress.close()
                print(f"interrupted: saved the state after step {done:,} to {out_dir}/; "
                      f"continue with: handgrad train -o {out_dir} --resume", file=sys.stderr)
                raise KeyboardInterrupt
        save(cfg.steps)
    progress.close()
    elapsed = time.perf_counter() - t0

    if average is not None:  # the run's result: what it evaluated, samples from and saved as its model
        average.keep()
    final = {s: evaluate(model, X[s], Y[s], group=group) for s in SPLITS}
    for s in SPLITS:
        watch.check_value(cfg.steps, f"final {s} loss", final[s])
    print(f"final loss (eval mode): train {final['train']:.4f} | val {final['val']:.4f} | test {final['test']:.4f} "
          f"({cfg.steps:,} steps in {elapsed:.1f}s, {cfg.steps / max(elapsed, 1e-9):,.0f} steps/s)")
    if not writes:
        return {"final": final}
    samples = generate(model, ds.vocab, cfg.num_samples, seed=cfg.seed, device=device, max_len=max_item_len)
    print("samples:")
    for s in samples:
        print(f"  {s}")
    checkpoint.atomic_write_bytes(out_dir / "samples.txt", ("\n".join(samples) + "\n").encode("utf-8"))
    run = {
        "config": asdict(cfg),
        "model_config": mc.to_dict(),
        "num_params": model.num_params(),
        "data": {"source": ds.source, "items": len(ds.words), "sizes": sizes},
        "vocab": ds.vocab.chars,
        "final": final,
        "steps_per_s": cfg.steps / max(elapsed, 1e-9),
        "impl": "eager" if getattr(getattr(step_fn, "replayed", None), "fallback", None) else impl,
        "elapsed": elapsed,
        **processes,
        "torch": torch.__version__,
    }
    checkpoint.atomic_write_json(out_dir / "run.json", run)
    plot_losses(metrics, out_dir / "loss.png")
    if cfg.diagnostics:
        diagnostics.plot(metrics, out_dir / "activations.png")
    print(f"saved to {out_dir}/: checkpoint.safetensors, model.safetensors, model.json, run.json, metrics.jsonl, loss.png, "
          f"{'activations.png, ' if cfg.diagnostics else ''}samples.txt")
    return run


# What a resumed run may change: how long it runs, where, what it logs, and the learning rate
# (to get past a divergence). Anything else would make it a different run than the one saved.
RESUME_CAN_CHANGE = ("steps", "lr", "out", "data", "device", "threads", "num_samples", "save_every", "eval_every",
                     "log_every", "check", "check_every", "impl", "stop_at", "reduce")


def flag_name(setting: str) -> str:
    return {"data": "-i/--data", "check": "--no-check", "num_samples": "-n/--num-samples"}.get(
        setting, "--" + setting.replace("_", "-"))


def resume_config(out: str, given: dict) -> tuple[TrainConfig, checkpoint.Checkpoint]:
    """The saved run's config and checkpoint, with the settings in `given` (those set on the command line)
    applied where a resumed run may change them; a setting that would change the run is an error."""
    ckpt = checkpoint.load_checkpoint(out)
    saved = ckpt.meta["config"]
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise HandgradError(f"{ckpt.path}: unknown training settings {', '.join(unknown)} (saved by another handgrad version?)")
    for key, value in given.items():
        if key in names and key not in RESUME_CAN_CHANGE and value != saved.get(key):
            raise HandgradError(
                f"{flag_name(key)} {value} differs from the saved run's {saved.get(key)}: a resumed run keeps its "
                f"settings; only {', '.join(flag_name(k) for k in RESUME_CAN_CHANGE if k != 'out')} can change")
    changed = {k: v for k, v in given.items() if k in RESUME_CAN_CHANGE}
    if changed.get("stop_at") and changed["stop_at"] <= ckpt.step:
        raise HandgradError(f"--stop-at {changed['stop_at']:,} is not beyond the saved step {ckpt.step:,}")
    saved = dict(saved)
    if saved.get("optimizer") != "momentum":
        saved["momentum"] = None  # earlier versions recorded the momentum of optimizers that have none
    if saved.get("stop_at") and saved["stop_at"] <= ckpt.step:
        saved["stop_at"] = 0  # the stop it made: done
    saved.setdefault("trim", 0)  # saved before batches were trimmed: it ran every batch at the data's width
    saved.setdefault("pack", False)  # saved before batches were packed: one item a row
    saved.setdefault("ema", 0.0)  # saved before the weights' moving average: it evaluated the trained weights
    saved.setdefault("lr_floor", COSINE_FINAL_FRACTION)  # saved before the cosine's floor could change: lr/100
    if saved.get("model") == "transformer":  # saved before attention dropout and tied weights: it had neither
        saved.setdefault("attn_dropout", 0.0)
        saved.setdefault("tie_weights", False)
    try:
        cfg = TrainConfig(**{**saved, **changed, "out": str(out)})
    except TypeError as e:
        raise HandgradError(f"{ckpt.path}: the training config is malformed: {e}") from None
    if not isinstance(cfg.steps, int) or ckpt.step >= cfg.steps:
        if "steps" in changed:
            raise HandgradError(f"--steps {cfg.steps} is not beyond the saved step {ckpt.step:,}: pass a larger --steps to train further")
        raise HandgradError(f"the run in {out} already finished its {ckpt.step:,} steps; pass --steps N (N > {ckpt.step}) to train further")
    return cfg, ckpt
