"""Data-parallel training: N processes follow the one-process run (parallel.py, train.fit).

The ranks run in processes of their own (gloo over local TCP, the sums through shared memory:
local_sum.py): through torch.multiprocessing for the Python API (tests/parallel_worker.py), through
torchrun for the command line (test_parallel_cli.py)."""
from __future__ import annotations

import json
import re

import pytest
import torch

import parallel_worker as pw
from handgrad import fit, parallel
from handgrad.errors import HandgradError
from handgrad.fastpath import manual_step
from handgrad.layers import BatchNorm1dStepwise


def logged(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(one: list[dict], many: list[dict], tol: float) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in many]
    for a, b in zip(one, many):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= tol, (a["step"], key, a[key], b[key])


# every family, at sizes small enough for a few seconds each; the recurrent ones with dropout (each
# rank keeps its rows of the whole batch's mask), the BatchNorm ones with their statistics shared
RUNS = [
    dict(model="mlp", steps=60),
    dict(model="deep-mlp", sizes=dict(n_hidden=32, n_layers=3), steps=40),
    dict(model="wavenet", sizes=dict(n_hidden=32, n_embd=8), steps=40, batch_size=30),
    dict(model="transformer", sizes=dict(n_embd=16, n_hidden=32, n_layers=2, n_heads=2), steps=30, batch_size=16),
    dict(model="rnn", sizes=dict(n_hidden=32), steps=30, batch_size=16),
    dict(model="gru", sizes=dict(n_hidden=24, n_layers=2), steps=30, batch_size=15),
    dict(model="lstm", sizes=dict(n_hidden=24, n_layers=2), steps=30, batch_size=16),
    dict(model="wavenet", sizes=dict(n_hidden=16, n_embd=8), steps=30, dtype=torch.float64),
    dict(model="mlp", steps=40, dtype=torch.float64),
]
COMMON = dict(log_every=5, eval_every=10, save_every=0, num_samples=0)


def test_two_processes_follow_one_for_every_model(tmp_path, names_txt):
    few = tmp_path / "names-3000.txt"  # a tenth of names.txt: each run's evaluations take a tenth of the time
    few.write_text("\n".join(names_txt.read_text().split()[::10]) + "\n")
    runs = [dict(run, data=str(few), check=k == 0, **COMMON) for k, run in enumerate(RUNS)]
    pw.run_ranks(pw.fit_models, 2, runs, str(tmp_path / "two"), str(tmp_path / "finals.pt"))
    finals_two = torch.load(tmp_path / "finals.pt")
    for k, run in enumerate(runs):
        run = dict(run)
        dtype = run.pop("dtype", torch.float32)
        model, ds = pw.model_and_data(run.pop("model"), dtype, data=run.pop("data"), **run.pop("sizes", {}))
        final_one = fit(model, ds, out=str(tmp_path / "one" / str(k)), **run)["final"]
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert_same_losses(logged(tmp_path / "one" / str(k)), logged(tmp_path / "two" / str(k)), tol)
        for split in final_one:
            assert abs(final_one[split] - finals_two[k][split]) <= tol, (RUNS[k], split)
        meta = json.loads((tmp_path / "two" / str(k) / "run.json").read_text())
        assert (meta["world_size"], meta["backend"]) == (2, "gloo")


@pytest.mark.parametrize("name", ["mlp", "wavenet"])
def test_batchnorm_shared_across_ranks_gives_the_whole_batch_gradient(tmp_path, names_txt, name):
    """Two ranks on unequal slices (19 and 18 rows) of one batch: the summed gradients are one process's
    on the whole batch (float64), bucketed or not, and every rank's running statistics are the same."""
    pw.run_ranks(pw.sharded_gradients, 2, name, str(names_txt), str(tmp_path / "g.pt"))
    got = torch.load(tmp_path / "g.pt")
    model, ds, idx = pw.perturbed_model_and_batch(name, str(names_txt), 37)
    assert torch.equal(idx, got["idx"])
    with torch.inference_mode():
        loss = manual_step(model, ds.X["train"][idx], ds.Y["train"][idx])
    whole = model.grads()
    assert got["buckets"]["once"] == 0 and got["buckets"]["buckets"] > 2  # several buckets really formed
    for mode in ("once", "buckets"):
        assert abs(got["loss"][mode] - float(loss)) < 1e-12
        for (n, _), g, w in zip(model.named_parameters(), got["grads"][mode], whole):
            assert torch.allclose(g, w, rtol=1e-10, atol=1e-12), (mode, n, (g - w).abs().max())
    for a, b in zip(got["grads"]["once"], got["grads"]["buckets"]):
        assert torch.equal(a, b)  # a sum of two numbers is the same in either order
    assert all(torch.equal(s, got["stats"][0]) for s in got["stats"])


def test_the_compiled_step_shares_the_fused_table_layers_counts(tmp_path, names_txt):
    """At 601 rows the compiled step's first layer is the fused table layer, whose BatchNorm statistics
    come from counts of ids: summed over two ranks, the gradients are one process's (float64)."""
    pw.run_ranks(pw.compiled_table_gradients, 2, str(names_txt), str(tmp_path / "c.pt"))
    got = torch.load(tmp_path / "c.pt")
    assert got["route"] == "EmbeddingLinearBatchNormTanh"
    model, ds, idx = pw.perturbed_model_and_batch("mlp", str(names_txt), 601)
    assert torch.equal(idx, got["idx"])
    with torch.inference_mode():
        loss = manual_step(model, ds.X["train"][idx], ds.Y["train"][idx])
    assert abs(got["loss"] - float(loss)) < 1e-12
    for (n, _), g, w in zip(model.named_parameters(), got["grads"], model.grads()):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12), (n, (g - w).abs().max())


def test_ranks_that_drift_apart_stop_the_run(tmp_path, names_txt):
    pw.run_ranks(pw.diverging_ranks, 2, str(names_txt), str(tmp_path / "run"), str(tmp_path / "m.pt"))
    messages = torch.load(tmp_path / "m.pt")
    for m in messages:
        assert m is not None and m.startswith("HandgradError: step 10: the processes' weights or optimizer state differ")


def test_the_shared_memory_sum_is_exact_and_the_same_on_every_rank(tmp_path):
    """SUM and MAX over two ranks, float32, float64 and int64, through shared memory: the two ranks'
    tensors added (or compared) as one process adds them, bit for bit gloo's, and the same bits on both
    ranks, including a tensor larger than the shared file first holds (it grows) and a strided one; gloo
    where it cannot grow."""
    pw.run_ranks(pw.sums_over_ranks, 2, str(tmp_path / "sums"))
    ranks = [torch.load(tmp_path / f"sums-{r}.pt") for r in range(2)]
    assert [r["summed_by"] for r in ranks] == ["shared memory"] * 2
    assert len(ranks[0]["cases"]) == 3 * 4 * 2
    for a, b in zip(ranks[0]["cases"], ranks[1]["cases"]):
        (dtype, n, op, x0, shared, by_gloo), x1 = a, b[3]
        expected = x0 + x1 if op.endswith("SUM") else torch.maximum(x0, x1)
        assert torch.equal(shared, expected), (dtype, n, op)
        assert torch.equal(shared, by_gloo), (dtype, n, op)
        assert torch.equal(shared.view(-1).view(torch.uint8), b[4].view(-1).view(torch.uint8)), (dtype, n, op)
    (w0, summed0), (w1, summed1) = ranks[0]["wide"], ranks[1]["wide"]
    assert torch.equal(summed0[:, ::2], w0[:, ::2] + w1[:, ::2]) and torch.equal(summed1[:, ::2], summed0[:, ::2])
    assert torch.equal(summed0[:, 1::2], w0[:, 1::2])  # the strided view summed, the columns between left as they were
    expected, t = [], [1.0, 2.0]
    for _ in range(100):
        total = t[0] + t[1]
        expected.append(total)
        t = [total * 0.25 + r for r in range(2)]
    assert ranks[0]["chain"] == ranks[1]["chain"] == expected
    for r in ranks:  # a tensor the file could not grow for went to gloo; the next small one did not
        assert r["fallback"] == {"larger": 3.0, "limit": True, "after": 3.0, "sums": 1}


def test_a_local_run_sums_through_shared_memory_and_gloo_gives_the_same_losses(tmp_path, names_txt):
    pw.run_ranks(pw.either_sum, 2, str(names_txt), str(tmp_path), str(tmp_path / "used.pt"))
    assert torch.load(tmp_path / "used.pt") == ["shared memory", "gloo"]
    shared, by_gloo = ([{k: v for k, v in r.items() if k != "elapsed"} for r in logged(tmp_path / name)]
                       for name in ("shared", "gloo"))
    assert shared == by_gloo and len(shared) > 6  # a sum of two numbers: the same either way, bit for bit


def test_a_wait_for_a_rank_is_interrupted_by_a_signal_and_ends_when_the_rank_is_gone(tmp_path):
    pw.run_ranks(pw.a_rank_that_is_gone, 2, str(tmp_path / "gone.pt"))
    got = torch.load(tmp_path / "gone.pt")
    assert got["summed_by"] == "shared memory"
    (stopped, t_stopped), (lost, t_lost) = got["messages"]
    assert stopped.startswith("rank 0: stopped by the launcher") and t_stopped < 1.0
    assert re.fullmatch(r"rank 0 of 2: another process of the run stopped or cannot be reached \(rank 1's process "
                        r"\d+ has exited\); the run folder's last checkpoint is left as it was", lost), lost
    assert t_lost < 3.0  # rank 1 exits 0.7 s into this wait, which looks every 0.5 s


def test_the_shared_memory_sum_applies_to_gloo_ranks_all_on_this_machine(monkeypatch):
    from handgrad import local_sum

    monkeypatch.delenv("HANDGRAD_LOCAL_SUM", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert local_sum.why_not("gloo", 2) is None
    assert local_sum.why_not("nccl", 2) == "backend nccl"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # torchrun --nnodes 2 --nproc-per-node 1, even on one machine
    assert "not every rank is on this machine" in local_sum.why_not("gloo", 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # a group formed by the caller, who did not say
    assert "not every rank is on this machine" in local_sum.why_not("gloo", 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("HANDGRAD_LOCAL_SUM", "0")
    assert local_sum.why_not("gloo", 2) == "HANDGRAD_LOCAL_SUM=0"
    assert parallel.Group(0, 2, "gloo").summed_by == "gloo"


def test_a_process_that_has_exited_is_gone_even_before_it_is_reaped():
    import os
    import subprocess
    import sys

    from handgrad import local_sum

    assert local_sum.start_time(os.getpid()) > 0
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie, which os.kill still finds
    os.kill(child.pid, 0)
    assert local_sum.start_time(child.pid) is None
    child.wait()
    assert local_sum.start_time(child.pid) is None


def test_rows_split_the_batch_in_order():
    for n in (1, 2, 7, 32, 37):
        for world in (1, 2, 3, 4):
            if n < world:
                continue
            parts = [parallel.Group(r, world, "gloo").rows(n) for r in range(world)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_checksum_sees_any_one_change():
    torch.manual_seed(0)
    tensors = [torch.randn(50), torch.randn(3, 4).double(), torch.arange(5)]
    base = parallel.state_checksum(tensors)
    for k, t in enumerate(tensors):
        for i in range(t.numel()):
            changed = [u.clone() for u in tensors]
            flat = changed[k].view(-1)
            flat[i] = flat[i] + (1 if not flat.is_floating_point() else flat[i].abs() * 1e-7 + 1e-30)
            assert parallel.state_checksum(changed) != base
    swapped = [tensors[0].flip(0), *tensors[1:]]
    assert parallel.state_checksum(swapped) != base


def test_buckets_tile_the_gradient_buffer(names_txt):
    model, _ = pw.model_and_data("wavenet", torch.float32, data=str(names_txt))
    group = parallel.Group(0, 2, "gloo")  # no communication is made by the constructor
    reducer = parallel.GradientReducer(model, group, "buckets", bucket_bytes=1024)
    parts = sorted((s.start, s.stop) for s in reducer.ready_after.values())
    assert parts[0][0] == 0 and parts[-1][1] == model.grad_buffer.numel()
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])) and len(parts) > 2
    big = parallel.GradientReducer(model, group, "buckets", bucket_bytes=1 << 30)
    assert list(big.ready_after.values()) == [slice(0, model.grad_buffer.numel())]


@pytest.mark.parametrize("settings, message", [
    (dict(grad="autograd"), "--grad autograd runs in one process"),
    (dict(impl="replay"), "--impl replay runs in one process"),
    (dict(diagnostics=True), "--diagnostics measures one process's activations"),
    (dict(batch_size=1), "--batch-size 1 is smaller than the 2 processes"),
])
def test_what_several_processes_cannot_do_is_refused(tmp_path, names_txt, monkeypatch, settings, message):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group is joined
    model, ds = pw.model_and_data("mlp", torch.float32, data=str(names_txt))
    with pytest.raises(HandgradError, match=message):
        fit(model, ds, out=str(tmp_path / "r"), steps=10, **settings)
    assert not (tmp_path / "r").exists()


def test_batch_statistics_of_one_process_only_are_refused(tmp_path, names_txt, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model, ds = pw.model_and_data("mlp", torch.float32, data=str(names_txt))
    name = next(n for n, layer in model.net.layers.items() if "running_var" in layer.buffers)
    stepwise = BatchNorm1dStepwise(model.net.layers[name].params["weight"].numel())
    model.net.layers[name] = stepwise
    model.to()
    with pytest.raises(HandgradError, match="BatchNorm1dStepwise.*keeps batch statistics of its own process's rows"):
        fit(model, ds, out=str(tmp_path / "r"), steps=10)


def test_the_processes_bench_reports_each_configuration_against_one_process(names_txt):
    from handgrad.parallel_bench import ParallelBenchConfig, format_parallel_table, run_parallel_bench

    cfg = ParallelBenchConfig(processes=(1, 2), batch_size=64, data=str(names_txt), rounds=1, seconds=0.2,
                              steps=("eager",), reduces=("buckets",))  # three runs: one process, two with each sum
    report = run_parallel_bench(cfg, log=lambda line: None)
    rows = {(r["step"], r["processes"], r["reduce"], r["sum"]): r for r in report["results"]}
    one = ("eager", 1, "none", "none")
    assert set(rows) == {one, ("eager", 2, "buckets", "shared"), ("eager", 2, "buckets", "gloo")}
    assert rows[one]["vs_1_process"] == 1.0
    for r in rows.values():
        assert r["steps_per_s"] > 0 and r["vs_1_process"] == r["steps_per_s"] / rows[one]["steps_per_s"]
    table = format_parallel_table(report)
    assert "buckets" in table and "shared" in table and "gloo" in table
