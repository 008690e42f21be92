"""What the ranks of the data-parallel tests run (started by torch.multiprocessing, gloo over local TCP,
the sums through shared memory as in a run that torchrun starts on one machine).

Each scenario runs on every rank and rank 0 saves what the test compares (torch.save to `out`)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from handgrad.parallel_bench import free_port


def run_ranks(scenario, world: int, *args) -> None:
    """`scenario(rank, world, *args)` on `world` fresh processes joined by gloo."""
    mp.start_processes(entry, args=(world, free_port(), scenario, args), nprocs=world, start_method="spawn")


def entry(rank: int, world: int, port: int, scenario, args) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # every rank on this machine, as torchrun says it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        scenario(rank, world, *args)
        # every rank done with its collectives before any leaves: a rank that tears its connections down
        # while another still reads from them can abort that one (once in CI, a SIGABRT after the run);
        # not where a scenario has a rank leave on its own
        if not getattr(scenario, "a_rank_leaves", False):
            dist.barrier()
    finally:
        dist.destroy_process_group()


def model_and_data(name: str, dtype: torch.dtype, seed: int = 3, **sizes):
    from handgrad.model import SEQUENCE_MODELS, build_model
    from handgrad.train import TrainConfig

    tc = TrainConfig(model=name, data=sizes.pop("data"), split="words" if name in SEQUENCE_MODELS else "examples",
                     **sizes).resolved()
    ds = tc.dataset()
    return build_model(tc.model_config(len(ds.vocab), ds.block_size), seed=seed, dtype=dtype), ds


def perturbed_model_and_batch(name: str, data: str, rows: int):
    """A float64 model of `name` with its parameters moved away from their initial values (unit gains
    and zero biases can hide a wrong backward), its data, and `rows` batch indices: the same on every
    call, in the ranks and in the test that compares them with one process."""
    torch.manual_seed(0)
    model, ds = model_and_data(name, torch.float64, data=data)
    for _, p in model.named_parameters():
        p.add_(torch.randn_like(p) * 0.1)
    return model, ds, torch.randint(0, len(ds.Y["train"]), (rows,))


def fit_models(rank: int, world: int, runs: list[dict], folder: str, out: str) -> None:
    """`fit` each run in `runs` (a model family, its sizes and settings) on every rank; rank 0's run
    folders are under `folder`, named by their index."""
    from handgrad import fit

    finals = []
    for k, run in enumerate(runs):
        run = dict(run)
        dtype = run.pop("dtype", torch.float32)
        model, ds = model_and_data(run.pop("model"), dtype, data=run.pop("data"), **run.pop("sizes", {}))
        finals.append(fit(model, ds, out=f"{folder}/{k}", **run).get("final"))
    if rank == 0:
        torch.save(finals, out)


def sharded_gradients(rank: int, world: int, name: str, data: str, out: str) -> None:
    """One data-parallel step's gradients (float64) on each rank's rows of one batch, and the BatchNorm
    running statistics after it, as rank 0 holds them and as every rank does."""
    from handgrad import parallel

    model, ds, idx = perturbed_model_and_batch(name, data, 37)  # not a multiple of the ranks: unequal shares
    group = parallel.join(torch.device("cpu"))
    x, y = ds.X["train"][idx], ds.Y["train"][idx]
    mine = group.rows(len(idx))
    shard = parallel.Shard(group, mine, len(idx))
    grads, buckets, losses = {}, {}, {}
    start = [b.clone() for _, b in model.named_buffers()]  # each mode's step from the same running statistics
    for mode, bucket_bytes in (("once", None), ("buckets", 256)):
        for (_, b), b0 in zip(model.named_buffers(), start):
            b.copy_(b0)
        reducer = parallel.GradientReducer(model, group, mode, bucket_bytes=bucket_bytes)
        loss, _ = parallel.sharded_step(model, x[mine], y[mine], shard, (mine.stop - mine.start) / len(idx), reducer, 0.0)
        grads[mode] = [g.clone() for g in model.grads()]
        buckets[mode], losses[mode] = len(reducer.ready_after), float(loss)
    stats = torch.cat([b.reshape(-1) for _, b in model.named_buffers()])
    every = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(every, stats)
    if rank == 0:
        torch.save({"idx": idx, "grads": grads, "buckets": buckets, "loss": losses, "stats": every}, out)


def compiled_table_gradients(rank: int, world: int, data: str, out: str) -> None:
    """The compiled step's gradients (float64) on each rank's rows of a batch large enough for the fused
    table layer (its counts summed over the ranks), after the gradients' sum."""
    from handgrad import parallel

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{os.path.dirname(out)}/compiled-{rank}"  # a fresh compile, each rank its own
    model, ds, idx = perturbed_model_and_batch("mlp", data, 601)
    group = parallel.join(torch.device("cpu"))
    mine = group.rows(len(idx))
    step = parallel.ShardedCompiledStep(model, parallel.Shard(group, mine, len(idx)), (mine.stop - mine.start) / len(idx),
                                        parallel.GradientReducer(model, group), options={"cpp_wrapper": False})
    loss, _ = step(ds.X["train"][idx][mine], ds.Y["train"][idx][mine], 0.0)
    if rank == 0:
        torch.save({"idx": idx, "loss": float(loss), "grads": [g.clone() for g in model.grads()],
                    "route": type(next(iter(step.view.net.layers.values()))).__name__}, out)


def diverging_ranks(rank: int, world: int, data: str, folder: str, out: str) -> None:
    """Rank 1's update adds a little to one weight at one step: the next evaluation must stop the run."""
    from handgrad import fit, optim

    if rank == 1:
        update = optim.SGD.update

        def update_then_drift(self, lr):
            update(self, lr)
            if self.step_count == 7:
                self.params[0].view(-1)[0] += 1e-6

        optim.SGD.update = update_then_drift
    model, ds = model_and_data("mlp", torch.float32, data=data)
    try:
        fit(model, ds, out=folder, steps=40, eval_every=10, log_every=10, check=False, num_samples=0)
        message = None
    except Exception as e:  # the run must stop with HandgradError on every rank
        message = f"{type(e).__name__}: {e}"
    messages = [None] * world
    dist.all_gather_object(messages, message)
    if rank == 0:
        torch.save(messages, out)


def sums_over_ranks(rank: int, world: int, out: str) -> None:
    """Each rank's tensors (float32, float64, int64; one number, a few, more than the shared file first
    holds, a strided view) and what `Group.all_reduce_` makes of them, SUM and MAX, through shared memory
    and through gloo; then a hundred sums in a row, each of the last one's result; then a tensor for which
    the shared file cannot grow. Every rank saves its own."""
    from handgrad import local_sum, parallel

    group = parallel.join(torch.device("cpu"))
    gen = torch.Generator().manual_seed(100 + rank)
    cases = []
    for dtype in (torch.float32, torch.float64, torch.int64):
        for n in (1, 7, 5000, 100_000):
            if dtype.is_floating_point:  # values of every size: their sums round
                scale = 10.0 ** torch.randint(-30, 30, (n,), generator=gen)
                x = (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)
            else:
                x = torch.randint(-2**40, 2**40, (n,), generator=gen)
            for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX):
                shared, by_gloo = x.clone(), x.clone()
                group.all_reduce_(shared, op=op)
                dist.all_reduce(by_gloo, op=op)
                cases.append((str(dtype), n, str(op), x, shared, by_gloo))
    wide = torch.randn(6, 8, generator=gen)
    wide_before = wide.clone()
    strided = wide[:, ::2]  # not contiguous: summed in a copy, written back
    group.wait(group.all_reduce_(strided, async_op=True))
    chain = []
    t = torch.tensor([1.0 + rank], dtype=torch.float64)
    for _ in range(100):  # the two sets of slots used in turn, again and again
        group.all_reduce_(t)
        chain.append(float(t))
        t.mul_(0.25).add_(rank)
    local_sum._make_file = lambda size: None  # as where /dev/shm is full: no room for a larger tensor
    seq = group.local.seq
    larger = torch.full((group.local.slot_bytes // 4 + 1,), 1.0 + rank)
    group.all_reduce_(larger)  # through gloo, and every larger one after it
    after = torch.tensor([1.0 + rank])
    group.all_reduce_(after)  # through shared memory still
    fallback = {"larger": float(larger.min()), "limit": group.local.limit == group.local.slot_bytes,
                "after": float(after), "sums": group.local.seq - seq}
    torch.save({"summed_by": group.summed_by, "cases": cases, "wide": (wide_before, wide), "chain": chain,
                "fallback": fallback}, f"{out}-{rank}.pt")


def either_sum(rank: int, world: int, data: str, folder: str, out: str) -> None:
    """A short run summed through shared memory, then the same run with the group's sums left to gloo."""
    from handgrad import fit, parallel

    group = parallel.join(torch.device("cpu"))
    used = []
    for name in ("shared", "gloo"):
        if name == "gloo":
            group.local = None
        used.append(group.summed_by)
        model, ds = model_and_data("mlp", torch.float32, data=data)
        fit(model, ds, out=f"{folder}/{name}", steps=30, batch_size=64, eval_every=10, log_every=5, check=False,
            num_samples=0)
    if rank == 0:
        torch.save(used, out)


def a_rank_that_is_gone(rank: int, world: int, out: str) -> None:
    """Rank 0 waits in a sum that rank 1 never makes: a signal's handler (the launcher's SIGTERM, as
    `join` installs it) interrupts the wait; then rank 1 exits, and the next sum says so."""
    import signal
    import time

    from handgrad import parallel

    group = parallel.join(torch.device("cpu"))
    if rank != 0:
        time.sleep(1.0)
        os._exit(0)
    messages = []
    signal.signal(signal.SIGALRM, parallel.stopped_by_launcher)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    for _ in range(2):
        start = time.monotonic()
        try:
            group.all_reduce_(torch.ones(3))
            messages.append(None)
        except parallel.RankError as e:
            messages.append((str(e), time.monotonic() - start))
    torch.save({"summed_by": group.summed_by, "messages": messages}, out)


a_rank_that_is_gone.a_rank_leaves = True
