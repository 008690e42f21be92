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


@pytest.mark.parametrize("batch", [16, 1024])  # 1,024 rows: the output Linear pads its narrow side
@pytest.mark.parametrize("name", ["mlp", "deep-mlp", "wavenet"])
def test_the_replayed_step_trains_as_the_eager_step_bit_for_bit(name, batch):
    """12 SGD steps, eagerly and replayed: the same losses and parameters, bit for bit (the replay makes
    the eager step's very calls)."""
    config = ModelConfig(model=name, **DEFAULTS[name])
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 27, (batch, config.block_size), generator=g), torch.randint(0, 27, (batch,), generator=g))
               for _ in range(12)]
    runs = []
    for replay in (False, True):
        model = build_model(config)
        opt = SGD(model.parameters(), model.grads(), lr=0.1)
        step = ReplayStep(model) if replay else (lambda x, y: manual_step(model, x, y))
        with torch.inference_mode():
            losses = []
            for x, y in batches:
                losses.append(float(step(x, y)))
                opt.step()
        runs.append((losses, [p.clone() for p in model.parameters()], step))
    assert runs[1][2].fallback is None
    assert runs[1][0] == runs[0][0]
    for p, q in zip(runs[1][1], runs[0][1]):
        assert torch.equal(p, q)
