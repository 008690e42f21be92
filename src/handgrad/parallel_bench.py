"""`handgrad bench --processes 1,2`: training steps per second of a data-parallel run against one process.

Each measurement starts its processes afresh (one thread each unless told), joins them as `handgrad
train` does on one machine, its sums through shared memory (`shared`) or gloo's over local TCP (`gloo`,
as HANDGRAD_LOCAL_SUM=0 asks; set in the bench's environment, it measures gloo alone), builds the model
family's default model and optimizer, draws batches as `handgrad train` does, warms up (the compiled
step compiles there), and times whole steps (forward, backward, the gradients' sum over the ranks, the
update) between two barriers. One process runs the same step, eager or compiled, without any
communication. The configurations take turns, round after round, and each reports its median round.
"""
from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from .errors import HandgradError


@dataclass
class ParallelBenchConfig:
    processes: tuple[int, ...] = (1, 2)
    batch_size: int = 8192
    model: str = "mlp"
    reduces: tuple[str, ...] = ("once", "buckets")
    steps: tuple[str, ...] = ("eager", "compiled")  # the step paths, each in every process count
    sums: tuple[str, ...] = ("shared", "gloo")  # what sums over the ranks: shared memory, gloo over local TCP
    threads: int = 1
    rounds: int = 3
    seconds: float = 2.0
    data: str | None = None
    seed: int = 42


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SUMMED_BY = {"shared": "shared memory", "gloo": "gloo"}


def worker(rank: int, world: int, port: int, cfg: ParallelBenchConfig, reduce: str, path: str, summed: str,
           out: str) -> None:
    import torch.distributed as dist

    from . import parallel
    from .data import IGNORE, pack_batch
    from .fastpath import CompiledStep, manual_step
    from .model import build_model
    from .optim import make_optimizer
    from .train import TrainConfig

    torch.set_num_threads(cfg.threads)
    group = None
    if world > 1:
        os.environ["LOCAL_WORLD_SIZE"] = str(world)  # every rank on this machine, as torchrun says it
        os.environ["HANDGRAD_LOCAL_SUM"] = "1" if summed == "shared" else "0"
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        group = parallel.join(torch.device("cpu"))
        if group.summed_by != SUMMED_BY[summed]:
            raise HandgradError(f"the {summed} sum was asked for, {group.summed_by} sums (HANDGRAD_LOCAL_SUM=0 "
                                "measures gloo alone)")
    tc = TrainConfig(model=cfg.model, data=cfg.data, seed=cfg.seed).resolved()
    ds = tc.dataset()
    model = build_model(tc.model_config(len(ds.vocab), ds.block_size), seed=cfg.seed)
    optimizer = make_optimizer(tc.optimizer, model, lr=tc.lr * 0.01, momentum=tc.momentum, weight_decay=tc.weight_decay)
    X, Y = ds.X["train"], ds.Y["train"]
    torch.manual_seed(cfg.seed)
    if group is not None:  # the step `handgrad train` runs in several processes
        ranks = parallel.DataParallel(group, model, optimizer, cfg.batch_size, path, reduce,
                                      IGNORE if ds.sequences else None)
    elif path == "compiled":
        compiled = CompiledStep(model)

    def step() -> None:
        idx = torch.randint(0, len(Y), (cfg.batch_size,))
        if group is not None and not ds.sequences:  # as `handgrad train` draws them: this rank's rows alone
            ranks.step(*ranks.gather(X, Y, idx), False, whole=False)
        elif group is not None:
            ranks.step(*batch(idx), False)
        elif path == "eager":
            manual_step(model, *batch(idx))
        else:
            compiled(*batch(idx), None)
        optimizer.step()

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = X.index_select(0, idx), Y.index_select(0, idx)
        return pack_batch(x, y) if tc.pack else (x, y)

    def barrier() -> None:
        if group is not None:
            dist.barrier()

    with torch.inference_mode():
        for _ in range(3):  # warm-up
            step()
        barrier()
        t0 = time.perf_counter()
        n = 0
        while True:  # every rank runs as many steps as rank 0 decides
            for _ in range(5):
                step()
            n += 5
            done = torch.tensor([float(rank == 0 and time.perf_counter() - t0 >= cfg.seconds)])
            if group is not None:  # rank 0's word, through the sum the steps use (a gloo broadcast took about
                group.all_reduce_(done, op=dist.ReduceOp.MAX)  # 1 ms here, 2% of two processes' five steps)
            if done.item():
                break
        barrier()
        elapsed = time.perf_counter() - t0
    if rank == 0:
        with open(out, "w") as f:
            f.write(repr(n / elapsed))
    if group is not None:
        dist.destroy_process_group()


def measure(world: int, cfg: ParallelBenchConfig, reduce: str, path: str, summed: str = "shared") -> float:
    """Steps per second of one fresh run of `world` processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate")
        os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
        mp.start_processes(worker, args=(world, free_port(), cfg, reduce, path, summed, out), nprocs=world,
                           start_method="spawn")
        with open(out) as f:
            return float(f.read())


def run_parallel_bench(cfg: ParallelBenchConfig, log=print) -> dict:
    if cfg.batch_size < max(cfg.processes):
        raise HandgradError(f"--batch-sizes {cfg.batch_size} is smaller than {max(cfg.processes)} processes")
    if (os.cpu_count() or 1) < max(cfg.processes) * cfg.threads:
        log(f"note: {max(cfg.processes)} processes of {cfg.threads} thread(s) on {os.cpu_count()} cores: they share cores")
    from .model import SEQUENCE_MODELS

    # several processes compile only models of fixed contexts (train.refuse_for_processes); the compiled
    # step sums the gradients once after its graph: no buckets
    paths = [p for p in cfg.steps if p == "eager" or cfg.model not in SEQUENCE_MODELS]
    gloo_only = os.environ.get("HANDGRAD_LOCAL_SUM") == "0"
    sums = [s for s in cfg.sums if s in SUMMED_BY and not (s == "shared" and gloo_only)]
    if not sums:
        raise HandgradError(f"no sum to measure: choose among {', '.join(SUMMED_BY)} "
                            "(HANDGRAD_LOCAL_SUM=0 leaves gloo alone)")
    configs = [(path, n, "none", "none") if n == 1 else (path, n, r, s) for path in paths for n in cfg.processes
               for r in (("none",) if n == 1 else cfg.reduces if path == "eager" else ("once",))
               for s in (("none",) if n == 1 else sums)]
    rates: dict[tuple[str, int, str, str], list[float]] = {c: [] for c in configs}
    for k in range(cfg.rounds):
        for path, n, reduce, summed in configs:
            rate = measure(n, cfg, "once" if reduce == "none" else reduce, path, summed)
            rates[(path, n, reduce, summed)].append(rate)
            log(f"round {k + 1}/{cfg.rounds}: {path}, {n} process{'es' if n > 1 else ''}"
                f"{'' if reduce == 'none' else f', {reduce}, {summed}'}: {rate:.2f} steps/s")
    results = []
    for (path, n, reduce, summed), r in rates.items():
        med = statistics.median(r)
        one = (path, 1, "none", "none")
        base = statistics.median(rates[one]) if one in rates else None
        results.append({"step": path, "processes": n, "reduce": reduce, "sum": summed, "steps_per_s": med,
                        "rounds": r, "vs_1_process": med / base if base else None})
    return {"config": asdict(cfg), "cpu_count": os.cpu_count(), "torch": torch.__version__, "results": results}


def format_parallel_table(report: dict) -> str:
    c = report["config"]
    lines = [f"{c['model']}, batch {c['batch_size']}, {c['threads']} thread(s) per process; median of "
             f"{c['rounds']} rounds; vs 1: against one process on the same step",
             f"{'step':<9} {'processes':>9}  {'reduce':<8} {'sum':<7} {'steps/s':>9} {'vs 1':>6}"]
    for r in report["results"]:
        ratio = f"{r['vs_1_process']:.2f}x" if r["vs_1_process"] else "-"
        lines.append(f"{r['step']:<9} {r['processes']:>9}  {r['reduce']:<8} {r['sum']:<7} {r['steps_per_s']:>9.2f} "
                     f"{ratio:>6}")
    return "\n".join(lines)
