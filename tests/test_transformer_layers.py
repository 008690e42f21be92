"""The transformer's other layers (LayerNorm, GELU, Dropout, the position table, the token table over
repeated ids) against autograd and five-point central differences in float64, with randomised
parameters and random upstream gradients; planted wrong backwards caught; and the whole transformer
composed from them, checked and trained against autograd."""
import pytest
import torch
import torch.nn.functional as F

from handgrad.data import IGNORE, make_sequence_dataset
from handgrad.errors import HandgradError
from handgrad.fastpath import ReplayStep, manual_step
from handgrad.gradcheck import check_layer, check_model, finite_difference_check, passed
from handgrad.layers import (GELU, CausalSelfAttention, CausalSelfAttentionStepwise, Dropout, Embedding, LayerNorm,
                             LayerNormStepwise, Linear, PositionEmbedding, Residual, Sequential, TiedLinear)
from handgrad.layers.core import GELU_CUBIC, GELU_SCALE, dropout_mask, keep_probability
from handgrad.loss import CrossEntropy
from handgrad.model import Model, ModelConfig
from handgrad.optim import make_optimizer
from handgrad.train import autograd_step
from layer_checks import assert_ok, randn


def randomised(layer, seed=0):
    """Every parameter drawn at random: unit gains and zero shifts can hide a wrong backward."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in layer.named_parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return layer


SHAPES = [(4, 5), (2, 1, 6), (3, 4, 6), (2, 7, 3)]


# ---- LayerNorm


@pytest.mark.parametrize("cls", [LayerNorm, LayerNormStepwise])
@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm(cls, shape):
    layer = randomised(cls(shape[-1]).to(dtype=torch.float64), seed=len(shape))
    results = check_layer(layer, randn(*shape, seed=1) * 2 + 0.5, dout=randn(*shape, seed=2))
    assert_ok(results)
    assert {r.name for r in results} == {"input", "weight", "bias"}


@pytest.mark.parametrize("cls", [LayerNorm, LayerNormStepwise])
def test_layernorm_passes_in_float32(cls):
    layer = randomised(cls(8).to(dtype=torch.float32))
    assert_ok(check_layer(layer, randn(3, 5, 8, seed=1, dtype=torch.float32)))


def test_layernorm_is_torchs_and_the_two_forms_agree():
    fused, stepwise = randomised(LayerNorm(6).to(dtype=torch.float64)), randomised(LayerNormStepwise(6).to(dtype=torch.float64))
    x, dout = randn(3, 4, 6, seed=1), randn(3, 4, 6, seed=2)
    with torch.no_grad():
        out = fused.forward(x)
        torch.testing.assert_close(out, F.layer_norm(x, (6,), fused.params["weight"], fused.params["bias"], 1e-5),
                                   rtol=0, atol=1e-14)
        torch.testing.assert_close(stepwise.forward(x), out, rtol=0, atol=1e-14)
        torch.testing.assert_close(stepwise.backward(dout), fused.backward(dout), rtol=0, atol=1e-13)
    assert set(dict(stepwise.named_intermediates())) == set(LayerNormStepwise.inspectable)


def test_layernorm_keeps_its_input_and_the_row_statistics_only():
    layer = LayerNorm(6).to(dtype=torch.float64)
    x = randn(3, 4, 6, seed=1)
    with torch.no_grad():
        layer.forward(x)
    assert set(layer.saved) == {"x", "mean", "rstd"}
    assert layer.saved["x"] is x
    assert layer.saved["mean"].shape == layer.saved["rstd"].shape == (3, 4, 1)
    torch.testing.assert_close(layer.saved["rstd"], (x.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt())


class LayerNormWithoutMeanTerm(LayerNorm):
    """A planted error: dx = rstd * (dxhat - xhat * mean(dxhat * xhat)), the mean(dxhat) term left out."""

    def backward(self, dout):
        s = self.saved
        xhat = (s["x"] - s["mean"]) * s["rstd"]
        self.grads["weight"].add_((dout * xhat).sum(tuple(range(dout.ndim - 1))))
        self.grads["bias"].add_(dout.sum(tuple(range(dout.ndim - 1))))
        dxhat = dout * self.params["weight"]
        return (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True)) * s["rstd"]


def test_check_catches_a_layernorm_backward_missing_the_mean_term():
    layer = randomised(LayerNormWithoutMeanTerm(5).to(dtype=torch.float64))
    results = check_layer(layer, randn(3, 4, 5, seed=1), dout=randn(3, 4, 5, seed=2))
    failed = {(r.name, r.kind) for r in results if not r.close}
    assert failed == {("input", "intermediate"), ("input", "finite-difference")}  # the parameters' are right


def test_layernorm_refuses_the_wrong_width():
    with pytest.raises(HandgradError, match="6 channels"):
        LayerNorm(6).forward(torch.randn(2, 5))


# ---- GELU


@pytest.mark.parametrize("shape", SHAPES)
def test_gelu(shape):
    assert_ok(check_layer(GELU(), randn(*shape, seed=1) * 3, dout=randn(*shape, seed=2)))


def test_gelu_passes_in_float32():
    assert_ok(check_layer(GELU(), randn(4, 3, 6, seed=1, dtype=torch.float32) * 3))


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    out = GELU().forward(x)
    tanh_form = 0.5 * x * (1 + torch.tanh(GELU_SCALE * (x + GELU_CUBIC * x**3)))
    torch.testing.assert_close(out, tanh_form, rtol=0, atol=1e-15)
    assert (out - F.gelu(x)).abs().max() > 1e-4  # not the erf form


class GELUWithErfDerivative(GELU):
    """A planted error: the derivative of the exact (erf) GELU, Phi(x) + x phi(x), for the tanh form."""

    def backward(self, dout):
        x = self.saved["x"]
        cdf = 0.5 * (1 + torch.erf(x / 2**0.5))
        pdf = torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5
        return dout * (cdf + x * pdf)


def test_check_catches_a_gelu_derivative_of_the_wrong_form():
    results = check_layer(GELUWithErfDerivative(), randn(3, 4, 5, seed=1) * 2, dout=randn(3, 4, 5, seed=2))
    assert {(r.name, r.kind) for r in results if not r.close} == {("input", "intermediate"),
                                                                  ("input", "finite-difference")}


# ---- Dropout


class SeededDropout(Dropout):
    """Dropout drawing the same mask on every call (the generator reseeded first), so that the
    check's autograd forward, manual forward and finite differences all see one mask."""

    def forward(self, x):
        torch.manual_seed(123)
        return super().forward(x)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 6)])
def test_dropout(p, shape):
    state = torch.get_rng_state()
    try:
        layer = SeededDropout(p)
        assert_ok(check_layer(layer, randn(*shape, seed=1), dout=randn(*shape, seed=2)))
        with torch.no_grad():
            layer.forward(randn(*shape, seed=1))
        mask = layer.saved["mask"]
        assert set(mask.unique().tolist()) <= {0.0, 1 / keep_probability(p)}
        assert 0 < torch.count_nonzero(mask) < mask.numel()
    finally:
        torch.set_rng_state(state)


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_a_dropout_mask_keeps_each_entry_with_probability_1_minus_p(p, same_generator_state):
    """Four 16-bit numbers from each 64-bit draw: the fraction kept, in every one of the four lanes and
    over rows and columns, is 1 - p to sampling noise; the mask's values are 0 and 1 / k, its mean 1."""
    k = keep_probability(p)
    assert abs(k - (1 - p)) <= 2**-17
    mask = dropout_mask(torch.empty(400, 250, dtype=torch.float64), p)
    kept = (mask != 0).double()
    assert set(mask.unique().tolist()) == {0.0, 1 / k}
    sd = (k * (1 - k) / kept.numel()) ** 0.5
    assert abs(float(kept.mean()) - k) < 5 * sd
    lanes = kept.view(-1, 4).mean(0)  # the four numbers of each 64-bit draw
    assert float((lanes - k).abs().max()) < 5 * 2 * sd
    assert float((kept.mean(1) - k).abs().max()) < 5 * (k * (1 - k) / 250) ** 0.5
    assert not torch.equal(dropout_mask(torch.empty(400, 250), p), dropout_mask(torch.empty(400, 250), p))


@pytest.fixture
def same_generator_state():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def test_dropout_backward_uses_the_forwards_mask():
    layer = Dropout(0.5).to(dtype=torch.float64)
    x, dout = randn(50, 40, seed=1), randn(50, 40, seed=2)
    with torch.no_grad():
        out = layer.forward(x)
        dx = layer.backward(dout)
    kept = out != 0
    assert 0.45 < kept.double().mean() < 0.55
    torch.testing.assert_close(out[kept], 2 * x[kept], rtol=0, atol=0)
    torch.testing.assert_close(dx[kept], 2 * dout[kept], rtol=0, atol=0)
    assert torch.count_nonzero(dx[~kept]) == 0


def test_dropout_is_the_identity_in_eval_and_at_zero():
    x = randn(4, 5, seed=1)
    layer = Dropout(0.5)
    with torch.no_grad():
        layer.forward(x)
        assert "mask" in layer.saved
        layer.eval()
        assert layer.forward(x) is x
        assert layer.backward(x) is x  # no mask from an earlier training call is used
    assert Dropout(0.0).forward(x) is x
    with pytest.raises(HandgradError, match="dropout"):
        Dropout(1.0)


def dropout_model():
    torch.manual_seed(3)
    net = Sequential([("embedding", Embedding(7, 8)), ("dropout", Dropout(0.3)), ("linear", Linear(8, 7))])
    return Model(ModelConfig(vocab_size=7, block_size=1), net).to()


def test_a_replayed_step_draws_a_new_dropout_mask_each_call_as_the_eager_step_does():
    x, y = torch.randint(0, 7, (16,), generator=torch.Generator().manual_seed(0)), torch.arange(16) % 7
    state = torch.get_rng_state()
    try:
        replayed, eager = dropout_model(), dropout_model()
        step = ReplayStep(replayed)
        torch.manual_seed(5)
        replay_losses = [step(x, y) for _ in range(4)]  # recorded, checked against eager, then replayed twice
        assert step.fallback is None and len(step.recordings) == 1
        torch.manual_seed(5)
        with torch.no_grad():
            eager_losses = [manual_step(eager, x, y) for _ in range(4)]
        assert [float(v) for v in replay_losses] == [float(v) for v in eager_losses]
        assert len({float(v) for v in replay_losses}) == 4  # the same weights: only the masks differ
        for (name, g), (_, h) in zip(replayed.net.named_grads(), eager.net.named_grads()):
            assert torch.equal(g, h), name
    finally:
        torch.set_rng_state(state)


# ---- the position and token tables


@pytest.mark.parametrize("time", [1, 4, 6])
def test_position_embedding(time):
    layer = PositionEmbedding(6, 5).to(dtype=torch.float64)
    results = check_layer(layer, randn(3, time, 5, seed=1), dout=randn(3, time, 5, seed=2))
    assert_ok(results)
    with torch.no_grad():
        layer.zero_grad()
        layer.forward(randn(3, time, 5, seed=1))
        layer.backward(randn(3, time, 5, seed=2))
    assert torch.count_nonzero(layer.grads["weight"][time:]) == 0  # positions not used get nothing
    torch.testing.assert_close(layer.grads["weight"][:time], randn(3, time, 5, seed=2).sum(0))


def test_position_embedding_refuses_a_longer_context():
    with pytest.raises(HandgradError, match="table of 4"):
        PositionEmbedding(4, 3).forward(torch.randn(2, 5, 3))


def test_the_token_tables_gradient_adds_over_repeated_ids():
    layer = Embedding(3, 4).to(dtype=torch.float64)
    idx = torch.tensor([[0, 2, 0, 0, 1, 2], [2, 2, 0, 1, 0, 0]])  # every id several times
    dout = randn(2, 6, 4, seed=2)
    assert_ok(check_layer(layer, idx, dout=dout))
    with torch.no_grad():
        layer.zero_grad()
        layer.forward(idx)
        layer.backward(dout)
    for i in range(3):
        torch.testing.assert_close(layer.grads["weight"][i], dout[idx == i].sum(0), rtol=0, atol=1e-14)


# ---- the transformer composed of these layers


def transformer(vocab, block_size, n_embd=8, n_head=2, n_layers=2, stepwise=False, tied=False, dtype=torch.float64):
    """token table -> position table -> n_layers x [x + attention(LN(x)), x + MLP(LN(x))] -> LN -> output,
    every parameter randomised; a handgrad Model with the cross-entropy over real targets only."""
    attention = CausalSelfAttentionStepwise if stepwise else CausalSelfAttention
    norm = LayerNormStepwise if stepwise else LayerNorm
    torch.manual_seed(7)
    tokens = Embedding(vocab, n_embd)
    layers = [("token_embedding", tokens), ("position_embedding", PositionEmbedding(block_size, n_embd))]
    for i in range(1, n_layers + 1):
        layers.append((f"attention{i}", Residual(Sequential([
            ("ln", norm(n_embd)), ("attn", attention(n_embd, n_head, block_size))]))))
        layers.append((f"mlp{i}", Residual(Sequential([
            ("ln", norm(n_embd)), ("fc", Linear(n_embd, 4 * n_embd)), ("gelu", GELU()),
            ("proj", Linear(4 * n_embd, n_embd))]))))
    layers += [("ln_f", norm(n_embd)), ("head", TiedLinear(tokens) if tied else Linear(n_embd, vocab))]
    model = Model(ModelConfig(vocab_size=vocab, block_size=block_size, n_embd=n_embd, n_layers=n_layers),
                  Sequential(layers))
    model.loss_fn = CrossEntropy(ignore_index=IGNORE)
    model.to(dtype=dtype)
    gen = torch.Generator().manual_seed(11)
    for _, p in model.named_parameters():  # gains near 1, shifts and biases away from 0
        p.add_(torch.randn(p.shape, generator=gen, dtype=dtype) * (0.3 if p.ndim == 1 else 0.05))
    return model


@pytest.fixture(scope="module")
def sequences():
    from conftest import NAMES_TXT
    if not NAMES_TXT.exists():
        pytest.skip(f"seed data set not found at {NAMES_TXT}")
    return make_sequence_dataset(NAMES_TXT)


def batch(data, rows, seed):
    idx = torch.randint(0, data.X["train"].shape[0], (rows,), generator=torch.Generator().manual_seed(seed))
    return data.X["train"][idx], data.Y["train"][idx]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stepwise,tied", [(False, False), (True, False), (False, True), (True, True)])
def test_the_transformer_passes_the_model_check(sequences, dtype, stepwise, tied):
    model = transformer(len(sequences.vocab), sequences.block_size, stepwise=stepwise, tied=tied, dtype=dtype)
    x, y = batch(sequences, 6, seed=1)
    assert (y == IGNORE).any() and x.shape[1] == sequences.block_size  # padding, and the full context
    results = check_model(model, x, y)
    bad = [(r.name, r.max_abs_diff, r.rel_diff) for r in results if not r.close]
    assert not bad, bad
    names = {r.name for r in results if r.kind == "intermediate"}
    params = [r.name for r in results if r.kind == "parameter"]
    assert params == [n for n, _ in model.named_parameters()]
    assert ("head.weight" in params) != tied  # the tied head's weight is the token table, listed once
    for i in (1, 2):
        assert {f"attention{i}.out", f"attention{i}.attn.out", f"mlp{i}.gelu.out"} <= names
        if stepwise:
            # every intermediate of the chain (kept: only with attention dropout, which this model has not)
            assert {f"attention{i}.attn.{n}" for n in CausalSelfAttentionStepwise.inspectable if n != "kept"} <= names
            assert {f"attention{i}.ln.{n}" for n in LayerNormStepwise.inspectable} <= names
    if dtype == torch.float64:
        fd = finite_difference_check(model, x, y, samples_per_param=3)
        assert passed(fd), [(r.name, r.max_abs_diff) for r in fd if not r.close]


@pytest.mark.parametrize("stepwise,tied", [(False, False), (True, True)])
def test_the_transformer_trains_as_autograd_does(sequences, stepwise, tied):
    """50 AdamW steps, manual backward against autograd's gradients in the same buffers, float64."""
    vocab, block = len(sequences.vocab), sequences.block_size
    manual, reference = (transformer(vocab, block, stepwise=stepwise, tied=tied) for _ in range(2))
    opt_manual = make_optimizer("adamw", manual, lr=1e-2, weight_decay=0.1)
    opt_reference = make_optimizer("adamw", reference, lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(50):
        x, y = batch(sequences, 16, seed=100 + step)
        with torch.no_grad():
            manual.zero_grad()
            loss = manual.forward(x, y)
            manual.backward()
        opt_manual.step()
        reference_loss = autograd_step(reference, x, y)
        opt_reference.step()
        assert abs(float(loss) - float(reference_loss)) <= 1e-6, step
        worst = max(float((p - q).abs().max()) for p, q in zip(manual.parameters(), reference.parameters()))
        assert worst <= 1e-6, (step, worst)
        losses.append(float(loss))
    assert sum(losses[-5:]) < sum(losses[:5]) - 1.0  # it learned: the comparison is of a moving model
