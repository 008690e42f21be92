"""The compiled fast path against the eager manual path, step by step: losses, weights,
gradient buffers and BatchNorm running statistics; and the choice `handgrad train` makes.

One tiny model per test keeps compile times to seconds.
"""
import pytest
import torch

from handgrad.errors import HandgradError
from handgrad.fastpath import CompiledStep, CudaGraphStep, choose_impl, compiled_train_step, fused
from handgrad.model import ModelConfig, build_model
from handgrad.optim import SGD, AdamW
from handgrad.train import manual_step

TINY = ModelConfig(vocab_size=7, block_size=3, n_embd=4, n_hidden=16)


def data(n=64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, (n, 3), generator=g).to(device), torch.randint(0, 7, (n,), generator=g).to(device)


def pair(momentum=0.0, device="cpu"):
    models = [build_model(TINY, seed=3, device=device) for _ in range(2)]
    opts = [SGD(m.parameters(), m.grads(), lr=0.5, momentum=momentum) for m in models]
    return models, opts


def assert_same_state(a, b, atol=1e-5):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=name)
    for g, h in zip(a.grads(), b.grads()):
        torch.testing.assert_close(g, h, rtol=0, atol=atol)
    for (name, t), (_, u) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(t, u, rtol=0, atol=atol, msg=name)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# batch 16 takes the embedding's and first Linear's own route, batch 64 their precomputed tables;
# the CUDA-graph step runs the same trajectory on a GPU
@pytest.mark.parametrize("kind,momentum,k,lrs,batch", [
    ("compiled", 0.0, 2, (0.5, 0.05), 16), ("compiled", 0.9, 1, (0.5,), 16), ("compiled", 0.0, 1, (0.5,), 64),
    pytest.param("cudagraph", 0.0, 4, (0.5, 0.05), 16, marks=needs_gpu),
    pytest.param("cudagraph", 0.9, 1, (0.5, 0.05), 64, marks=needs_gpu),
])
def test_fast_steps_follow_the_eager_trajectory(kind, momentum, k, lrs, batch):
    device = "cuda" if kind == "cudagraph" else "cpu"
    (eager, fast), (opt_e, opt_f) = pair(momentum, device)
    X, Y = data(device=device)
    step = CompiledStep(fast, opt_f, steps_per_call=k) if kind == "compiled" else CudaGraphStep(fast, opt_f, steps_per_call=k)
    assert_same_state(eager, fast, atol=0)  # setting up changed nothing (a recording puts back what its warm-up changed)
    g = torch.Generator(device=device).manual_seed(1)
    params = fast.parameters()
    grads = opt_f.grads
    calls = 12 // k
    for call in range(calls):
        idx = torch.randint(0, len(Y), (k, batch), generator=g, device=device)
        lr = lrs[0] if call < calls // 2 else lrs[-1]  # a second learning rate: a second graph
        losses = step(X, Y, idx, lr).clone()
        for j in range(k):
            loss = manual_step(eager, X[idx[j]], Y[idx[j]])
            opt_e.step(lr)
            torch.testing.assert_close(losses[j], loss, rtol=0, atol=1e-5)
        assert_same_state(eager, fast)
    # the very tensors the optimizer holds were updated in place
    assert all(p is q for p, q in zip(params, fast.parameters()))
    assert all(g is h for g, h in zip(grads, fast.grads()))
    assert int(opt_f.step_count) == int(opt_e.step_count) == 12
    if kind == "compiled":
        assert step.compile_seconds > 0
    else:
        assert len(step.graphs) == len(set(lrs))


def test_fused_view_shares_the_models_tensors():
    model = build_model(TINY)
    view = fused(model)
    assert list(view.net.layers)[0] == "embedding+linear1+batchnorm1+tanh1"
    assert list(view.net.layers)[1:] == list(model.net.layers)[5:]
    # the same tensors in the same order: a check of the view compares the optimizer's own buffers
    assert [id(t) for t in view.parameters()] == [id(t) for t in model.parameters()]
    assert [id(t) for t in view.grads()] == [id(t) for t in model.grads()]
    assert [id(t) for _, t in view.named_buffers()] == [id(t) for _, t in model.named_buffers()]
    wavenet = build_model(ModelConfig(model="wavenet", vocab_size=7, block_size=4, n_embd=3, n_hidden=8, n_layers=2))
    assert fused(wavenet) is wavenet  # no Embedding -> Flatten -> Linear run to fuse
    stepwise = build_model(ModelConfig(**{**TINY.to_dict(), "stepwise": True}))  # its BatchNorm keeps its chain
    assert list(fused(stepwise).net.layers)[:2] == ["embedding+linear1", "batchnorm1"]


def test_compiled_forward_backward_fills_the_optimizers_buffers():
    (eager, compiled), (opt_e, opt_c) = pair()
    X, Y = data()
    step_fn = compiled_train_step(compiled)
    for i in range(3):
        x, y = X[i * 16:(i + 1) * 16], Y[i * 16:(i + 1) * 16]
        torch.testing.assert_close(step_fn(compiled, x, y), manual_step(eager, x, y), rtol=0, atol=1e-5)
        assert_same_state(eager, compiled)
        opt_e.step(0.5)
        opt_c.step(0.5)
    assert all(g.abs().sum() > 0 for g in opt_c.grads)


def test_compiled_step_refuses_what_it_cannot_do():
    model = build_model(TINY)
    with pytest.raises(HandgradError, match="sgd and momentum"):
        CompiledStep(model, AdamW(model.parameters(), model.grads(), lr=1e-3))
    with pytest.raises(HandgradError, match="update between"):
        CompiledStep(model, None, steps_per_call=2)
    step = CompiledStep(model, SGD(model.parameters(), model.grads(), lr=0.1), steps_per_call=2)
    X, Y = data()
    with pytest.raises(HandgradError, match="shape"):
        step(X, Y, torch.zeros(3, 4, dtype=torch.long))
    model.eval()
    with pytest.raises(HandgradError, match="training mode"):
        step(X, Y, torch.zeros(2, 4, dtype=torch.long))


def test_the_compiled_step_merges_the_backwards_recomputations_with_the_forward():
    """`ComputeOnce` on the graph the compiler gets from a transformer step (dropout on): the backward's
    recomputation of the attention weights (the scores' product and their softmax), of the output they
    gave, and of GELU's sigmoid merge with the forward's; each random draw stays its own; the graph's
    results, from one generator state, are bit for bit those it gave before."""
    from torch._dynamo.backends.common import aot_autograd

    from handgrad.fastpath import run_steps
    from handgrad.graph_passes import ComputeOnce

    aten = torch.ops.aten
    config = ModelConfig(model="transformer", vocab_size=7, block_size=6, n_embd=8, n_hidden=16, n_layers=1,
                         n_heads=2, dropout=0.2, attn_dropout=0.2, sequences=True)
    model = build_model(config, seed=1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(1, 7, (4, 6), generator=g), torch.randint(0, 7, (4, 6), generator=g)
    calls = []

    def keep_the_graph(gm, example_inputs):  # the graph a compiler gets, run as it is with the real inputs
        return lambda *args: calls.append((gm, args)) or gm(*args)

    torch._dynamo.reset()
    step = torch.compile(lambda x, y: run_steps(model, None, 1, x, y, None, None),
                         backend=aot_autograd(fw_compiler=keep_the_graph), fullgraph=True)
    with torch.no_grad():
        step(x, y)
    gm, args = calls[0]
    ops = (aten.baddbmm.default, aten._softmax.default, aten.bmm.default, aten.sigmoid.default, aten.randint.low)

    def count():
        return [sum(n.target is op for n in gm.graph.nodes) for op in ops]

    assert count() == [2, 2, 6, 2, 4]
    torch.manual_seed(3)
    want = gm(*args)
    ComputeOnce()(gm.graph)
    gm.recompile()
    assert count() == [1, 1, 5, 1, 4]
    torch.manual_seed(3)
    got = gm(*args)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_compute_once_merges_nothing_across_a_write_nor_a_tensor_written_into_nor_a_random_draw():
    from handgrad.graph_passes import ComputeOnce

    aten = torch.ops.aten
    graph = torch.fx.Graph()
    a = graph.placeholder("a")
    doubled = [graph.call_function(aten.mul.Tensor, (a, 2.0)) for _ in range(2)]
    draws = [graph.call_function(aten.rand.default, ([3],), {"device": torch.device("cpu"), "pin_memory": False})
             for _ in range(2)]
    buffers = [graph.call_function(aten.mul.Tensor, (a, 3.0)) for _ in range(2)]
    graph.call_function(aten.add_.Tensor, (buffers[0], 1.0))  # written into: its twin is another tensor
    graph.call_function(aten.add_.Tensor, (a, 1.0))  # a write: a read after it is another value
    after = graph.call_function(aten.mul.Tensor, (a, 2.0))
    graph.output((*doubled, *draws, after, *buffers))
    ComputeOnce()(graph)
    d1, d2, r1, r2, later, b1, b2 = torch.fx.GraphModule({}, graph)(torch.ones(3))
    assert d1 is d2 and torch.equal(d1, torch.full((3,), 2.0))  # one computation, read twice
    assert not torch.equal(r1, r2)
    assert torch.equal(later, torch.full((3,), 4.0))
    assert torch.equal(b1, torch.full((3,), 4.0)) and torch.equal(b2, torch.full((3,), 3.0))


def test_choose_impl():
    assert choose_impl("auto", "manual", 10_000, 32)[0] == "replay"
    impl, why = choose_impl("auto", "manual", 10**7, 64)  # small batches: no faster compiled, however long
    assert impl == "replay" and "no faster" in why
    assert choose_impl("auto", "manual", 10_000, 8192)[0] == "compiled"
    assert choose_impl("auto", "manual", 100, 8192)[0] == "replay"  # too short to repay a compile
    assert choose_impl("auto", "manual", 10_000, 8192, threads=2)[0] == "replay"
    assert choose_impl("auto", "manual", 10_000, 8192, diagnostics=True)[0] == "eager"
    assert choose_impl("auto", "autograd", 10_000, 8192)[0] == "eager"
    assert choose_impl("compiled", "manual", 10, 32)[0] == "compiled"
    assert choose_impl("replay", "manual", 10**9, 8192)[0] == "replay"
    assert choose_impl("eager", "manual", 10**9, 32)[0] == "eager"
    assert choose_impl("auto", "manual", 100, 32, device="cuda")[0] == "cudagraph"
    assert choose_impl("auto", "manual", 100, 32, diagnostics=True, device="cuda")[0] == "eager"
    assert choose_impl("auto", "autograd", 100, 32, device="cuda")[0] == "eager"
    with pytest.raises(HandgradError):
        choose_impl("compiled", "autograd", 10, 32)
    with pytest.raises(HandgradError, match="autograd"):
        choose_impl("replay", "autograd", 10, 32)
    with pytest.raises(HandgradError, match="--impl eager"):
        choose_impl("replay", "manual", 10, 32, diagnostics=True)
    with pytest.raises(HandgradError):
        choose_impl("fast", "manual", 10, 32)
