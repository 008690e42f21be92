"""`handgrad bench`: the shape of its JSON and table, with tiny settings. No timing is asserted."""
import json

import pytest

from handgrad.bench import BenchConfig, format_table, make_runner, matmul_flops, run_bench
from handgrad.cli import main
from handgrad.errors import HandgradError
from handgrad.model import ModelConfig, build_model


def test_json_shape(capsys):
    assert main(["bench", "--json", "--batch-sizes", "4,1024", "--impls", "autograd,manual,manual-replay",
                 "--rounds", "2", "--seconds", "0.001"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["results"]
    assert [(r["impl"], r["batch_size"]) for r in rows] == [
        ("autograd", 4), ("manual", 4), ("manual-replay", 4), ("autograd", 1024), ("manual", 1024), ("manual-replay", 1024)]
    for r in rows:
        assert {"impl", "batch_size", "steps_per_s", "threads", "device"} <= set(r)
        assert r["steps_per_s"] > 0 and r["threads"] == 1 and r["device"] == "cpu"
        assert r["min_steps_per_s"] <= r["median_steps_per_s"] <= r["steps_per_s"]
        assert r["peak_step_bytes"] is None  # counted on a GPU only
    assert [r["vs_autograd"] for r in rows if r["impl"] == "autograd"] == [1.0, 1.0]
    assert {"cpu", "torch", "python", "handgrad"} <= set(report["machine"])
    assert [m["batch_size"] for m in report["matmul"]] == [4, 1024]
    assert "vs autograd" in format_table(report)


def test_flops_of_the_seed_model():
    model = build_model(ModelConfig())
    # forward x W, backward x^T dy and dy W^T, for Linear(30, 200) and Linear(200, 27)
    assert matmul_flops(model, 8192) == 6 * 8192 * (30 * 200 + 200 * 27)


def test_unknown_impl_and_bad_threads():
    with pytest.raises(HandgradError, match="unknown implementation"):
        make_runner("fast", ModelConfig(), 4, None, None, "cpu", 0)
    with pytest.raises(HandgradError, match="threads"):
        run_bench(BenchConfig(threads=0))


def test_cuda_graphs_need_a_gpu(capsys):
    rc = main(["bench", "--impls", "manual-cudagraph", "--batch-sizes", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "CUDA graphs need the model on a CUDA device" in err[0]


def test_keep_freed_memory_where_the_c_library_is_glibc():
    import platform

    from handgrad.allocator import keep_freed_memory, keeps_freed_memory

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
    assert keep_freed_memory() is glibc  # setting it again is harmless
    assert keeps_freed_memory() is glibc  # what the bench reports


@pytest.mark.parametrize("model", ["gru", "transformer"])
def test_other_families_report_tokens_and_the_bytes_kept(model, capsys):
    assert main(["bench", "--model", model, "--json", "--batch-sizes", "8", "--impls", "autograd,manual,manual-replay",
                 "--rounds", "1", "--seconds", "0.001"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["model"] == model and report["config"]["model_config"]["sequences"]
    rows = report["results"]
    assert [r["impl"] for r in rows] == ["autograd", "manual", "manual-replay"]
    assert all(r["tokens_per_s"] > r["steps_per_s"] * 8 for r in rows)  # several predictions a row
    (mem,) = report["memory"]
    assert mem["batch_size"] == 8 and mem["manual_bytes"] > 0 and mem["autograd_bytes"] > 0
    assert mem["ratio"] == pytest.approx(mem["manual_bytes"] / mem["autograd_bytes"])
    assert report["matmul"] == []  # the seed's matmul figures only


def test_the_bytes_kept_count_each_storage_once():
    """A saved view of a saved tensor costs nothing more; the parameters are left out."""
    import torch

    from handgrad.bench import storages

    a = torch.zeros(100)
    w = torch.zeros(10)
    assert storages([a, a[10:], a.view(10, 10)], exclude=set()) == 400
    assert storages([a, w], exclude={w.untyped_storage().data_ptr()}) == 400


def test_the_transformer_times_its_compiled_manual_step_by_default():
    from handgrad.bench import default_impls

    assert default_impls(64, "cpu", "transformer") == ["autograd", "autograd-compiled", "manual", "manual-replay",
                                                       "manual-compiled"]
    assert "manual-compiled" not in default_impls(128, "cpu", "gru")  # a Python loop over positions: not compiled here


def test_the_transformer_keeps_at_most_six_tenths_of_autograds_bytes():
    """The fused transformer recomputes LayerNorm's and GELU's outputs and the attention weights: on a
    batch of padded names it keeps well under autograd's bytes, dropout masks included."""
    import torch

    from handgrad.bench import saved_bytes
    from handgrad.data import make_sequence_dataset

    ds = make_sequence_dataset(None)
    for dropout in (0.0, 0.2):
        config = ModelConfig(model="transformer", vocab_size=len(ds.vocab), block_size=ds.block_size, n_embd=16,
                             n_hidden=64, n_layers=2, n_heads=2, dropout=dropout, sequences=True)
        kept = saved_bytes(build_model(config, device=torch.device("cpu")), ds.X["train"], ds.Y["train"], 8)
        assert kept["ratio"] <= 0.6, (dropout, kept)


def test_packed_batches_are_timed_at_the_row_count_training_compiles(names_txt):
    """A packed batch of another row count than the usual one would cost a compiled runner a compile in
    a timed round: every runner pads a batch of fewer rows up to the usual count, as training pads it,
    and draws again where a batch packs to more."""
    import torch

    from handgrad.data import IGNORE, usual_packed_rows
    from handgrad.train import TrainConfig

    tc = TrainConfig(model="transformer", data=str(names_txt)).resolved()
    ds = tc.dataset()
    mc = tc.model_config(len(ds.vocab), ds.block_size)
    X, Y = ds.X["train"], ds.Y["train"]
    r = make_runner("manual", mc, 16, X, Y, torch.device("cpu"), 0)
    r.pack = True
    free = {r.batch()[0].shape[0] for _ in range(300)}
    assert len(free) > 1  # 16 names pack to 8 rows mostly, sometimes to 16
    r.rows = usual_packed_rows(Y, 16)
    kept = [r.batch() for _ in range(300)]
    assert {x.shape[0] for x, _ in kept} == {r.rows}
    assert all(int((y != IGNORE).sum()) > 16 for _, y in kept)  # real names in them, not an empty batch
