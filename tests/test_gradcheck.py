"""The check itself: it passes on the real backward, and fails on a wrong one or on a stray buffer."""
import json

import pytest
import torch

from handgrad.data import make_dataset
from handgrad.gradcheck import (
    check_layer,
    check_model,
    compare,
    finite_difference_check,
    format_table,
    passed,
    relative_tolerance,
    tolerance,
)
from handgrad.layers import BatchNorm1d, Module, Tanh
from handgrad.model import ModelConfig, build_model
from handgrad.optim import SGD


def batch(vocab_size=27, block=3, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, block), generator=g), torch.randint(0, vocab_size, (n,), generator=g)


@pytest.mark.parametrize("stepwise", [True, False])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_seed_model_passes(stepwise, dtype, atol):
    model = build_model(ModelConfig(stepwise=stepwise), dtype=dtype)
    results = check_model(model, *batch())
    assert passed(results)
    assert all(r.max_abs_diff <= atol for r in results)
    names = {r.name for r in results}
    params = {"embedding.weight", "linear1.weight", "batchnorm1.weight", "batchnorm1.bias",
              "linear2.weight", "linear2.bias"}
    assert params <= names
    if stepwise:
        assert len(results) >= 17 + 6
        assert {"loss.probs", "loss.counts_sum", "batchnorm1.bnvar", "batchnorm1.bnraw",
                "linear1.out", "tanh1.out", "embedding.out"} <= names


def test_check_leaves_running_stats_alone():
    model = build_model(ModelConfig())
    before = {n: b.clone() for n, b in model.named_buffers()}
    check_model(model, *batch())
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n])


def test_check_catches_dropped_term_in_batchnorm_backward(monkeypatch):
    """Drop the variance term of BatchNorm's fused backward: the check must fail."""

    def wrong_backward(self, dout):
        dims = self.reduce_dims(dout)
        xhat, rstd = self.saved["xhat"], self.saved["rstd"]
        self.grads["weight"].add_((dout * xhat).sum(dims))
        self.grads["bias"].add_(dout.sum(dims))
        n = dout.numel() // dout.shape[-1]
        return (self.params["weight"] * rstd / n) * (n * dout - dout.sum(dims))  # "- xhat * sum(dout * xhat)" dropped

    monkeypatch.setattr(BatchNorm1d, "backward", wrong_backward)
    model = build_model(ModelConfig(), dtype=torch.float64)
    results = check_model(model, *batch())
    assert not passed(results)
    bad = {r.name for r in results if not r.close}
    assert "linear1.weight" in bad and "batchnorm1.out" not in bad  # wrong from BatchNorm's input down
    assert not passed(finite_difference_check(model, *batch()))
    layer = BatchNorm1d(4).to(dtype=torch.float64)
    assert not passed(check_layer(layer, torch.randn(6, 4, dtype=torch.float64)))


def test_check_catches_optimizer_reading_other_buffers():
    """The seed's bug: the backward fills one set of tensors, the update reads another (zeros)."""
    model = build_model(ModelConfig(), dtype=torch.float64)
    stray = [torch.zeros_like(g) for g in model.grads()]
    opt = SGD(model.parameters(), stray, lr=1.0)
    results = check_model(model, *batch(), grads=opt.grads)
    assert not passed(results)
    assert all(not r.close for r in results if r.kind == "parameter")
    good = SGD(model.parameters(), model.grads(), lr=1.0)
    assert passed(check_model(model, *batch(), grads=good.grads))


def test_check_catches_wrong_tanh():
    from handgrad.layers import Tanh

    class WrongTanh(Tanh):
        def backward(self, dout):
            return dout * (1 - self.saved["out"])  # forgot the square

    assert not passed(check_layer(WrongTanh(), torch.randn(4, 3, dtype=torch.float64)))


def test_finite_differences_pass_on_names(names_txt):
    ds = make_dataset(names_txt, split="examples")
    model = build_model(ModelConfig(vocab_size=len(ds.vocab), stepwise=True))
    x, y = ds.X["train"][:32], ds.Y["train"][:32]
    assert passed(finite_difference_check(model, x, y, samples_per_param=4))


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


class ChannelScale(Module):
    """out = x * weight + bias, per channel: the small layer the planted mistakes below live in."""

    def __init__(self, dim: int):
        super().__init__()
        self.add_param("weight", randn(dim, seed=11) + 1)
        self.add_param("bias", randn(dim, seed=12))

    def forward(self, x):
        self.saved["x"] = x
        return x * self.params["weight"] + self.params["bias"]

    def reduce(self, t):
        return t.sum(tuple(range(t.ndim - 1)))

    # out = x w + b:  dx = dout w,  dw = sum over rows of dout x,  db = sum over rows of dout
    def backward(self, dout):
        self.grads["weight"].add_(self.reduce(dout * self.saved["x"]))
        self.grads["bias"].add_(self.reduce(dout))
        return dout * self.params["weight"]


class ReplacesItsBuffer(ChannelScale):
    """The notebook's bug: a new tensor where the optimizer's buffer was."""

    def backward(self, dout):
        self.grads["weight"] = self.reduce(dout * self.saved["x"])
        self.grads["bias"].add_(self.reduce(dout))
        return dout * self.params["weight"]


class AssignsItsBuffer(ChannelScale):
    def backward(self, dout):
        self.grads["weight"].copy_(self.reduce(dout * self.saved["x"]))
        self.grads["bias"].add_(self.reduce(dout))
        return dout * self.params["weight"]


class ReducesItsDx(ChannelScale):
    def backward(self, dout):
        super().backward(dout)
        return self.reduce(dout) * self.params["weight"]  # summed over the rows: broadcasts, but is not dx


class NoBufferForItsBias(ChannelScale):
    def __init__(self, dim: int):
        super().__init__(dim)
        del self.grads["bias"]  # a parameter set without add_param

    def backward(self, dout):
        self.grads["weight"].add_(self.reduce(dout * self.saved["x"]))
        return dout * self.params["weight"]


def by_name(results, kind="parameter"):
    return {r.name: r for r in results if r.kind == kind}


@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3)])
def test_a_correct_layer_keeps_every_buffer_contract(shape):
    layer = ChannelScale(3)
    buffers = dict(layer.grads)
    results = check_layer(layer, randn(*shape))
    assert passed(results)
    assert not any(r.note for r in results if r.kind != "finite-difference")
    assert all(layer.grads[n] is b for n, b in buffers.items())
    # the buffers are left holding one backward's gradient, not two (dout: check_layer's own draw)
    x, dout = randn(*shape), randn(*shape, seed=1)
    torch.testing.assert_close(layer.grads["weight"], (dout * x).sum(tuple(range(len(shape) - 1))))


def test_check_layer_catches_a_replaced_gradient_buffer():
    results = check_layer(ReplacesItsBuffer(3), randn(5, 3))
    assert not passed(results)
    rows = by_name(results)
    assert not rows["weight"].close
    assert "replaced the gradient buffer instead of accumulating into it" in rows["weight"].note
    assert rows["bias"].close and not rows["bias"].note
    # the values it computed are right: only the contract is broken
    assert by_name(results, "finite-difference")["weight"].close
    assert "replaced the gradient buffer" in format_table(results)


def test_check_layer_catches_a_buffer_assigned_instead_of_accumulated():
    results = check_layer(AssignsItsBuffer(3), randn(5, 3))
    rows = by_name(results)
    assert not passed(results) and not rows["weight"].close
    assert "must accumulate" in rows["weight"].note and "copy_" in rows["weight"].note
    assert rows["weight"].max_abs_diff <= 1e-10  # one backward's gradient is right
    assert rows["bias"].close


def test_check_layer_catches_a_wrong_shape_of_dx():
    results = check_layer(ReducesItsDx(3), randn(5, 3))
    row = by_name(results, "intermediate")["input"]
    assert not row.close
    assert "dx of shape 3" in row.note and "the input's is 5x3" in row.note
    assert by_name(results)["weight"].close


def test_check_layer_names_a_parameter_missing_from_grads():
    results = check_layer(NoBufferForItsBias(3), randn(5, 3))
    row = by_name(results)["bias"]
    assert not row.close and "no gradient buffer" in row.note
    assert by_name(results)["weight"].close


def test_check_model_names_a_replaced_buffer(monkeypatch):
    def replacing_backward(self, dout):
        xhat, rstd = self.saved["xhat"], self.saved["rstd"]
        self.grads["weight"] = (dout * xhat).sum(0)  # the notebook's line
        self.grads["bias"].add_(dout.sum(0))
        n = dout.shape[0]
        return (self.params["weight"] * rstd / n) * (n * dout - dout.sum(0) - xhat * (dout * xhat).sum(0))

    monkeypatch.setattr(BatchNorm1d, "backward", replacing_backward)
    model = build_model(ModelConfig(), dtype=torch.float64)
    rows = by_name(check_model(model, *batch()))
    assert not rows["batchnorm1.weight"].close
    assert "replaced the gradient buffer" in rows["batchnorm1.weight"].note
    assert rows["linear1.weight"].close  # dx was right
    layer = BatchNorm1d(4).to(dtype=torch.float64)
    assert "replaced the gradient buffer" in by_name(check_layer(layer, randn(6, 4)))["weight"].note


class LeakyReLU(Module):
    def __init__(self, slope: float = 0.1):
        super().__init__()
        self.slope = slope

    def forward(self, x):
        self.saved["x"] = x
        return torch.where(x > 0, x, self.slope * x)

    # d/dx = 1 where x > 0, else slope
    def backward(self, dout):
        return torch.where(self.saved["x"] > 0, dout, self.slope * dout)


class LeakyReLUWithoutSlope(LeakyReLU):
    def backward(self, dout):
        return torch.where(self.saved["x"] > 0, dout, torch.zeros_like(dout))


class LayerNorm(Module):
    """Normalisation over the channels of each row, then a per-channel gain and shift."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.add_param("weight", randn(dim, seed=13).abs() + 0.5)
        self.add_param("bias", randn(dim, seed=14))

    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        rstd = ((xc * xc).mean(-1, keepdim=True) + self.eps).rsqrt()
        xhat = xc * rstd
        self.saved["xhat"], self.saved["rstd"] = xhat, rstd
        return xhat * self.params["weight"] + self.params["bias"]

    # g = dout * weight:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), means over the channels
    def backward(self, dout):
        xhat, rstd = self.saved["xhat"], self.saved["rstd"]
        dims = tuple(range(dout.ndim - 1))
        self.grads["weight"].add_((dout * xhat).sum(dims))
        self.grads["bias"].add_(dout.sum(dims))
        g = dout * self.params["weight"]
        return rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))


class LayerNormWithoutVarianceTerm(LayerNorm):
    def backward(self, dout):
        xhat, rstd = self.saved["xhat"], self.saved["rstd"]
        dims = tuple(range(dout.ndim - 1))
        self.grads["weight"].add_((dout * xhat).sum(dims))
        self.grads["bias"].add_(dout.sum(dims))
        g = dout * self.params["weight"]
        return rstd * (g - g.mean(-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)])
@pytest.mark.parametrize("right,wrong", [(LeakyReLU, LeakyReLUWithoutSlope), (LayerNorm, LayerNormWithoutVarianceTerm)],
                         ids=["leaky_relu", "layer_norm"])
def test_check_layer_in_float32_and_float64(dtype, shape, right, wrong):
    """A correct layer passes in either dtype (central differences run on a float64 copy); a wrong one fails in both."""
    make = (lambda cls: cls()) if right is LeakyReLU else (lambda cls: cls(shape[-1]))
    x = randn(*shape, dtype=dtype) * 2
    results = check_layer(make(right).to(dtype=dtype), x)
    assert passed(results), format_table(results)
    assert {r.kind for r in results} >= {"intermediate", "finite-difference"}
    assert all(r.max_abs_diff <= tolerance(dtype) for r in results if r.kind != "finite-difference")
    bad = {(r.name, r.kind) for r in check_layer(make(wrong).to(dtype=dtype), x) if not r.close}
    assert ("input", "intermediate") in bad and ("input", "finite-difference") in bad


def test_finite_difference_rows_have_the_parameter_shape_and_say_what_was_sampled():
    model = build_model(ModelConfig(), dtype=torch.float64)
    results = finite_difference_check(model, *batch(), samples_per_param=5)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert {r.name: r.shape for r in results} == shapes
    rows = by_name(results, "finite-difference")
    assert rows["embedding.weight"].note == "5 of 270 entries"
    assert rows["linear2.bias"].note == "5 of 27 entries"
    table = format_table(results)
    line = next(line for line in table.splitlines() if line.startswith("embedding.weight"))
    assert " 27x10 " in line and line.endswith("5 of 270 entries")
    layer_rows = by_name(check_layer(ChannelScale(3), randn(4, 3)), "finite-difference")
    assert layer_rows["input"].shape == (4, 3) and layer_rows["input"].note == "12 of 12 entries"


class TanhReadingItsSigmoid(Tanh):
    """Right under autograd, wrong on the training path: with autograd off the forward writes
    its output over the sigmoid its backward reads."""

    def forward(self, x):
        s = (x + x).sigmoid_()
        out = torch.add(self.minus_one, s, alpha=2, out=None if torch.is_grad_enabled() else s)
        self.saved["s"] = s
        return out

    # tanh(x) = 2 sigmoid(2x) - 1:  d/dx = 4 s (1 - s)
    def backward(self, dout):
        s = self.saved["s"]
        return dout * 4 * s * (1 - s)


@pytest.mark.parametrize("stepwise", [True, False])
def test_check_model_runs_the_manual_backward_on_the_training_forward(stepwise):
    model = build_model(ModelConfig(stepwise=stepwise), dtype=torch.float64)
    assert passed(check_model(model, *batch()))
    model.net.layers["tanh1"] = TanhReadingItsSigmoid().to(dtype=torch.float64)
    results = check_model(model, *batch())
    bad = {r.name for r in results if not r.close}
    assert "tanh1.out" not in bad and {"batchnorm1.out", "linear1.weight", "batchnorm1.weight"} <= bad
    # its backward is right after a forward with autograd on, where the check used to run it
    with torch.enable_grad():
        layer = TanhReadingItsSigmoid().to(dtype=torch.float64)
        x, dout = randn(4, 3), randn(4, 3, seed=1)
        layer.forward(x)
        torch.testing.assert_close(layer.backward(dout), dout * (1 - torch.tanh(x) ** 2))
    assert not passed(check_layer(TanhReadingItsSigmoid().to(dtype=torch.float64), randn(4, 3)))


def test_check_model_intermediates_come_from_the_manual_run():
    """Stepwise: every intermediate's manual gradient is compared (none missing) on the no-autograd run."""
    model = build_model(ModelConfig(stepwise=True), dtype=torch.float64)
    results = check_model(model, *batch())
    inter = [r for r in results if r.kind == "intermediate"]
    assert len(inter) >= 17 and all(r.close for r in inter)
    # the logits' row maxima: softmax ignores a shift, so their gradient is zero but for rounding
    assert {r.name for r in inter if r.note} <= {"loss.logit_maxes"}
    assert all(not t.requires_grad for t in model.named_intermediate_grads().values())
    assert all(not t.requires_grad for t in model.named_intermediates().values())


def test_relative_bound_catches_a_small_error_on_a_small_gradient():
    """Off by 0.5% on entries near 1e-3 in float32: within the absolute bound, outside the relative one."""
    reference = randn(50, dtype=torch.float32) * 5e-4
    manual = reference * 1.005
    result = compare("w", "parameter", manual, reference, tolerance(torch.float32))
    assert result.max_abs_diff <= tolerance(torch.float32)
    assert not result.close
    assert result.rel_diff == pytest.approx(5e-3, rel=1e-3)
    assert compare("w", "parameter", reference * (1 + 1e-6), reference, tolerance(torch.float32)).close
    assert relative_tolerance(torch.float32) > 1e-6


def test_relative_bound_in_check_layer_on_float32():
    class ScaleOffByHalfAPercent(ChannelScale):
        def backward(self, dout):
            self.grads["weight"].add_(1.005 * self.reduce(dout * self.saved["x"]))
            self.grads["bias"].add_(self.reduce(dout))
            return dout * self.params["weight"]

    x = randn(6, 3, dtype=torch.float32)
    dout = randn(6, 3, seed=1, dtype=torch.float32) * 1e-4  # gradients near 1e-4
    rows = by_name(check_layer(ScaleOffByHalfAPercent(3).to(dtype=torch.float32), x, dout))
    assert rows["weight"].max_abs_diff <= tolerance(torch.float32) and not rows["weight"].close
    assert rows["bias"].close


def test_a_zero_reference_needs_a_zero_diff_or_one_within_the_absolute_bound():
    zeros = torch.zeros(4, dtype=torch.float32)
    exact = compare("b", "parameter", zeros.clone(), zeros, 1e-5)
    assert exact.close and exact.rel_diff == 0.0
    rounding = compare("b", "parameter", zeros + 1e-9, zeros, 1e-5)
    assert rounding.close and rounding.rel_diff == float("inf") and "absolute bound" in rounding.note
    noise = randn(4, dtype=torch.float32) * 1e-8  # a reference that is rounding noise around zero
    assert compare("b", "parameter", -noise, noise, 1e-5).close
    assert not compare("b", "parameter", noise + 2e-5, noise, 1e-5).close
    assert not compare("b", "parameter", zeros + 1e-3, zeros, 1e-5).close


def test_rows_carry_the_relative_error_and_the_note_in_json_and_the_table():
    results = check_layer(AssignsItsBuffer(3), randn(5, 3))
    rows = json.loads(json.dumps([r.to_dict() for r in results]))
    assert all({"rel_diff", "note", "max_abs_diff", "shape"} <= set(r) for r in rows)
    weight = next(r for r in rows if r["name"] == "weight" and r["kind"] == "parameter")
    assert "must accumulate" in weight["note"] and isinstance(weight["rel_diff"], float)
    table = format_table(results)
    assert "rel diff" in table.splitlines()[0] and "note" in table.splitlines()[0]
    assert "note" not in format_table([r for r in results if not r.note]).splitlines()[0]
