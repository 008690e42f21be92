"""Data-parallel training: N processes follow the one-process run (parallel.py, train.fit).

The ranks run in processes of their own (gloo over local TCP): through torch.multiprocessing for the
Python API (tests/parallel_worker.py), through torchrun for the command line (test_parallel_cli.py)."""
from __future__ import annotations

import json

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
                              steps=("eager",))
    report = run_parallel_bench(cfg, log=lambda line: None)
    rows = {(r["step"], r["processes"], r["reduce"]): r for r in report["results"]}
    assert set(rows) == {("eager", 1, "none"), ("eager", 2, "once"), ("eager", 2, "buckets")}
    assert rows[("eager", 1, "none")]["vs_1_process"] == 1.0
    for r in rows.values():
        assert r["steps_per_s"] > 0 and r["vs_1_process"] == r["steps_per_s"] / rows[("eager", 1, "none")]["steps_per_s"]
    assert "buckets" in format_parallel_table(report)
