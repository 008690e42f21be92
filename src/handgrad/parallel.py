"""Data-parallel training over torch.distributed, the communication written by hand as the gradients are.

Every process (rank) of a run holds the whole model and draws the same batch indices from the run's
seed; rank r takes its contiguous slice of the batch's rows (`Shard`). What couples rows across the
batch is made global by hand:

- the loss: each rank's mean over its rows is weighted by its share of the counted targets, so the
  weighted parts sum to the whole batch's mean, and each rank's gradients sum to the whole batch's
  gradient (`sharded_step`);
- the gradients: one all-reduce (a sum) of the flat gradient buffer once the backward is done, or in
  buckets started as soon as the layers that fill them are done (`GradientReducer`);
- BatchNorm's statistics: its forward all-reduces the sums of x - c and (x - c)^2 (c the running
  mean) in one call, its backward the sums of dy and dy * xhat (layers/norm.py), so that every rank
  normalises with the whole batch's statistics and the running statistics stay the same on every
  rank; the fused table layer likewise sums its counts of ids (layers/tables.py);
- dropout: each rank draws the whole batch's mask and keeps its rows (layers/core.py), the draws of
  one process exactly;
- evaluation: each rank scores its slice of a split, and the sums are all-reduced (`train.evaluate`).

So N processes follow the one-process run's trajectory, up to the order of floating-point sums.
The layers ask `active()` for the shard the step runs on: None outside a sharded step.

Where every rank is on this machine, the sums go through shared memory (local_sum.py) rather than
gloo's TCP, whose latency outweighed a step's arithmetic here (docs/parallel.md); gloo still forms the
group, agrees on the shared file and sums what that cannot take.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import sys
from dataclasses import dataclass, field

import torch

from . import local_sum
from .errors import HandgradError

# How long a collective waits for the other ranks before the run stops (a rank that died closes its
# sockets, which the others see at once, or is seen gone within 0.5 s by a shared-memory sum's wait; this
# bounds a rank that hangs instead).
TIMEOUT_S = 60
REDUCE_MODES = ("once", "buckets")
# `--reduce buckets`: about this many buckets over the gradient buffer. Over gloo a sum's cost here is mostly
# its latency (1.4-2.1 ms over local TCP on the project's machine, docs/parallel.md), not its bytes: a few
# buckets can overlap the backward, many would add up (the shared-memory sum is synchronous: no overlap)
BUCKETS = 4


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun) started this run with; 1 where none did."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise HandgradError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """The number of processes this run has or will have: the caller's group where torch.distributed
    is initialised, else the launcher's count."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return launched_world_size()


def local_device(device: torch.device) -> torch.device:
    """A GPU run of several processes on a machine: each rank on the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def rank() -> int:
    """This process's rank in its run (0 in a run of one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return launched_rank()


@contextlib.contextmanager
def quiet_unless_rank_0():
    """Rank 0 alone prints: the others' output goes nowhere (their errors are raised, not printed)."""
    if rank() == 0:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


class RankError(HandgradError):
    """An error of this rank alone (its contact with the others lost, the launcher stopping it), which
    it says itself; any other error is every rank's alike (the same settings, data and state), and
    rank 0 says it for all."""


def restarted() -> bool:
    """This process is a restart by the launcher (`torchrun --max-restarts`) of a run that failed."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


@dataclass
class Group:
    """The processes of a run: this one's rank, their number, the backend that connects them."""

    rank: int
    world: int
    backend: str
    device: torch.device = torch.device("cpu")  # where the tensors it sums must lie (NCCL: the rank's GPU)
    # the sum through shared memory where every rank is on this machine (`join` sets it); None: the backend's
    local: local_sum.SharedMemorySum | None = field(default=None, repr=False, compare=False)

    @property
    def summed_by(self) -> str:
        """What sums the tensors: "shared memory", or the backend (gloo, nccl)."""
        return "shared memory" if self.local is not None else self.backend

    @property
    def writes(self) -> bool:
        """Rank 0 alone prints and writes the run folder."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of n rows: n // world each, the first n % world ranks one more."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def all_reduce_(self, t: torch.Tensor, op=None, async_op: bool = False):
        """Sum (or `op`) `t` over the ranks, in place; a rank that is gone becomes one HandgradError.
        With `async_op`, a handle to `wait` on (the shared-memory sum is made at once, its handle done)."""
        import torch.distributed as dist

        op = op or dist.ReduceOp.SUM
        if self.local is not None and self.local.takes(t, op):
            try:
                if self.local.all_reduce_(t, op):
                    return local_sum.DONE if async_op else None
            except local_sum.LostRank as e:
                raise lost_contact(self, e) from None
        try:
            return dist.all_reduce(t, op=op, async_op=async_op)
        except RuntimeError as e:
            raise lost_contact(self, e) from None

    def wait(self, work) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise lost_contact(self, e) from None


def lost_contact(group: Group, error: Exception) -> RankError:
    text = re.sub(r"\[[^\]]*\]\s*", "", str(error)).strip()  # the backend's source positions
    first = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
    if len(first) > 120:
        first = first[:117] + "..."
    return RankError(f"rank {group.rank} of {group.world}: another process of the run stopped or cannot be "
                         f"reached ({first}); the run folder's last checkpoint is left as it was")


_group: Group | None = None


def join(device: torch.device) -> Group | None:
    """Join the processes a launcher started (WORLD_SIZE > 1 in the environment), or the group the caller
    formed already (torch.distributed initialised); None for a run of one process. gloo connects CPU
    processes, NCCL GPU ones (each rank on the GPU of its LOCAL_RANK); CPU processes that are all on
    this machine sum through shared memory (`local_sum.why_not` says when they do not)."""
    global _group
    import torch.distributed as dist

    if _group is not None:
        return _group
    if not dist.is_available():
        if launched_world_size() > 1:
            raise HandgradError("this torch build has no torch.distributed: a run of several processes needs it")
        return None
    if not dist.is_initialized():
        if launched_world_size() <= 1:
            return None
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        try:
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            # the launcher keeps its store across restarts: each attempt's keys under their own prefix, so
            # that a restarted rank never reads an address the failed attempt's processes left there
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, store=dist.PrefixStore(f"handgrad/attempt-{attempt}", store),
                                    rank=rank, world_size=world, timeout=timeout)
        except (RuntimeError, ValueError) as e:
            raise RankError(f"rank {launched_rank()}: could not join the run's processes "
                            f"({str(e).strip().splitlines()[0]})") from None
    if dist.get_world_size() <= 1:
        return None
    backend = str(dist.get_backend())
    group = Group(dist.get_rank(), dist.get_world_size(), backend, device if backend == "nccl" else torch.device("cpu"))
    if _in_main_thread():
        signal.signal(signal.SIGTERM, stopped_by_launcher)
    if backend == "gloo":
        try:
            group.local = local_sum.SharedMemorySum.open(group.rank, group.world, TIMEOUT_S,
                                                         wanted=local_sum.why_not(backend, group.world) is None)
        except local_sum.LostRank as e:
            raise lost_contact(group, e) from None
    _group = group
    return _group


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def stopped_by_launcher(signum, frame) -> None:
    """The launcher stops the other ranks when one fails: say so in one line rather than vanish."""
    rank = _group.rank if _group is not None else launched_rank()
    raise RankError(f"rank {rank}: stopped by the launcher (another process of the run failed); the run folder's "
                        "last checkpoint is left as it was")


def leave() -> None:
    """Leave the group (the end of a run the launcher started)."""
    global _group
    import torch.distributed as dist

    if _group is not None and dist.is_initialized() and launched_world_size() > 1:
        with contextlib.suppress(RuntimeError):
            dist.destroy_process_group()
    _group = None


@dataclass
class Shard:
    """The rows of the whole batch that this rank's step runs on: `rows` of `total`."""

    group: Group
    rows: slice
    total: int

    def global_count(self, x: torch.Tensor) -> int:
        """The number of positions a statistic over every axis but the last of `x` (this rank's rows)
        has over the whole batch."""
        local_rows = x.shape[0]
        per_row = x.numel() // max(local_rows, 1) // x.shape[-1]
        return self.total * per_row

    def summed(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks, as a new tensor (`t` is left as it was). In a compiled step the
        graph breaks here and the sum runs eagerly between the compiled parts."""
        return summed_over_ranks(self.group, t)

    def whole_batch_shape(self, x: torch.Tensor) -> torch.Size:
        return torch.Size((self.total, *x.shape[1:]))

    def own_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor over the whole batch."""
        return t[self.rows]


@torch.compiler.disable
def summed_over_ranks(group: Group, t: torch.Tensor) -> torch.Tensor:
    # a copy: the compiler may have made `t` share memory with other tensors of the step (a
    # concatenation's parts written straight into it), which an in-place sum would change too
    total = t.clone()
    group.all_reduce_(total)
    return total


_shard: Shard | None = None


def active() -> Shard | None:
    """The shard the current step runs on; None outside a sharded step (one process, evaluation, checks)."""
    return _shard


@contextlib.contextmanager
def sharded(shard: Shard):
    global _shard
    previous, _shard = _shard, shard
    try:
        yield shard
    finally:
        _shard = previous


class GradientReducer:
    """Sum the flat gradient buffer over the ranks: once after the backward (`once`), or in buckets,
    each started as soon as the top-level layers that fill it have run their backward (`buckets`), so
    that the sums travel while the layers below still compute.

    A parameter belongs to the first top-level layer that holds it: its gradient is complete once that
    layer's backward has run, since the backward runs the layers in reverse and any later use of the
    parameter (tied weights, a layer used twice) comes after it in the forward."""

    def __init__(self, model, group: Group, mode: str = "once", bucket_bytes: int | None = None):
        if mode not in REDUCE_MODES:
            raise HandgradError(f"unknown gradient reduction {mode!r}: choose one of {', '.join(REDUCE_MODES)}")
        self.group, self.mode = group, mode
        self.buffer = model.grad_buffer
        if self.buffer is None:
            raise HandgradError("a run of several processes needs the model's gradients in one flat buffer "
                                "(Model.to puts them there); this model's differ in device or dtype")
        self.pending: list = []
        self.ready_after: dict[str, slice] = {}
        if mode == "buckets":
            whole = self.buffer.numel() * self.buffer.element_size()
            self.ready_after = self.buckets(model, bucket_bytes or -(-whole // BUCKETS))

    def buckets(self, model, bucket_bytes: int) -> dict[str, slice]:
        """{top-level layer name: the part of the flat buffer to start summing once its backward is done}."""
        base, size = self.buffer.data_ptr(), self.buffer.element_size()
        seen: set[int] = set()
        spans = []  # (layer name, start, stop) of the parameters first met in each layer, in the forward's order
        for name, layer in model.net.layers.items():
            parts = []
            for _, g in layer.named_grads():
                if id(g) not in seen:
                    seen.add(id(g))
                    start = (g.data_ptr() - base) // size
                    parts.append((start, start + g.numel()))
            if parts:
                spans.append((name, min(a for a, _ in parts), max(b for _, b in parts)))
        tiled = (spans and spans[0][1] == 0 and spans[-1][2] == self.buffer.numel()
                 and all(a[2] == b[1] for a, b in zip(spans, spans[1:])))
        if not tiled:  # the layers' parts do not follow one another through the buffer: one sum, at the end
            return {}
        ready, stop = {}, self.buffer.numel()
        for name, start, _ in reversed(spans):  # the backward's order: from the end of the buffer down
            if (stop - start) * size >= bucket_bytes or start == 0:
                ready[name] = slice(start, stop)
                stop = start
        return ready

    def after_layer(self, name: str) -> None:
        part = self.ready_after.get(name)
        if part is not None:
            self.pending.append(self.group.all_reduce_(self.buffer[part], async_op=True))

    def finish(self, extra: torch.Tensor) -> torch.Tensor:
        """Once the backward is done: every bucket summed (or the whole buffer, in one call), and the
        few numbers `extra` with them (the loss: one sum fewer a step, each costing its latency); returns
        `extra` summed."""
        if self.mode == "once" or not self.ready_after:
            n = self.buffer.numel()
            packed = torch.cat([self.buffer, extra.to(self.buffer.dtype)])
            self.group.all_reduce_(packed)
            self.buffer.copy_(packed[:n])
            return packed[n:]
        work = self.group.all_reduce_(extra, async_op=True)
        for pending in self.pending:
            self.group.wait(pending)
        self.pending.clear()
        self.group.wait(work)
        return extra


def from_rank_0(group: Group, value: float | None) -> float | None:
    """Rank 0's number (or None), on every rank."""
    mine = torch.tensor([value if value is not None else 0.0, value is not None], dtype=torch.float64,
                        device=group.device)
    if group.rank != 0:
        mine.zero_()
    group.all_reduce_(mine)
    return float(mine[0]) if mine[1] else None


def sharded_step(model, x, y, shard: Shard, weight: float, reducer: GradientReducer, stop_vote: float):
    """One data-parallel manual step on this rank's rows `x`, `y` of the whole batch: the gradients of
    the whole batch's loss in every rank's buffers; returns (the whole batch's loss, the ranks' stop votes).

    `weight` is this rank's share of the batch's counted targets: its mean loss times it sums over
    the ranks to the whole batch's mean, and the backward from d loss = weight gives this rank's part
    of that mean's gradient, which the reducer sums, with the loss and a vote to stop (as Ctrl-C asks)."""
    with sharded(shard):
        model.zero_grad()
        loss = model.forward(x, y)
        model.backward(weight, after_layer=reducer.after_layer if reducer.ready_after else None)
        summed = reducer.finish(torch.stack([loss.detach() * weight, loss.new_tensor(stop_vote)]))
    return summed[0], float(summed[1])


class ShardedCompiledStep:
    """`sharded_step` with the forward and backward compiled: the trace of the model's fused view
    (`fastpath.fused`, its table layers at large batches) in parts, between which the sums that
    BatchNorm and the table layer exchange run eagerly; the gradients' sum, after the step, in one call.
    `weight` is fixed: every rank's share of a batch whose every target counts (not sequence data)."""

    def __init__(self, model, shard: Shard, weight: float, reducer: GradientReducer, options: dict | None = None):
        from .fastpath import compile_options, fused

        self.view, self.shard, self.weight, self.reducer = fused(model), shard, weight, reducer
        # not one graph: it breaks at each of the layers' sums over the ranks (`summed_over_ranks`)
        self._compiled = torch.compile(self._forward_backward, dynamic=False, options=compile_options(model, options))

    def _forward_backward(self, x, y):
        self.view.zero_grad()
        loss = self.view.forward(x, y)
        self.view.backward(self.weight)
        return loss

    def __call__(self, x, y, stop_vote: float):
        with sharded(self.shard), torch.no_grad():
            loss = self._compiled(x, y)
        summed = self.reducer.finish(torch.stack([loss * self.weight, loss.new_tensor(stop_vote)]))
        return summed[0], float(summed[1])


class DataParallel:
    """What a run of several processes adds to `handgrad train`'s loop, on this rank: its rows of
    every batch, the step on them (eager or compiled) with the sums over the ranks, and the check
    that the ranks' state stays one."""

    def __init__(self, group: Group, model, optimizer, batch_size: int, impl: str, reduce: str,
                 ignore_index: int | None, average=None):
        self.group, self.model, self.ignore_index = group, model, ignore_index
        self.rows = group.rows(batch_size)
        self.shard = Shard(group, self.rows, batch_size)
        self.share = (self.rows.stop - self.rows.start) / batch_size  # of the targets, where every one counts
        self.reducer = GradientReducer(model, group, reduce)
        self.compiled = ShardedCompiledStep(model, self.shard, self.share, self.reducer) if impl == "compiled" else None
        self.state = [*optimizer.params, *(t for ts in optimizer.state.values() for t in ts),
                      *(b for _, b in model.named_buffers()), *(average.average if average is not None else ())]

    def weight(self, y: torch.Tensor) -> float:
        """This rank's share of the whole batch's counted targets (sequence data pads its rows)."""
        if self.ignore_index is None:
            return self.share
        counted = y != self.ignore_index
        return float(counted[self.rows].sum()) / max(float(counted.sum()), 1.0)

    def gather(self, X: torch.Tensor, Y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the batch X[idx], Y[idx], gathered alone (data of fixed contexts, whose every
        target counts): half the gather for two processes, and tensors of their own. The compiled step
        ran its kernels 1.8x slower on a view into the whole batch (its rows at an offset) than on these."""
        own = idx[self.rows]
        return X.index_select(0, own), Y.index_select(0, own)

    def step(self, x: torch.Tensor, y: torch.Tensor, stop_requested: bool, whole: bool = True) -> tuple[torch.Tensor, bool]:
        """The step on this rank's rows: of the whole batch `x`, `y`, or with `whole` False, the rows `gather`
        gave; the whole batch's loss, and whether any rank was asked to stop (so that every rank stops after
        the same step)."""
        if whole and x.shape[0] != self.shard.total:  # a packed batch: its rows vary with the items drawn
            self.rows = self.group.rows(x.shape[0])
            self.shard = Shard(self.group, self.rows, x.shape[0])
        if self.compiled is not None:
            if whole:  # tensors of their own (`gather`)
                x, y = x[self.rows].clone(), y[self.rows].clone()
            loss, votes = self.compiled(x, y, float(stop_requested))
        else:
            weight = self.weight(y)
            if whole:
                x, y = x[self.rows], y[self.rows]
            loss, votes = sharded_step(self.model, x, y, self.shard, weight, self.reducer, float(stop_requested))
        return loss, votes > 0

    def check_same_state(self, step: int) -> None:
        check_same_state(self.group, step, [*self.state, torch.get_rng_state()])


def state_checksum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """An exact fingerprint of tensors' bits: each element's bits (as integers) times a weight that
    depends on its position, summed in int64. A change to any one element changes it."""
    total = torch.zeros((), dtype=torch.int64)
    for k, t in enumerate(tensors):
        flat = t.detach().reshape(-1).cpu()
        if flat.is_floating_point():
            flat = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()])
        bits = flat.to(torch.int64)
        weights = torch.arange(flat.numel(), dtype=torch.int64).remainder_(8191).add_(1 + 7 * k)
        total += (bits * weights).sum()
    return total


def check_same_state(group: Group, step: int, tensors: list[torch.Tensor]) -> None:
    """Stop the run if the ranks' weights, optimizer state or generators ever differ: the largest and
    the smallest checksum over the ranks must be one number."""
    import torch.distributed as dist

    mine = state_checksum(tensors)
    both = torch.stack([mine, -mine]).to(group.device)
    group.all_reduce_(both, op=dist.ReduceOp.MAX)
    if int(both[0]) != -int(both[1]):
        raise HandgradError(f"step {step}: the processes' weights or optimizer state differ (rank {group.rank}'s "
                            "checksum is not every rank's): the run is stopped; the run folder's last checkpoint "
                            "is left as it was")


def launch(nproc: int, argv: list[str]) -> int:
    """`handgrad train --nproc N`: start N processes of `handgrad train` on this machine, as
    `torchrun --standalone --nproc-per-node N -m handgrad train ...` would; their exit status."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the launcher would warn and set it
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    try:
        elastic_launch(config, sys.executable)("-m", "handgrad", *argv)
    except ChildFailedError as e:
        failure = e.get_first_failure()[1]
        if failure.exitcode < 0:  # killed by a signal: it said nothing itself
            print(f"handgrad: error: process {failure.local_rank} of {nproc} was killed "
                  f"({signal.Signals(-failure.exitcode).name}); the run folder's last checkpoint is left as it was",
                  file=sys.stderr)
            return 1
        return failure.exitcode  # the process printed its own error line
    return 0
