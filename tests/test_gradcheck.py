"""The check itself: it passes on the real backward, and fails on a wrong one or on a stray buffer."""
import pytest
import torch

from handgrad.data import make_dataset
from handgrad.gradcheck import check_layer, check_model, finite_difference_check, passed
from handgrad.layers import BatchNorm1d
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
