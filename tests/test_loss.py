"""Cross-entropy, fused and stepwise, against autograd and central differences."""
import pytest
import torch

from handgrad.gradcheck import central_difference, compare
from handgrad.loss import CrossEntropy, CrossEntropyStepwise


def reference(logits, targets):
    lr = logits.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(lr, targets)
    loss.backward()
    return loss.detach(), lr.grad


@pytest.mark.parametrize("cls", [CrossEntropy, CrossEntropyStepwise])
@pytest.mark.parametrize("n,v", [(1, 2), (4, 5), (32, 27), (7, 3)])
def test_cross_entropy_matches_autograd_and_fd(cls, n, v):
    g = torch.Generator().manual_seed(n * 100 + v)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, v, (n,), generator=g)
    ref_loss, ref_grad = reference(logits, targets)
    loss_fn = cls()
    with torch.no_grad():
        loss = loss_fn.forward(logits, targets)
        dlogits = loss_fn.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    assert compare("logits", "x", dlogits, ref_grad, 1e-12).close
    flat = logits.view(-1)
    numeric = torch.tensor([central_difference(lambda: float(cls().forward(logits, targets)), flat, i)
                            for i in range(flat.numel())], dtype=torch.float64)
    assert compare("logits", "fd", dlogits.view(-1), numeric, 1e-9).close


@pytest.mark.parametrize("n,v,dloss", [(1, 2, 1.0), (32, 27, 1.0), (30, 27, 1.0), (7, 3, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_backward_paths_agree_bit_for_bit(monkeypatch, n, v, dloss, dtype):
    """Eager on a CPU the backward multiplies by tensors it keeps (scale, -scale, the row numbers);
    compiled, or on a GPU, by Python numbers. Both give the same bits."""
    g = torch.Generator().manual_seed(n + v)
    logits = torch.randn(n, v, generator=g, dtype=dtype) * 3
    targets = torch.randint(0, v, (n,), generator=g)
    loss_fn = CrossEntropy()
    with torch.inference_mode():
        loss_fn.forward(logits, targets)
        kept = loss_fn.backward(dloss)
        again = loss_fn.backward(dloss)  # the tensors made on the first call, used again
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the other path, run eagerly
        scalar = loss_fn.backward(dloss)
    assert torch.equal(kept, scalar) and torch.equal(again, scalar)
    assert len(loss_fn._constants) == 1 and next(iter(loss_fn._constants.values()))[0].dtype == dtype


def test_cross_entropy_keeps_few_constants():
    loss_fn = CrossEntropy()
    for n in range(1, 40):
        loss_fn.forward(torch.randn(n, 5), torch.randint(0, 5, (n,)))
        loss_fn.backward()
    assert 1 <= len(loss_fn._constants) <= 8


@pytest.mark.parametrize("cls,logits", [
    # large logits overflow a plain exp; both forms subtract the row max
    (CrossEntropyStepwise, [[1000.0, 990.0, 995.0], [5000.0, 5001.0, 4999.0]]),
    (CrossEntropy, [[1000.0, 990.0, 995.0], [5000.0, 5001.0, 4999.0]]),
    # a row spread so wide that a probability underflows to 0: the stepwise chain's log(probs)
    # is -inf there (autograd's too), the fused log-softmax stays finite
    (CrossEntropy, [[1000.0, 0.0, -1000.0], [5000.0, 5001.0, 4999.0]]),
])
def test_cross_entropy_is_stable_on_huge_logits(cls, logits):
    logits = torch.tensor(logits)
    targets = torch.tensor([0, 1])
    loss_fn = cls()
    loss = loss_fn.forward(logits, targets)
    dlogits = loss_fn.backward()
    assert torch.isfinite(loss) and torch.isfinite(dlogits).all()
    ref_loss, ref_grad = reference(logits, targets)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(dlogits, ref_grad)


def test_stepwise_intermediates_match_autograd():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 4, (6,), generator=g)
    loss_fn = CrossEntropyStepwise()
    loss = loss_fn.forward(logits * 1.0, targets)
    inter = dict(loss_fn.named_intermediates())
    for t in inter.values():
        t.retain_grad()
    loss.backward()
    with torch.no_grad():
        loss_fn.backward()
    grads = dict(loss_fn.named_intermediate_grads())
    assert set(inter) == {"logit_maxes", "norm_logits", "counts", "counts_sum", "probs", "logprobs"}
    for name, t in inter.items():
        assert compare(name, "x", grads[name], t.grad, 1e-12).close, name
