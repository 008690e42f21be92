"""The sum over the ranks of a run whose every process is on this machine: through a file in shared
memory (/dev/shm) that every rank maps, in place of gloo's all-reduce over local TCP.

gloo's all-reduce took 1.4-2.1 ms on the project's 2-core machine whatever the tensor's size
(docs/parallel.md), and a step makes three. Here a sum costs its copies and a wait: each rank copies
its tensor into its own slot, then posts the sum's sequence number in its counter; once every rank's
counter has reached it, each rank adds the slots in rank order into its tensor. Every rank makes the
same additions of the same bytes, so every rank's result is bit for bit the same.

The slots come in two sets, used by odd and even sums in turn: a rank writes a set again only after
every rank has posted the next sum, which it does once it has read this one. The counters are written
after the data, and read before it; the order in which one core's stores reach the others holds on
x86-64 (total store order), the only machines this sum is used on.

The file is sized for the tensors seen so far and grows when a larger one comes: every rank sums the
same tensors in the same order (as any collective needs), so every rank decides to grow at the same
sum, and the ranks agree on the new file over gloo. A tensor that cannot be given room (the shared
memory is full) is summed by gloo, as are other devices and types.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import platform
import time
import uuid

import torch

SLOT_ALIGN = 1 << 16  # slot sizes are rounded up to this many bytes: few growths, aligned slots
FIRST_SLOT_BYTES = 1 << 18  # 64k float32 numbers per rank: the mlp's gradients; a larger model's first sum grows it
LINE = 8  # int64s of the header per rank, one 64-byte cache line: [sequence number, pid, start time, unused...]
CHECK_EVERY_S = 0.5  # how often a wait looks whether the ranks it waits for still exist
SPIN_S = 0.01  # a wait checks the counters without sleeping this long, then sleeps SLEEP_S between checks
SLEEP_S = 0.0005
DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32, torch.float16, torch.bfloat16)


class LostRank(RuntimeError):
    """A rank this one waits for has exited, or has not posted its part in the run's timeout."""


def why_not(backend: str, world: int) -> str | None:
    """Why the ranks cannot sum through shared memory (None when they can): it needs gloo's CPU
    tensors, every rank on this machine (torchrun's LOCAL_WORLD_SIZE equal to the world: a launch on
    several nodes keeps gloo even when they share a machine), /dev/shm and an x86-64 processor.
    HANDGRAD_LOCAL_SUM=0 keeps gloo."""
    if os.environ.get("HANDGRAD_LOCAL_SUM", "1") == "0":
        return "HANDGRAD_LOCAL_SUM=0"
    if backend != "gloo":
        return f"backend {backend}"
    if os.environ.get("LOCAL_WORLD_SIZE") != str(world):
        return "not every rank is on this machine (LOCAL_WORLD_SIZE)"
    if not os.path.isdir("/dev/shm"):
        return "no /dev/shm"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"a {platform.machine()} processor"
    return None


def start_time(pid: int) -> int | None:
    """The process's start time (in clock ticks since boot, /proc/PID/stat), None if it has exited or
    is a zombie; 0 where /proc cannot say and the process exists. With the pid it names one process
    for good: a pid the system gives again later has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command's name, which may hold anything
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    return None if fields[0] in ("Z", "X", "x") else int(fields[19])


class _Done:
    """The handle of a sum already made (`async_op`): nothing to wait for."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


DONE = _Done()


class SharedMemorySum:
    """This rank's mapping of the run's shared file and its place in the sequence of sums. Made by
    `open` on every rank at once."""

    def __init__(self, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.seq = 0
        self.slot_bytes = 0
        self.limit = None  # bytes beyond which a tensor goes to gloo: room for it could not be made
        self.pids: list[tuple[int, int]] = []
        self.counters = None
        self.slots: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def open(cls, rank: int, world: int, timeout_s: float, wanted: bool = True) -> SharedMemorySum | None:
        """Map the run's shared file on every rank (a collective over gloo); None on every rank where
        any one of them does not want it (`why_not`) or cannot map it: then gloo sums everything."""
        local = cls(rank, world, timeout_s)
        try:
            agreed = _all_ranks(wanted)
        except RuntimeError as e:
            raise LostRank(_first_line(e)) from None
        return local if agreed and local._map(FIRST_SLOT_BYTES) else None

    def takes(self, t: torch.Tensor, op) -> bool:
        import torch.distributed as dist

        return (t.device.type == "cpu" and t.dtype in DTYPES and op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX)
                and (self.limit is None or t.numel() * t.element_size() <= self.limit))

    def all_reduce_(self, t: torch.Tensor, op) -> bool:
        """Sum (or MAX) `t` over the ranks, in place; False where it must go to gloo instead (every
        rank alike)."""
        import torch.distributed as dist

        size = t.numel() * t.element_size()
        if size > self.slot_bytes and not self._map(-(-size // SLOT_ALIGN) * SLOT_ALIGN):
            self.limit = self.slot_bytes
            return False
        flat = t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)
        self.seq += 1
        parts = self.slots[t.dtype][self.seq % 2, :, :flat.numel()]
        parts[self.rank].copy_(flat)
        self.counters[self.rank * LINE] = self.seq  # after the data: who sees this number sees the data
        self._wait(self.seq)
        combine = torch.add if op == dist.ReduceOp.SUM else torch.maximum
        combine(parts[0], parts[1], out=flat)
        for r in range(2, self.world):  # in rank order, the same on every rank
            combine(flat, parts[r], out=flat)
        if flat.data_ptr() != t.data_ptr():
            t.copy_(flat.view(t.shape))
        return True

    def _wait(self, seq: int) -> None:
        counters = self.counters
        waiting = [r for r in range(self.world) if r != self.rank and counters[r * LINE] < seq]
        if not waiting:
            return
        start = time.monotonic()
        check_at = start + CHECK_EVERY_S
        while True:
            waiting = [r for r in waiting if counters[r * LINE] < seq]
            if not waiting:
                return
            now = time.monotonic()
            if now - start < SPIN_S:
                os.sched_yield()  # a core shared with a rank that this one waits for goes to it
            else:
                time.sleep(SLEEP_S)  # a long wait (a checkpoint written, a step compiled) leaves the core free
            if now >= check_at:
                check_at = now + CHECK_EVERY_S
                for r in waiting:
                    pid, started = self.pids[r]
                    if start_time(pid) != started:
                        raise LostRank(f"rank {r}'s process {pid} has exited")
                if now - start > self.timeout_s:
                    raise LostRank(f"no sum from rank {waiting[0]} in {self.timeout_s:g} s")

    def _map(self, slot_bytes: int) -> bool:
        """Rank 0 makes a file of `slot_bytes` per rank and set, every rank maps it, and once all have,
        rank 0 unlinks it (the mappings stay); True on every rank if every rank mapped it and can see
        the others' processes, else False on every rank and the mapping it had stays."""
        import torch.distributed as dist

        header = self.world * LINE * 8
        size = header + 2 * self.world * slot_bytes
        made = _make_file(size) if self.rank == 0 else None
        try:
            shared = [made]
            dist.broadcast_object_list(shared, src=0)
            mapping = _map_file(shared[0], size) if shared[0] is not None else None
            if mapping is not None:
                counters = memoryview(mapping)[:header].cast("q")
                counters[self.rank * LINE + 1] = os.getpid()
                counters[self.rank * LINE + 2] = start_time(os.getpid()) or 0
            everyone = _all_ranks(mapping is not None)  # and every rank has mapped the file, or given up
        except RuntimeError as e:  # gloo: a rank gone while they agree
            raise LostRank(_first_line(e)) from None
        finally:
            if made is not None:
                with contextlib.suppress(OSError):
                    os.unlink(made)
        if not everyone:
            return False
        pids = [(int(counters[r * LINE + 1]), int(counters[r * LINE + 2])) for r in range(self.world)]
        try:
            if not _all_ranks(all(start_time(pid) == started for pid, started in pids)):  # one pid namespace
                return False
        except RuntimeError as e:
            raise LostRank(_first_line(e)) from None
        with torch.inference_mode(False):  # views of ordinary tensors, usable in and out of inference mode
            data = torch.frombuffer(mapping, dtype=torch.uint8, offset=header, count=size - header)
            data = data.view(2, self.world, slot_bytes)
            self.slots = {dtype: data.view(dtype) for dtype in DTYPES}
        self.counters, self.pids, self.slot_bytes, self.seq = counters, pids, slot_bytes, 0
        return True


def _make_file(size: int) -> str | None:
    """A new file of `size` bytes under /dev/shm, its memory taken (a full /dev/shm fails here, not at
    a write later); None where it cannot be made. Its name holds the pid and the launcher's restart
    attempt, and a random part: a restarted run never maps a failed attempt's file."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    path = f"/dev/shm/handgrad-sum-{os.getpid()}-{attempt}-{uuid.uuid4().hex[:12]}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, size)
        return path
    except OSError:
        os.unlink(path)
        return None
    finally:
        os.close(fd)


def _map_file(path: str, size: int) -> mmap.mmap | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        return mmap.mmap(fd, size) if os.fstat(fd).st_size == size else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _all_ranks(yes: bool) -> bool:
    """Whether every rank says yes (an all-reduce over gloo, so also a barrier)."""
    import torch.distributed as dist

    flag = torch.tensor([int(yes)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())



def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
