"""Training-step throughput of the seed model, side by side, in one process.

Implementations of one SGD training step (batch draw, forward, backward, update):

- `autograd`: the baseline, plain eager PyTorch: torch.nn.functional ops on
  parameters with requires_grad, `loss.backward()`, torch.optim.SGD.
- `autograd-compiled`: that same step with the forward and loss under
  torch.compile (autograd then runs the compiled backward graph) and the
  optimizer's step compiled too.
- `manual`: the hand-written backward run eagerly, as `handgrad train --impl eager`
  runs it: `fastpath.manual_step` (the layers' methods), then the optimizer's `step`.
- `manual-replay`: `fastpath.ReplayStep`, that eager step's torch calls recorded once
  and replayed (what `handgrad train` runs on a CPU unless it compiles), then the
  optimizer's `step`.
- `manual-compiled`: `fastpath.CompiledStep`, the same layers and optimizer
  traced and compiled, one step per call; `manual-compiled-xK`: K steps per call.
  (For the transformer the bench's default; what `handgrad train --impl compiled` runs,
  its update left outside.)
- `manual-cudagraph` (GPU): `fastpath.CudaGraphStep`, the eager manual step
  recorded once as a CUDA graph and replayed; `manual-cudagraph-xK`: K steps per replay.

All start from the same initial weights and draw batches from the same data, packed several items
to a row where the family's training packs them (the transformer; `--no-pack`: one item a row),
every batch at the row count that training compiles (`data.usual_packed_rows`; a batch of fewer rows
padded up to it, as training pads it, one of more drawn again).
Each is warmed up first (compilation included there, and reported), then the
implementations take turns, round after round. `steps_per_s` is the best
round (slower rounds measure whatever else the machine was doing), with the
median beside it. Speed is measured here, never asserted
in tests.

Memory: for families other than the seed's, what a training forward keeps for the backward, the
manual layers' saved state against autograd's saved tensors (`saved_bytes`, any device); on a GPU,
also the most memory one training step of each implementation allocates (`peak_step_bytes`).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import __version__
from .data import pack_batch, pad_rows, usual_packed_rows
from .errors import HandgradError
from .fastpath import CompiledStep, CudaGraphStep, ReplayStep, manual_step
from .layers import Linear
from .model import ModelConfig, build_model
from .optim import SGD
from .train import gc_frozen

BATCH_SIZES = (32, 8192)
LR = 0.1  # small enough that thousands of timed steps stay finite
LARGE_BATCH = 1024  # from here a step is mostly arithmetic: the table shows GFLOP/s, and several steps per call do not pay


def default_batch_sizes(model: str = "mlp") -> tuple[int, ...]:
    """The seed's batch and a large one; for the other families, their training batch (model.TRAINING)
    and 1,024 items (a transformer's 1,024 names are 12-16 thousand positions)."""
    from .model import TRAINING

    return (32, 8192) if model == "mlp" else (TRAINING[model]["batch_size"], 1024)


def default_impls(batch_size: int | None = None, device: str = "cpu", model: str = "mlp") -> list[str]:
    """Several steps per call only pay at small batches, where a call's fixed cost is most of a step;
    CUDA graphs only exist on a GPU. Models other than the seed's: autograd through the model's own
    layers, eager and compiled, against the manual step eager and replayed, and for the transformer
    compiled too (the recurrent models' step, a Python loop over positions, is not compiled here)."""
    if model != "mlp":
        compiled = ["manual-compiled"] if model == "transformer" else []
        return ["autograd", "autograd-compiled", "manual", "manual-replay", *compiled]
    small = batch_size is None or batch_size < LARGE_BATCH
    impls = ["autograd", "autograd-compiled", "manual", "manual-replay", "manual-compiled"]
    if device == "cuda":
        return impls + ["manual-cudagraph"] + (["manual-cudagraph-x32"] if small else [])
    return impls + (["manual-compiled-x32"] if small else [])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One implementation at one batch size: `run(n)` takes n training steps (n a multiple of `chunk`)."""

    chunk = 1
    pack = False  # each batch's items packed several to a row (`data.pack_batch`), as the transformer trains
    rows: int | None = None  # packed: the row count timed (the usual one); a batch that packs to another is drawn again

    def __init__(self, model_config: ModelConfig, batch_size: int, X, Y, device, seed: int):
        self.batch_size, self.X, self.Y, self.device = batch_size, X, Y, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.model = build_model(model_config, seed=seed, device=device)

    def draw(self, *shape) -> torch.Tensor:
        return torch.randint(0, len(self.Y), shape, generator=self.gen, device=self.device)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch drawn as `handgrad train` draws it (the same for every eager implementation)."""
        while True:
            idx = self.draw(self.batch_size)
            x, y = self.X.index_select(0, idx), self.Y.index_select(0, idx)
            if not self.pack:
                return x, y
            # every runner times the one shape that training's compiled step compiles, a batch of fewer rows
            # padded up to it as training pads it: a rare batch of more would otherwise cost a compiled
            # runner a compile inside a timed round
            x, y = pack_batch(x, y)
            if self.rows is None:
                return x, y
            if x.shape[0] <= self.rows:
                return pad_rows(x, y, self.rows)

    def run(self, n: int) -> None:
        raise NotImplementedError


class ManualRunner(Runner):
    def __init__(self, *args):
        super().__init__(*args)
        self.optimizer = SGD(self.model.parameters(), self.model.grads(), lr=LR)
        self.step = lambda x, y: manual_step(self.model, x, y)

    def run(self, n):
        with torch.inference_mode():  # the whole loop, as `handgrad train` runs the manual step
            for _ in range(n):
                self.step(*self.batch())
                self.optimizer.step(LR)


class ReplayRunner(ManualRunner):
    def __init__(self, *args):
        super().__init__(*args)
        self.step = ReplayStep(self.model)


class CompiledRunner(Runner):
    step_class = CompiledStep

    def __init__(self, *args, steps_per_call: int = 1):
        super().__init__(*args)
        self.optimizer = SGD(self.model.parameters(), self.model.grads(), lr=LR)
        self.step = self.step_class(self.model, self.optimizer, steps_per_call=steps_per_call)
        self.chunk = steps_per_call

    def run(self, n):
        if self.pack:  # packed on the CPU between steps, as training packs: one step a call
            for _ in range(n):
                self.step(*self.batch(), None, LR)
            return
        for _ in range(n // self.chunk):
            self.step(self.X, self.Y, self.draw(self.chunk, self.batch_size), LR)


class CudaGraphRunner(CompiledRunner):
    step_class = CudaGraphStep


class AutogradRunner(Runner):
    """The seed MLP written the usual PyTorch way, from the same initial weights."""

    compiled = False

    def __init__(self, *args):
        super().__init__(*args)
        p = dict(self.model.named_parameters())
        names = ["embedding.weight", "linear1.weight", "batchnorm1.weight", "batchnorm1.bias",
                 "linear2.weight", "linear2.bias"]
        if set(p) != set(names):
            raise HandgradError("the autograd baselines are written for the seed mlp")
        self.C, self.W1, self.gamma, self.beta, self.W2, self.b2 = (p[n].clone().requires_grad_(True) for n in names)
        self.running_mean = torch.zeros_like(self.gamma, requires_grad=False)
        self.running_var = torch.ones_like(self.gamma, requires_grad=False)
        params = [self.C, self.W1, self.gamma, self.beta, self.W2, self.b2]
        self.optimizer = torch.optim.SGD(params, lr=LR)
        self.loss_fn = self.forward_loss
        self.update = self.optimizer.step
        if self.compiled:
            self.loss_fn = torch.compile(self.forward_loss)
            self.update = torch.compile(self.optimizer.step)

    def forward_loss(self, x, y):
        emb = F.embedding(x, self.C).flatten(1)
        h = F.batch_norm(emb @ self.W1, self.running_mean, self.running_var, self.gamma, self.beta,
                         training=True, momentum=0.01)
        logits = torch.tanh(h) @ self.W2 + self.b2
        return F.cross_entropy(logits, y)

    def run(self, n):
        for _ in range(n):
            loss = self.loss_fn(*self.batch())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.update()


class AutogradCompiledRunner(AutogradRunner):
    compiled = True


class LayersAutogradRunner(Runner):
    """Autograd through the model's own layers (their forward, autograd's backward into the same
    gradient buffers, `train.autograd_step`), then the same SGD update as the manual runners: what the
    hand-written backward replaces, on any model. `compiled`: the forward and loss under torch.compile,
    autograd running the compiled backward."""

    compiled = False

    def __init__(self, *args):
        super().__init__(*args)
        self.optimizer = SGD(self.model.parameters(), self.model.grads(), lr=LR)
        self.forward = torch.compile(self.model.forward) if self.compiled else self.model.forward

    def run(self, n):
        params, grads = self.model.parameters(), self.model.grads()
        for p, g in zip(params, grads):
            p.requires_grad_(True)
        try:
            for _ in range(n):
                x, y = self.batch()
                for p, g in zip(params, grads):
                    g.zero_()
                    p.grad = g
                self.forward(x, y).backward()
                self.optimizer.step(LR)
        finally:
            for p in params:
                p.grad = None
                p.requires_grad_(False)


class LayersAutogradCompiledRunner(LayersAutogradRunner):
    compiled = True


def make_runner(name: str, *args) -> Runner:
    seed_model = args[0].model == "mlp"
    if name == "autograd":
        return AutogradRunner(*args) if seed_model else LayersAutogradRunner(*args)
    if name == "autograd-compiled":
        return AutogradCompiledRunner(*args) if seed_model else LayersAutogradCompiledRunner(*args)
    if name == "manual":
        return ManualRunner(*args)
    if name == "manual-replay":
        return ReplayRunner(*args)
    if name == "manual-compiled":
        return CompiledRunner(*args)
    if name == "manual-cudagraph":
        return CudaGraphRunner(*args)
    for prefix, runner in (("manual-compiled-x", CompiledRunner), ("manual-cudagraph-x", CudaGraphRunner)):
        k = name[len(prefix):]
        if name.startswith(prefix) and k.isdigit() and int(k) >= 1:
            return runner(*args, steps_per_call=int(k))
    raise HandgradError(f"unknown implementation {name!r}: choose from autograd, autograd-compiled, manual, "
                        f"manual-replay, manual-compiled, manual-compiled-xK (K steps per call), and on a GPU manual-cudagraph, "
                        f"manual-cudagraph-xK")


def matmul_flops(model, batch_size: int) -> int:
    """Multiply-adds x2 of a step's matmuls: each Linear does x W forward, x^T dy and dy W^T backward."""
    rows = batch_size  # the seed mlp: one row per example
    return sum(6 * rows * layer.params["weight"].shape[0] * layer.params["weight"].shape[1]
               for layer in model.net.layers.values() if isinstance(layer, Linear))


def matmul_seconds(model, batch_size: int, device, repeats: int = 5, min_time: float = 0.2) -> float:
    """Seconds per step of the step's matmuls alone, same shapes and layouts as the layers, best of repeats."""
    gen = torch.Generator(device=device).manual_seed(0)
    work = []
    for layer in model.net.layers.values():
        if isinstance(layer, Linear):
            w = layer.params["weight"]
            x = torch.randn(batch_size, w.shape[0], generator=gen, device=device)
            d = torch.randn(batch_size, w.shape[1], generator=gen, device=device)
            work.append((x, w, d))

    def once():
        for x, w, d in work:
            torch.mm(x, w)
            torch.mm(x.T, d)
            torch.mm(d, w.T)

    once()
    sync(device)
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < min_time / repeats or n == 0:
        once()
        n += 1
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            once()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


@dataclass
class BenchConfig:
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    impls: list[str] | None = None  # None: default_impls(batch size)
    threads: int = 1
    device: str = "cpu"
    rounds: int = 7
    seconds: float = 0.25  # per implementation per round
    data: str | None = None
    seed: int = 42
    model: str = "mlp"  # the seed's, or any family with its default sizes
    pack: bool | None = None  # batches packed several items to a row; None: as the family trains

def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from .allocator import keeps_freed_memory

    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "keeps_freed_memory": keeps_freed_memory(),  # as the timings ran: the same for every implementation
            "python": platform.python_version(), "torch": torch.__version__, "handgrad": __version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(cfg: BenchConfig, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    from .data import IGNORE
    from .train import TrainConfig, require_threads, resolve_device

    threads = require_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.set_num_threads(threads)
    tc = TrainConfig(model=cfg.model, data=cfg.data, pack=cfg.pack).resolved()
    ds = tc.dataset()
    X, Y = ds.X["train"].to(device), ds.Y["train"].to(device)
    mc = tc.model_config(len(ds.vocab), ds.block_size)
    tokens_per_row = float((ds.Y["train"] != IGNORE).sum()) / len(ds.Y["train"])  # the predictions a row counts
    memory = []
    results, matmul = [], []
    for batch in cfg.batch_sizes:
        if cfg.model != "mlp":
            memory.append({"batch_size": batch, **saved_bytes(build_model(mc, seed=cfg.seed, device=device), X, Y, batch,
                                                              tc.pack)})
        runners = {}
        rows = usual_packed_rows(ds.Y["train"], batch) if tc.pack else None  # the row count every runner times
        for name in cfg.impls or default_impls(batch, device.type, cfg.model):
            r = make_runner(name, mc, batch, X, Y, device, cfg.seed)
            if tc.pack:
                if r.chunk > 1:
                    raise HandgradError(f"{name}: several steps per call draw their batches inside the compiled graph, "
                                        "which cannot pack them; use --no-pack or manual-compiled")
                r.pack, r.rows = True, rows
            t0 = time.perf_counter()
            r.run(r.chunk)  # compiles, where there is anything to compile
            sync(device)
            first = time.perf_counter() - t0
            r.run(r.chunk)  # a second call may compile again (the layers' Python state a trace guards on)
            sync(device)
            t0 = time.perf_counter()
            r.run(r.chunk * 2)
            sync(device)
            rate = 2 * r.chunk / max(time.perf_counter() - t0, 1e-9)
            steps = max(r.chunk, int(rate * cfg.seconds) // r.chunk * r.chunk)
            r.run(steps)  # warm-up at the timed length
            runners[name] = (r, steps, first, peak_step_bytes(r, device))
            refused = getattr(getattr(r, "step", None), "fallback", None)  # a replay whose recording was refused
            log(f"batch {batch}: {name} ready (first call {first:.1f}s), {steps} steps per round"
                + (f"; its recording was refused ({refused}), so it times the eager step" if refused else ""))
        rates = {name: [] for name in runners}
        with gc_frozen():  # no full garbage collection lands in one implementation's round
            for i in range(cfg.rounds):
                order = list(runners) if i % 2 == 0 else list(reversed(runners))
                for name in order:
                    r, steps, _, _ = runners[name]
                    sync(device)
                    t0 = time.perf_counter()
                    r.run(steps)
                    sync(device)
                    rates[name].append(steps / (time.perf_counter() - t0))
        model = next(iter(runners.values()))[0].model
        flops = matmul_flops(model, batch) if cfg.model == "mlp" else 0  # the seed's Linears over one row per example
        if flops:
            mm = matmul_seconds(model, batch, device)
            matmul.append({"batch_size": batch, "flop_per_step": flops, "seconds": mm, "gflop_per_s": flops / mm / 1e9})
        for name, (r, steps, first, peak) in runners.items():
            best = max(rates[name])
            results.append({
                "impl": name, "batch_size": batch, "steps_per_s": best, "threads": cfg.threads, "device": device.type,
                "median_steps_per_s": statistics.median(rates[name]), "min_steps_per_s": min(rates[name]),
                "rounds": len(rates[name]), "steps_per_round": steps, "first_call_s": first,
                "gflop_per_s": flops * best / 1e9, "tokens_per_s": best * batch * tokens_per_row,
                "peak_step_bytes": peak,
            })
        base = next((x for x in results if x["impl"] == "autograd" and x["batch_size"] == batch), None)
        for x in results:
            if x["batch_size"] == batch:
                x["vs_autograd"] = x["steps_per_s"] / base["steps_per_s"] if base else None
                x["vs_autograd_median"] = x["median_steps_per_s"] / base["median_steps_per_s"] if base else None
    return {"results": results, "matmul": matmul, "memory": memory, "machine": machine_info(device),
            "config": {"batch_sizes": list(cfg.batch_sizes), "impls": cfg.impls or "default", "rounds": cfg.rounds,
                       "pack": tc.pack,
                       "seconds_per_round": cfg.seconds, "dtype": "float32",
                       "model": "mlp (the seed's)" if cfg.model == "mlp" else cfg.model,
                       "model_config": mc.to_dict(), "lr": LR}}


def peak_step_bytes(runner: Runner, device: torch.device) -> int | None:
    """On a GPU, the most memory a call of the runner's training step allocated above what was allocated
    before it (`torch.cuda.max_memory_allocated`): what the step itself needs, its model and optimizer
    left out. None on a CPU, which keeps no such count."""
    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.run(runner.chunk)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def storages(tensors, exclude: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors`, leaving out those in `exclude` (data pointers)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def held_tensors(obj, seen: set[int] | None = None):
    """Every tensor a layer's saved state holds (dicts, lists and tuples of them, the tapes' frames)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from held_tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from held_tensors(v, seen)
    elif hasattr(obj, "saved"):  # a layer on a tape
        yield from held_tensors(obj.saved, seen)


def saved_bytes(model, X, Y, batch: int, pack: bool = False) -> dict:
    """What a training forward keeps for its backward, on one batch (`pack`: its items packed several to a
    row): the manual layers' saved state against the tensors autograd saves
    (`torch.autograd.graph.saved_tensors_hooks`), each as distinct storages, the parameters and the batch
    left out of both (each side has them anyway)."""
    x, y = pack_batch(X[:batch], Y[:batch]) if pack else (X[:batch], Y[:batch])
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.grads(), x, y)}
    with torch.no_grad():
        model.forward(x, y)
    manual = storages([t for _, m in model.net.named_modules() for t in held_tensors(m.saved)]
                      + list(held_tensors(model.loss_fn.saved)), exclude)
    model.clear_saved()
    packed = []

    def pack(t):
        packed.append(t)
        return t

    params = model.parameters()
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            model.forward(x, y)
    finally:
        for p in params:
            p.requires_grad_(False)
        model.clear_saved()
    autograd = storages(packed, exclude)
    return {"manual_bytes": manual, "autograd_bytes": autograd, "ratio": manual / max(autograd, 1)}


def format_table(report: dict) -> str:
    lines = []
    m = report["machine"]
    lines.append(f"{report['config']['model']}{', items packed several to a row' if report['config'].get('pack') else ''}, "
                 f"float32, {report['results'][0]['threads'] if report['results'] else '?'} thread(s), "
                 f"{report['results'][0]['device'] if report['results'] else '?'}; {m['cpu']}; torch {m['torch']}")
    header = (f"{'batch':>6}  {'impl':<20} {'steps/s':>10} {'median':>10} {'vs autograd':>11} {'(median)':>8} "
              f"{'GFLOP/s':>8} {'of matmul':>9}")
    lines += [header, "-" * len(header)]
    mm = {x["batch_size"]: x for x in report["matmul"]}
    for x in report["results"]:
        b = x["batch_size"]
        ratio = f"{x['vs_autograd']:.2f}x" if x.get("vs_autograd") else "-"
        ratio_med = f"{x['vs_autograd_median']:.2f}x" if x.get("vs_autograd_median") else "-"
        big = b >= LARGE_BATCH and b in mm
        gf = f"{x['gflop_per_s']:.1f}" if big else ""
        of = f"{x['gflop_per_s'] / mm[b]['gflop_per_s']:.0%}" if big else ""
        lines.append(f"{b:>6}  {x['impl']:<20} {x['steps_per_s']:>10,.1f} {x['median_steps_per_s']:>10,.1f} "
                     f"{ratio:>11} {ratio_med:>8} {gf:>8} {of:>9}")
    for b, x in mm.items():
        if b >= LARGE_BATCH:
            lines.append(f"{b:>6}  {'(matmuls alone)':<20} {1 / x['seconds']:>10,.1f} {'':>10} {'':>11} {'':>8} "
                         f"{x['gflop_per_s']:>8.1f} {'100%':>9}")
    peaks = [x for x in report["results"] if x.get("peak_step_bytes") is not None]
    if peaks:
        lines.append("")
        lines += [f"batch {x['batch_size']}: {x['impl']}: a training step allocates at most {x['peak_step_bytes']:,} "
                  f"bytes above its model and optimizer" for x in peaks]
    if report.get("memory"):
        lines.append("")
        lines += [f"batch {x['batch_size']}: a training forward keeps {x['manual_bytes']:,} bytes for the manual backward, "
                  f"{x['autograd_bytes']:,} for autograd's ({x['ratio']:.2f}x); tokens/s of each impl in --json"
                  for x in report["memory"]]
    lines.append("steps/s: the best of the timed rounds (others share this machine; the median is beside it)")
    return "\n".join(lines)
