"""Causal self-attention, fused and stepwise: against autograd and five-point central differences in
float64 (and float32), over several shapes, with random upstream gradients and randomised parameters;
causality; a planted leak of gradient into future positions caught by the check."""
import pytest
import torch

from handgrad.errors import HandgradError
from handgrad.gradcheck import check_layer, passed
from handgrad.layers import CausalSelfAttention, CausalSelfAttentionStepwise
from handgrad.layers.core import keep_probability
from layer_checks import assert_ok, randn

FORMS = [CausalSelfAttention, CausalSelfAttentionStepwise]

# (batch, time, channels, heads, block size): T = 1, T = the block size, one head, several, a head of width 1
SHAPES = [(2, 1, 4, 1, 5), (2, 5, 6, 2, 5), (3, 4, 8, 4, 6), (1, 6, 6, 3, 6), (2, 3, 4, 4, 3), (2, 6, 4, 1, 6)]


def attention(cls, channels, heads, block_size, bias=True, dtype=torch.float64, seed=0):
    """A layer whose every parameter is drawn at random, biases included (zero biases hide a wrong backward)."""
    layer = cls(channels, heads, block_size, bias=bias).to(dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    for _, p in layer.named_parameters():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.7)
    return layer


@pytest.mark.parametrize("cls", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_against_autograd_and_finite_differences(cls, shape):
    B, T, C, H, block = shape
    layer = attention(cls, C, H, block, seed=sum(shape))
    results = check_layer(layer, randn(B, T, C, seed=1), dout=randn(B, T, C, seed=2))
    assert_ok(results)
    assert {r.name for r in results} == {"input", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias"}


@pytest.mark.parametrize("cls", FORMS)
def test_attention_without_biases(cls):
    layer = attention(cls, 6, 2, 4, bias=False)
    results = check_layer(layer, randn(2, 4, 6, seed=1))
    assert_ok(results)
    assert {r.name for r in results} == {"input", "qkv_weight", "proj_weight"}


@pytest.mark.parametrize("cls", FORMS)
@pytest.mark.parametrize("shape", [(2, 1, 4, 2, 4), (3, 8, 8, 2, 8), (2, 5, 12, 3, 7)])
def test_attention_passes_in_float32(cls, shape):
    B, T, C, H, block = shape
    layer = attention(cls, C, H, block, dtype=torch.float32)
    # these gradients' entries reach about 40, where a float32 step is 4e-6: the input's and qkv weight's
    # differ from autograd's by up to 1.1e-5 (relative 3.4e-7) on an AMD EPYC core, within 1e-5 on an
    # Intel Xeon; the relative bound stays float32's own
    assert_ok(check_layer(layer, randn(B, T, C, seed=1, dtype=torch.float32),
                          dout=randn(B, T, C, seed=2, dtype=torch.float32), atol=3e-5))


def test_fused_and_stepwise_compute_the_same_numbers():
    fused, stepwise = attention(CausalSelfAttention, 8, 4, 6), attention(CausalSelfAttentionStepwise, 8, 4, 6)
    x, dout = randn(3, 6, 8, seed=1), randn(3, 6, 8, seed=2)
    with torch.no_grad():
        outs = [layer.forward(x) for layer in (fused, stepwise)]
        dxs = [layer.backward(dout) for layer in (fused, stepwise)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-13)
    torch.testing.assert_close(dxs[0], dxs[1], rtol=0, atol=1e-13)
    for name, g in fused.grads.items():
        torch.testing.assert_close(g, stepwise.grads[name], rtol=0, atol=1e-12)


def test_stepwise_lists_every_intermediate_with_its_gradient():
    layer = attention(CausalSelfAttentionStepwise, 6, 3, 5)
    x = randn(2, 5, 6, seed=1)
    with torch.no_grad():
        layer.forward(x)
        layer.backward(randn(2, 5, 6, seed=2))
    intermediates, grads = dict(layer.named_intermediates()), dict(layer.named_intermediate_grads())
    assert set(intermediates) == set(CausalSelfAttentionStepwise.inspectable) - {"kept"}  # kept: with dropout
    assert set(intermediates) <= set(grads)
    for name, t in intermediates.items():
        assert grads[name].shape == t.shape, name
    assert intermediates["att"].shape == (2, 3, 5, 5)


@pytest.mark.parametrize("cls", FORMS)
def test_an_output_depends_on_its_position_and_the_past_only(cls):
    """Changing the input at position t leaves every output before t exactly as it was, and the
    gradient of outputs before t0 reaches no input at t0 or later: exactly zero there."""
    layer = attention(cls, 8, 2, 6)
    x, dout = randn(2, 6, 8, seed=1), randn(2, 6, 8, seed=2)
    with torch.no_grad():
        out = layer.forward(x)
        changed = x.clone()
        changed[:, 4:] += 1.0
        assert torch.equal(layer.forward(changed)[:, :4], out[:, :4])
        dout[:, 3:] = 0  # only the outputs at positions 0..2 reach the loss
        layer.forward(x)
        dx = layer.backward(dout)
    assert torch.count_nonzero(dx[:, 3:]) == 0
    assert torch.count_nonzero(dx[:, :3]) == dx[:, :3].numel()


def test_the_softmax_gives_future_scores_exactly_zero_gradient():
    """att is exactly 0 at future keys (exp(-inf)), so the softmax's backward, att * (d att - ...), is too:
    the stepwise form's masking step then has nothing to zero."""
    layer = attention(CausalSelfAttentionStepwise, 6, 2, 5)
    with torch.no_grad():
        layer.forward(randn(2, 5, 6, seed=1))
        layer.backward(randn(2, 5, 6, seed=2))
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert torch.count_nonzero(layer.saved["att"][..., future]) == 0
    assert torch.count_nonzero(layer.saved_grads["masked"][..., future]) == 0
    assert torch.count_nonzero(layer.saved_grads["masked"][..., ~future]) > 0


class LeakyMaskAttention(CausalSelfAttention):
    """A planted error: d scores takes the upstream d att at the masked (future) entries, as though the
    mask were the identity there, instead of the zero the mask gives them."""

    def softmax_backward(self, att, datt):
        T = att.shape[-1]
        leaked = datt.masked_fill(self.mask[:T, :T] == 0, 0.0)  # d att at the future keys only
        return super().softmax_backward(att, datt).add_(leaked)


class LeakyMaskAttentionStepwise(CausalSelfAttentionStepwise):
    """The same planted error in the stepwise chain: the masking step passes d att through at future keys."""

    def mask_backward(self, dmasked, future):
        return dmasked + self.saved_grads["att"] * future


@pytest.mark.parametrize("leaky", [LeakyMaskAttention, LeakyMaskAttentionStepwise])
def test_check_catches_gradient_leaking_into_future_positions(leaky):
    layer = attention(leaky, 6, 2, 5)
    x, dout = randn(2, 5, 6, seed=1), randn(2, 5, 6, seed=2)
    results = check_layer(layer, x, dout=dout)
    assert not passed(results)
    failed = {(r.name, r.kind) for r in results if not r.close}
    # q's and k's gradients are wrong, hence the qkv weight's and the input's, by both references
    assert {("input", "intermediate"), ("qkv_weight", "parameter"), ("input", "finite-difference"),
            ("qkv_weight", "finite-difference")} <= failed
    # the v columns and the output projection are untouched by the leak: their gradients still pass
    assert ("proj_weight", "parameter") not in failed
    # and the leak is one into the future: an output's gradient reaches later positions' inputs
    dout[:, 2:] = 0
    with torch.no_grad():
        layer.forward(x)
        assert torch.count_nonzero(layer.backward(dout)[:, 2:]) > 0


def test_attention_refuses_what_it_cannot_take():
    with pytest.raises(HandgradError, match="heads"):
        CausalSelfAttention(10, 3, 4)
    layer = CausalSelfAttention(8, 2, 4)
    with pytest.raises(HandgradError, match="context of 4"):
        layer.forward(torch.randn(2, 5, 8))
    with pytest.raises(HandgradError, match="8"):
        layer.forward(torch.randn(2, 3, 6))


def test_the_fused_form_keeps_its_input_and_the_heads_only():
    layer = attention(CausalSelfAttention, 8, 2, 6)
    x = randn(3, 6, 8, seed=1)
    with torch.no_grad():
        layer.forward(x)
    assert set(layer.saved) == {"x", "heads"}
    assert layer.saved["x"].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # a reference, no copy
    assert layer.saved["heads"].shape == (3, 3 * 2, 6, 4)
    # the backward's att, recomputed from the heads, is the stepwise form's att to rounding
    stepwise = CausalSelfAttentionStepwise(8, 2, 6).to(dtype=torch.float64)
    for name, p in layer.params.items():
        stepwise.params[name].copy_(p)
    with torch.no_grad():
        stepwise.forward(x)
        att = layer.saved_attention()
    assert att.shape == (3 * 2, 6, 6)
    torch.testing.assert_close(att, stepwise.saved["att"].reshape(6, 6, 6), rtol=0, atol=1e-14)
    # float64: the mask moved with the layer
    assert layer.mask.dtype == torch.float64


# ---- dropout of the attention weights


class SeededDropout:
    """Dropout 0.3 on the attention weights, the mask drawn from one seed in every forward: the check's
    forwards (autograd's, the manual one, each finite difference's) all see one mask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, dropout=0.3, **kwargs)

    def forward(self, x):
        torch.manual_seed(123)
        return super().forward(x)


class Maskless:
    """A planted error: the backward passes d kept through as d att, the dropped weights' gradient included."""

    @staticmethod
    def dropout_backward(dkept, mask):
        return dkept


class SeededDropoutAttention(SeededDropout, CausalSelfAttention):
    pass


class SeededDropoutAttentionStepwise(SeededDropout, CausalSelfAttentionStepwise):
    pass


class MasklessDropoutAttention(Maskless, SeededDropout, CausalSelfAttention):
    pass


class MasklessDropoutAttentionStepwise(Maskless, SeededDropout, CausalSelfAttentionStepwise):
    pass


@pytest.fixture
def same_generator():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.mark.parametrize("cls", [SeededDropoutAttention, SeededDropoutAttentionStepwise])
@pytest.mark.parametrize("shape", SHAPES[1:4])
def test_attention_dropout_against_autograd_and_finite_differences(cls, shape, same_generator):
    B, T, C, H, block = shape
    layer = attention(cls, C, H, block, seed=sum(shape))
    assert_ok(check_layer(layer, randn(B, T, C, seed=1), dout=randn(B, T, C, seed=2)))
    with torch.no_grad():
        layer.forward(randn(B, T, C, seed=1))
    mask = layer.saved["att_mask"]
    assert set(mask.unique().tolist()) <= {0.0, 1 / keep_probability(0.3)} and 0 < torch.count_nonzero(mask) < mask.numel()


def test_attention_dropout_fused_and_stepwise_compute_the_same_numbers(same_generator):
    fused = attention(SeededDropoutAttention, 8, 4, 6)
    stepwise = attention(SeededDropoutAttentionStepwise, 8, 4, 6)
    x, dout = randn(3, 6, 8, seed=1), randn(3, 6, 8, seed=2)
    with torch.no_grad():
        outs = [layer.forward(x) for layer in (fused, stepwise)]
        dxs = [layer.backward(dout) for layer in (fused, stepwise)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-13)
    torch.testing.assert_close(dxs[0], dxs[1], rtol=0, atol=1e-13)
    for name, g in fused.grads.items():
        torch.testing.assert_close(g, stepwise.grads[name], rtol=0, atol=1e-12)
    # the weights dropped are the ones the stepwise form's kept zeroes; the rest are att / k, k about 1 - p
    kept, att = stepwise.saved["kept"], stepwise.saved["att"]
    assert torch.count_nonzero((kept == 0) & (att > 0)) > 0
    torch.testing.assert_close(kept[kept != 0], att[kept != 0] / keep_probability(0.3), rtol=0, atol=1e-15)


def test_attention_dropout_is_off_in_eval(same_generator):
    layer = attention(SeededDropoutAttention, 8, 2, 6)
    plain = attention(CausalSelfAttention, 8, 2, 6)
    x = randn(2, 6, 8, seed=1)
    with torch.no_grad():
        assert not torch.equal(layer.forward(x), plain.forward(x))
        layer.eval()
        assert torch.equal(layer.forward(x), plain.forward(x)) and "att_mask" not in layer.saved
    with pytest.raises(HandgradError, match="dropout"):
        CausalSelfAttention(8, 2, 6, dropout=1.0)


@pytest.mark.parametrize("cls", [MasklessDropoutAttention, MasklessDropoutAttentionStepwise])
def test_check_catches_an_attention_backward_that_ignores_the_dropout_mask(cls, same_generator):
    layer = attention(cls, 6, 2, 5)
    results = check_layer(layer, randn(2, 5, 6, seed=1), dout=randn(2, 5, 6, seed=2))
    failed = {(r.name, r.kind) for r in results if not r.close}
    assert {("input", "intermediate"), ("qkv_weight", "parameter"), ("qkv_weight", "finite-difference")} <= failed
    assert ("proj_weight", "parameter") not in failed  # the output projection reads the kept weights right
