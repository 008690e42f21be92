import pytest
import torch

from handgrad.fastpath import ReplayStep, manual_step
from handgrad.model import DEFAULTS, ModelConfig, build_model
from handgrad.optim import SGD


def seed_get_params(vocab_size=27, n_embd=10, block_size=3, n_hidden=200):
    """Verbatim from the seed notebook."""
    torch.manual_seed(42)
    C = torch.randn(vocab_size, n_embd)
    w1 = torch.randn(n_embd * block_size, n_hidden) * (n_embd * block_size)**-0.5
    w2 = torch.randn(n_hidden, vocab_size) * (5/3) * (n_hidden)**-0.5 * 0.1
    b2 = torch.randn(vocab_size) * 0
    bnw = torch.ones(n_hidden)
    bnb = torch.zeros(n_hidden)
    return [C, w1, w2, b2, bnw, bnb]


def test_mlp_init_is_the_seeds_bit_for_bit():
    C, w1, w2, b2, bnw, bnb = seed_get_params()
    p = dict(build_model(ModelConfig(), seed=42).named_parameters())
    assert torch.equal(p["embedding.weight"], C)
    assert torch.equal(p["linear1.weight"], w1)
    assert torch.equal(p["linear2.weight"], w2)
    assert torch.equal(p["linear2.bias"], b2)
    assert torch.equal(p["batchnorm1.weight"], bnw)
    assert torch.equal(p["batchnorm1.bias"], bnb)
    assert "linear1.bias" not in p


def test_seed_forward_matches_the_notebook_formula():
    C, w1, w2, b2, bnw, bnb = seed_get_params()
    model = build_model(ModelConfig(), seed=42)
    x = torch.randint(0, 27, (32, 3), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 27, (32,), generator=torch.Generator().manual_seed(2))
    emb = C[x].view(32, -1)
    hpre = emb @ w1
    hbn = (hpre - hpre.mean(0, keepdim=True)) / torch.sqrt(hpre.var(0, keepdim=True, unbiased=False) + 1e-5) * bnw + bnb
    logits = torch.tanh(hbn) @ w2 + b2
    ref = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(model.forward(x, y), ref)


def test_grads_are_the_buffers_backward_fills():
    model = build_model(ModelConfig())
    grads = model.grads()
    ids = [id(g) for g in grads]
    x = torch.randint(0, 27, (8, 3))
    y = torch.randint(0, 27, (8,))
    with torch.no_grad():
        model.forward(x, y)
        model.backward()
    assert [id(g) for g in model.grads()] == ids
    assert all(g.abs().sum() > 0 for g in grads)


def test_narrow_by_columns_lays_out_the_narrow_linears_only():
    rows = build_model(ModelConfig())
    cols = build_model(ModelConfig(), narrow_by_columns=True)
    w1, w2 = cols.net.layers["linear1"].params["weight"], cols.net.layers["linear2"].params["weight"]
    assert w1.is_contiguous()  # 30 -> 200: by rows
    assert not w2.is_contiguous() and w2.T.is_contiguous()  # 200 -> 27: by columns
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rows.named_parameters(), cols.named_parameters()))
    assert [g.stride() for g in cols.grads()] == [p.stride() for p in cols.parameters()]
    assert cols.param_buffer is not None and cols.grad_buffer is not None  # still one tensor each
    opt = SGD(cols.parameters(), cols.grads(), lr=0.1)
    assert opt.flat is not None


@pytest.mark.parametrize("name", ["mlp", "deep-mlp", "wavenet"])
def test_a_model_by_columns_trains_as_the_model_by_rows(name):
    """Eagerly and replayed, 12 SGD steps: the same losses and parameters (the layout changes which
    kernels the matmuls run, not what they compute)."""
    config = ModelConfig(model=name, **DEFAULTS[name])
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 27, (16, config.block_size), generator=g), torch.randint(0, 27, (16,), generator=g))
               for _ in range(12)]
    runs = []
    for by_columns, replay in ((False, False), (True, False), (True, True)):
        model = build_model(config, narrow_by_columns=by_columns)
        opt = SGD(model.parameters(), model.grads(), lr=0.1)
        step = ReplayStep(model) if replay else (lambda x, y: manual_step(model, x, y))
        with torch.inference_mode():
            losses = []
            for x, y in batches:
                losses.append(float(step(x, y)))
                opt.step()
        runs.append((losses, [p.clone() for p in model.parameters()]))
    for losses, params in runs[1:]:
        assert losses == pytest.approx(runs[0][0], rel=1e-6, abs=0)
        for p, q in zip(params, runs[0][1]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
