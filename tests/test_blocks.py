"""RecomputingSequential: the transformer's branches checked against autograd and five-point central
differences in float64 (several shapes, randomised parameters, random upstream gradients); the same
gradients as a plain Sequential, bit for bit, while keeping less; a planted wrong recomputation caught."""
import pytest
import torch

from handgrad.bench import held_tensors, storages
from handgrad.gradcheck import check_layer
from handgrad.layers import (GELU, CausalSelfAttention, LayerNorm, LayerNormStepwise, Linear, RecomputingSequential,
                             Residual, Sequential)
from handgrad.layers.blocks import rerun
from layer_checks import assert_ok, randn


def attention_branch(chain, c, heads, block_size):
    return chain([("ln", LayerNorm(c)), ("attn", CausalSelfAttention(c, heads, block_size))])


def mlp_branch(chain, c, hidden):
    return chain([("ln", LayerNorm(c)), ("fc", Linear(c, hidden)), ("gelu", GELU()), ("proj", Linear(hidden, c))])


def randomised(layer, seed=0):
    """Every parameter drawn at random: unit gains and zero biases can hide a wrong backward."""
    layer.to(dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    for _, p in layer.named_parameters():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.6)
    return layer


# (batch, time, channels, heads, hidden)
SHAPES = [(2, 1, 4, 1, 8), (2, 5, 6, 2, 12), (3, 4, 8, 4, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("branch", ["attention", "mlp"])
def test_branches_against_autograd_and_finite_differences(branch, shape):
    B, T, C, H, hidden = shape
    chain = RecomputingSequential
    block = attention_branch(chain, C, H, T) if branch == "attention" else mlp_branch(chain, C, hidden)
    layer = randomised(Residual(block), seed=T)
    assert_ok(check_layer(layer, randn(B, T, C, seed=1) * 1.5 + 0.3, dout=randn(B, T, C, seed=2)))


def test_a_linear_after_layernorm_on_rows_of_a_matrix():
    layer = randomised(RecomputingSequential([("ln", LayerNorm(5)), ("linear", Linear(5, 3))]), seed=3)
    assert_ok(check_layer(layer, randn(7, 5, seed=1), dout=randn(7, 3, seed=2)))


def pair(branch, seed=0):
    """The same branch as a plain Sequential and as a RecomputingSequential, over equal parameters."""
    plain, recomputing = (randomised(branch(chain), seed) for chain in (Sequential, RecomputingSequential))
    return plain, recomputing


@pytest.mark.parametrize("branch", [lambda chain: attention_branch(chain, 8, 2, 6),
                                    lambda chain: mlp_branch(chain, 8, 32)], ids=["attention", "mlp"])
def test_the_same_gradients_as_a_plain_sequential_bit_for_bit_keeping_less(branch):
    plain, recomputing = pair(branch)
    x, dout = randn(3, 6, 8, seed=1), randn(3, 6, 8, seed=2)
    kept, results = {}, {}
    for name, layer in (("plain", plain), ("recomputing", recomputing)):
        with torch.no_grad():
            layer.zero_grad()
            out = layer.forward(x)
            kept[name] = storages(list(held_tensors(layer.saved)), exclude={x.untyped_storage().data_ptr()})
            dx = layer.backward(dout.clone())
        results[name] = [out, dx, *(g.clone() for _, g in layer.named_grads())]
    for a, b in zip(results["plain"], results["recomputing"]):
        assert torch.equal(a, b)
    # not kept: LayerNorm's output, and in the MLP GELU's output too (each 8 bytes an entry in float64)
    dropped = 3 * 6 * 8 * 8 + (3 * 6 * 32 * 8 if "gelu" in plain.layers else 0)
    assert kept["plain"] - kept["recomputing"] == dropped


def test_a_reader_keeps_no_input_after_the_forward_nor_after_its_backward():
    layer = randomised(mlp_branch(RecomputingSequential, 4, 8))
    x = randn(2, 3, 4, seed=1)
    with torch.no_grad():
        layer.forward(x)
        frames = {type(lay).__name__ + name: frame[0] for name, (lay, frame) in zip(layer.layers, layer.saved["tape"])}
        assert "x" not in frames["Linearfc"] and "x" not in frames["Linearproj"]
        assert frames["LayerNormln"]["x"] is x and "x" in frames["GELUgelu"]  # the cheap layers keep their inputs
        layer.backward(randn(2, 3, 4, seed=2))
        assert "x" not in frames["Linearfc"] and "x" not in frames["Linearproj"]


def test_the_stepwise_layernorm_is_left_as_it_is():
    """It keeps its intermediates, not its input: there is nothing to rerun it from."""
    layer = randomised(RecomputingSequential([("ln", LayerNormStepwise(4)), ("linear", Linear(4, 3))]))
    with torch.no_grad():
        layer.forward(randn(2, 3, 4, seed=1))
    assert layer.saved["dropped"] == {} and "x" in layer.saved["tape"][1][1][0]


class RecomputingTheWrongTensor(RecomputingSequential):
    """A planted error: the reader gets the cheap layer's input back, not its output."""

    def backward(self, dout):
        tape = self.saved["tape"]
        for i in self.saved["dropped"]:
            tape[i][1][0]["x"] = tape[i - 1][1][0]["x"].reshape(self.saved["dropped"][i])
        self.saved["dropped"] = {}
        return Sequential.backward(self, dout)


def test_check_catches_a_reader_given_the_wrong_input():
    layer = randomised(mlp_branch(RecomputingTheWrongTensor, 4, 8))
    results = check_layer(layer, randn(2, 3, 4, seed=1), dout=randn(2, 3, 4, seed=2))
    failed = {r.name for r in results if not r.close}
    # the Linears' weight gradients read the wrong input; their biases' and the input's gradient do not
    assert {"fc.weight", "proj.weight"} <= failed and "proj.bias" not in failed


def test_rerun_leaves_the_frame_as_the_forward_left_it():
    ln = randomised(LayerNorm(4))
    x = randn(2, 3, 4, seed=1)
    with torch.no_grad():
        out = ln.forward(x)
        frame = (ln.saved, ln.saved_grads)
        ln.saved, ln.saved_grads = {}, {}  # another call's frame is the layer's now
        again = rerun(ln, frame)
    assert torch.equal(again, out) and frame[0]["x"] is x and ln.saved == {}
