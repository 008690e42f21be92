"""The GPU paths: `--device cuda` for check and train, and the CUDA-graph step against the eager
manual step (its trajectory test is with the compiled step's, in test_fastpath.py). Skipped where
there is no CUDA GPU (CI has none); run on a GPU machine with `python -m pytest tests/test_cuda.py
tests/test_fastpath.py`. The refusals at the end run everywhere.
"""
import json

import pytest
import torch

from cli_run import QUICK, metrics, run_cli, weights
from handgrad.errors import HandgradError
from handgrad.fastpath import CudaGraphStep, choose_impl, compiled_train_step
from handgrad.gradcheck import check_model, finite_difference_check, passed
from handgrad.layers import Tanh
from handgrad.model import ModelConfig, build_model
from handgrad.optim import SGD, AdamW
from handgrad.train import manual_step

from test_fastpath import TINY, assert_same_state
from test_fastpath import data as cpu_data

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def data(n=64, seed=0):
    return cpu_data(n, seed, device="cuda")


@gpu
@pytest.mark.parametrize("model", ["mlp", "wavenet"])
def test_gradient_check_on_the_gpu(model):
    cfg = ModelConfig(model=model, vocab_size=7, block_size=8 if model == "wavenet" else 3, n_embd=4, n_hidden=16,
                      n_layers=3 if model == "wavenet" else 1)
    m = build_model(cfg, device="cuda", dtype=torch.float64)
    x, y = data(32)
    if model == "wavenet":
        x = torch.randint(0, 7, (32, 8), device="cuda")
    results = check_model(m, x, y)
    assert passed(results), [r.name for r in results if not r.close]


@gpu
@pytest.mark.parametrize("model", ["mlp", "wavenet"])
def test_check_command_on_the_gpu(model, capsys):
    # autograd and finite differences, each compared on the GPU
    rc, out, err = run_cli(["check", "--device", "cuda", "--dtype", "float64", "--model", model], capsys)
    assert rc == 0, out + err
    assert "finite-difference" in out and out.rstrip().splitlines()[-1].startswith("PASS")


@gpu
def test_finite_differences_catch_a_wrong_backward_on_the_gpu(monkeypatch):
    m = build_model(TINY, seed=1, device="cuda", dtype=torch.float64)
    x, y = data(32)
    assert passed(finite_difference_check(m, x, y))
    monkeypatch.setattr(Tanh, "backward", lambda self, dout: dout * (1 - self.saved["out"]))  # forgot the square
    bad = {r.name for r in finite_difference_check(m, x, y) if not r.close}
    assert "linear1.weight" in bad and "linear2.weight" not in bad  # wrong from the tanh's input down


@gpu
@pytest.mark.parametrize("cfg", [
    TINY,
    ModelConfig(model="deep-mlp", vocab_size=7, block_size=3, n_embd=4, n_hidden=16, n_layers=3),
    ModelConfig(model="wavenet", vocab_size=7, block_size=8, n_embd=4, n_hidden=16, n_layers=3),
], ids=["mlp", "deep-mlp", "wavenet"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_cuda_graph_forward_backward_fills_the_optimizers_buffers(cfg, momentum):
    # the training loop's recorded step, for each model family; the update stays outside the graph
    models = [build_model(cfg, seed=3, device="cuda") for _ in range(2)]
    eager, graphed = models
    opts = [SGD(m.parameters(), m.grads(), lr=0.1, momentum=momentum) for m in models]
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 7, (64, cfg.block_size), generator=g).cuda()
    Y = torch.randint(0, 7, (64,), generator=g).cuda()
    step_fn = compiled_train_step(graphed, "cudagraph")
    losses = []
    for i in range(3):
        x, y = X[i * 16:(i + 1) * 16], Y[i * 16:(i + 1) * 16]
        loss = step_fn(graphed, x, y)
        losses.append(loss)
        torch.testing.assert_close(loss, manual_step(eager, x, y), rtol=0, atol=1e-5)
        assert_same_state(eager, graphed)
        for o in opts:
            o.step(o.lr)
    assert len({float(v) for v in losses}) == 3  # each step's loss is its own tensor, not the graph's buffer


@gpu
@pytest.mark.parametrize("model", ["mlp", "wavenet"])  # sgd and adamw, their defaults
def test_train_on_the_gpu_tracks_autograd(model, tmp_path, capsys):
    runs = {}
    for grad in ("manual", "autograd"):
        out = tmp_path / grad
        rc, stdout, err = run_cli(["train", "--device", "cuda", "--model", model, "--steps", "300", "--grad", grad,
                                   "-o", out, *QUICK], capsys)
        assert rc == 0, err
        assert ("step: manual gradients, cudagraph (auto:" in stdout) == (grad == "manual"), stdout
        runs[grad] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    manual, auto = runs["manual"], runs["autograd"]
    assert [r["step"] for r in manual] == [r["step"] for r in auto]
    for a, b in zip(manual, auto):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4, (a, b)


@gpu
def test_gpu_run_checks_as_it_goes_stops_and_resumes(tmp_path, capsys):
    # the recorded step with the gradient check between its replays, and a resumed run recording it again
    common = ["train", "--device", "cuda", "--steps", "300", "--check-every", "50", "--eval-every", "100",
              "--save-every", "0", "-n", "0"]
    rc, out, err = run_cli([*common, "-o", tmp_path / "straight"], capsys)
    assert rc == 0 and "cudagraph (auto:" in out, out + err
    rc, out, err = run_cli([*common, "-o", tmp_path / "split", "--stop-at", "150"], capsys)
    assert rc == 0 and "stopped as asked after step 150 of 300" in out, out + err
    rc, out, err = run_cli(["train", "-o", tmp_path / "split", "--resume"], capsys)
    assert rc == 0 and "cudagraph (auto:" in out and "resuming" in out, out + err
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:  # not bit for bit: the embedding's gradient sums rows with atomic adds
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
    ma, mb = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for r, q in zip(ma, mb):
        assert abs(r["train_loss"] - q["train_loss"]) < 1e-4, (r, q)


@gpu
def test_the_bench_reports_each_steps_peak_memory_on_the_gpu(capsys):
    from handgrad.cli import main

    assert main(["bench", "--device", "cuda", "--model", "transformer", "--json", "--batch-sizes", "8",
                 "--impls", "autograd,manual,manual-compiled", "--rounds", "1", "--seconds", "0.001"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["impl"] for r in rows] == ["autograd", "manual", "manual-compiled"]
    assert all(r["peak_step_bytes"] > 0 for r in rows)


def test_cuda_graph_refusals():
    model = build_model(TINY)
    with pytest.raises(HandgradError, match="CUDA"):
        CudaGraphStep(model)
    with pytest.raises(HandgradError, match="sgd and momentum"):
        CudaGraphStep(model, AdamW(model.parameters(), model.grads(), lr=1e-3))
    with pytest.raises(HandgradError, match="--device cuda"):
        choose_impl("cudagraph", "manual", 10, 32, device="cpu")
    with pytest.raises(HandgradError, match="autograd"):
        choose_impl("cudagraph", "autograd", 10, 32, device="cuda")
    assert choose_impl("cudagraph", "manual", 10, 32, device="cuda")[0] == "cudagraph"
    with pytest.raises(HandgradError, match="saved activations"):
        choose_impl("cudagraph", "manual", 10, 32, diagnostics=True, device="cuda")
