"""The GPU paths: `--device cuda` for check and train, and the CUDA-graph step against the eager
manual step. Skipped where there is no CUDA GPU (CI has none); run on a GPU machine with
`python -m pytest tests/test_cuda.py`. The refusals at the end run everywhere.
"""
import json

import pytest
import torch

from cli_run import QUICK, run_cli
from handgrad.errors import HandgradError
from handgrad.fastpath import CudaGraphStep, choose_impl, compiled_train_step
from handgrad.gradcheck import check_model, passed
from handgrad.model import ModelConfig, build_model
from handgrad.optim import SGD, AdamW
from handgrad.train import manual_step

TINY = ModelConfig(vocab_size=7, block_size=3, n_embd=4, n_hidden=16)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def data(n=64, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 7, (n, 3), generator=g).to(device), torch.randint(0, 7, (n,), generator=g).to(device))


def assert_same_state(a, b, atol=1e-5):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=name)
    for g, h in zip(a.grads(), b.grads()):
        torch.testing.assert_close(g, h, rtol=0, atol=atol)
    for (name, t), (_, u) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(t, u, rtol=0, atol=atol, msg=name)


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
@pytest.mark.parametrize("momentum,k", [(0.0, 1), (0.0, 4), (0.9, 2)])
def test_cuda_graph_steps_follow_the_eager_trajectory(momentum, k):
    models = [build_model(TINY, seed=3, device="cuda") for _ in range(2)]
    eager, graphed = models
    opt_e, opt_g = (SGD(m.parameters(), m.grads(), lr=0.5, momentum=momentum) for m in models)
    X, Y = data()
    step = CudaGraphStep(graphed, opt_g, steps_per_call=k)
    assert_same_state(eager, graphed, atol=0)  # recording put back everything its warm-up changed
    g = torch.Generator(device="cuda").manual_seed(1)
    params = graphed.parameters()
    for call in range(12 // k):
        idx = torch.randint(0, len(Y), (k, 16), generator=g, device="cuda")
        lr = 0.5 if call < 6 // k else 0.05  # a second learning rate: a second graph
        losses = step(X, Y, idx, lr).clone()
        for j in range(k):
            loss = manual_step(eager, X[idx[j]], Y[idx[j]])
            opt_e.step(lr)
            torch.testing.assert_close(losses[j], loss, rtol=0, atol=1e-5)
        assert_same_state(eager, graphed)
    assert all(p is q for p, q in zip(params, graphed.parameters()))
    assert int(opt_g.step_count) == int(opt_e.step_count) == 12
    assert len(step.graphs) == 2


@gpu
def test_cuda_graph_forward_backward_fills_the_optimizers_buffers():
    models = [build_model(TINY, seed=3, device="cuda") for _ in range(2)]
    eager, graphed = models
    opts = [SGD(m.parameters(), m.grads(), lr=0.5) for m in models]
    X, Y = data()
    step_fn = compiled_train_step(graphed, "cudagraph")
    losses = []
    for i in range(3):
        x, y = X[i * 16:(i + 1) * 16], Y[i * 16:(i + 1) * 16]
        loss = step_fn(graphed, x, y)
        losses.append(loss)
        torch.testing.assert_close(loss, manual_step(eager, x, y), rtol=0, atol=1e-5)
        assert_same_state(eager, graphed)
        for o in opts:
            o.step(0.5)
    assert len({float(v) for v in losses}) == 3  # each step's loss is its own tensor, not the graph's buffer


@gpu
def test_train_on_the_gpu_tracks_autograd(tmp_path, capsys):
    runs = {}
    for grad in ("manual", "autograd"):
        out = tmp_path / grad
        rc, _, err = run_cli(["train", "--device", "cuda", "--steps", "300", "--grad", grad, "-o", out, *QUICK], capsys)
        assert rc == 0, err
        runs[grad] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    manual, auto = runs["manual"], runs["autograd"]
    assert [r["step"] for r in manual] == [r["step"] for r in auto]
    for a, b in zip(manual, auto):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4, (a, b)


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
