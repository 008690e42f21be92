"""Cross-entropy, fused and stepwise, against autograd and central differences."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from handgrad.errors import HandgradError
from handgrad.gradcheck import central_difference, check_model, compare, finite_difference_check, passed
from handgrad.loss import CrossEntropy, CrossEntropyStepwise
from handgrad.model import ModelConfig, build_model
from handgrad.replay import record


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


def sequence_reference(logits, targets, ignore_index, dloss=1.0):
    """Autograd's loss and d (dloss * loss) / d logits, logits (..., V) with the class axis moved to
    where cross_entropy takes it: (N, V, d1, ...)."""
    lr = logits.clone().requires_grad_(True)
    by_class = lr.movedim(-1, 1) if lr.ndim > 2 else lr
    loss = torch.nn.functional.cross_entropy(by_class, targets, ignore_index=-100 if ignore_index is None else ignore_index)
    (loss * dloss).backward()
    return loss.detach(), lr.grad


def sequence_batch(shape, ignore_index, seed, ignored_share=0.3):
    """Random logits (float64, spread) and targets of `shape` (leading axes, then V); about `ignored_share`
    of the targets set to `ignore_index`, at least one counted and, where V allows, at least one ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    ignored = torch.zeros(shape[:-1], dtype=torch.bool)
    if ignore_index is not None:
        ignored = torch.rand(shape[:-1], generator=g) < ignored_share
        ignored.view(-1)[0], ignored.view(-1)[-1] = False, targets.numel() > 1
        targets[ignored] = ignore_index
        ignored = targets == ignore_index  # an ignore index that is a class (0) ignores that class's targets too
    return logits, targets, ignored


def loss_and_gradient(loss_fn, logits, targets, dloss=1.0):
    with torch.no_grad():
        loss = loss_fn.forward(logits, targets)
        return loss, loss_fn.backward(dloss)


def finite_differences(cls, ignore_index, logits, targets, dloss):
    flat = logits.view(-1)
    return torch.tensor([central_difference(lambda: dloss * float(cls(ignore_index).forward(logits, targets)), flat, i)
                         for i in range(flat.numel())], dtype=torch.float64)


SEQUENCE_CASES = [  # (shape: leading axes then V, ignore_index)
    ((5, 4), None), ((2, 3, 5), None), ((6, 4), -1), ((3, 4, 6), -1), ((2, 5, 3), -100), ((2, 2, 3, 4), -100),
    ((4, 3, 5), 0),  # an ignore index that is also a class: that class's targets are not counted
]


@pytest.mark.parametrize("cls", [CrossEntropy, CrossEntropyStepwise])
@pytest.mark.parametrize("shape,ignore_index", SEQUENCE_CASES)
def test_sequence_cross_entropy_matches_autograd_and_fd(cls, shape, ignore_index):
    seed = sum(shape) * 7 + (ignore_index or 0)
    logits, targets, ignored = sequence_batch(shape, ignore_index, seed)
    dloss = 0.5 + torch.rand((), generator=torch.Generator().manual_seed(seed)).item()  # a random upstream gradient
    ref_loss, ref_grad = sequence_reference(logits, targets, ignore_index, dloss)
    loss, dlogits = loss_and_gradient(cls(ignore_index), logits, targets, dloss)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)  # the mean over the counted targets
    assert dlogits.shape == logits.shape
    assert compare("logits", "autograd", dlogits, ref_grad, 1e-12).close
    assert ignored.any() == (ignore_index is not None)
    assert torch.equal(dlogits[ignored], torch.zeros_like(dlogits[ignored]))  # exactly 0, not merely small
    numeric = finite_differences(cls, ignore_index, logits, targets, dloss)
    assert compare("logits", "fd", dlogits.reshape(-1), numeric, 1e-9).close


@settings(max_examples=25, deadline=None, derandomize=True)
@given(leading=st.lists(st.integers(1, 4), min_size=1, max_size=3), v=st.integers(2, 6),
       ignore_index=st.sampled_from([None, -1, -100, 1]), share=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_cross_entropy_random_shapes_and_ignored_targets(leading, v, ignore_index, share, seed):
    """Any leading shape, any share of the targets ignored (all of them included): both forms against
    autograd, where autograd's mean is defined (it is 0/0 with no counted target)."""
    shape = (*leading, v)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, v, shape[:-1], generator=g)
    if ignore_index is not None:
        targets[torch.rand(shape[:-1], generator=g) < share] = ignore_index
    ignored = targets == ignore_index if ignore_index is not None else torch.zeros(shape[:-1], dtype=torch.bool)
    results = [loss_and_gradient(cls(ignore_index), logits, targets) for cls in (CrossEntropy, CrossEntropyStepwise)]
    for loss, dlogits in results:
        assert dlogits.shape == logits.shape
        assert torch.equal(dlogits[ignored], torch.zeros_like(dlogits[ignored]))
        if ignored.all():
            assert float(loss) == 0.0
            continue
        ref_loss, ref_grad = sequence_reference(logits, targets, ignore_index)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
        assert compare("logits", "autograd", dlogits, ref_grad, 1e-12).close
    (fused_loss, fused_grad), (stepwise_loss, stepwise_grad) = results
    torch.testing.assert_close(stepwise_loss, fused_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(stepwise_grad, fused_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [CrossEntropy, CrossEntropyStepwise])
@pytest.mark.parametrize("shape,ignore_index", [((4, 5), -1), ((2, 3, 5), -100), ((1, 1, 3), 0)])
def test_cross_entropy_with_every_target_ignored_is_zero(cls, shape, ignore_index):
    """No counted target: loss 0 and gradient 0 (a mean over no targets would be 0/0)."""
    logits = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(len(shape)))
    targets = torch.full(shape[:-1], ignore_index)
    loss, dlogits = loss_and_gradient(cls(ignore_index), logits, targets)
    assert float(loss) == 0.0
    assert dlogits.shape == logits.shape and torch.equal(dlogits, torch.zeros_like(logits))


@pytest.mark.parametrize("cls", [CrossEntropy, CrossEntropyStepwise])
@pytest.mark.parametrize("bad_target", [-100, -1, 5])
def test_cross_entropy_without_ignore_index_rejects_a_target_out_of_range(cls, bad_target):
    """With no ignore index, -100 is a target like any other: out of range, an error in the forward,
    neither ignored there (and then crashing the backward) nor wrapped round to a class."""
    logits = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        cls().forward(logits, torch.tensor([0, bad_target, 2]))


@pytest.mark.parametrize("cls", [CrossEntropy, CrossEntropyStepwise])
def test_cross_entropy_rejects_targets_not_shaped_as_the_logits(cls):
    with pytest.raises(HandgradError, match=r"targets of shape \(2, 4\) do not match logits of shape \(2, 3, 5\)"):
        cls().forward(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("shape,ignore_index", [((6, 4), -1), ((2, 3, 4), -1), ((2, 3, 4), None)])
def test_stepwise_intermediates_match_autograd_and_the_fused_form(shape, ignore_index):
    logits, targets, _ = sequence_batch(shape, ignore_index, seed=11)
    logits.requires_grad_(True)
    loss_fn = CrossEntropyStepwise(ignore_index)
    loss = loss_fn.forward(logits * 1.0, targets)
    inter = dict(loss_fn.named_intermediates())
    for t in inter.values():
        t.retain_grad()
    loss.backward()
    with torch.no_grad():
        dlogits = loss_fn.backward()
    grads = dict(loss_fn.named_intermediate_grads())
    assert set(inter) == {"logit_maxes", "norm_logits", "counts", "counts_sum", "probs", "logprobs"}
    for name, t in inter.items():
        assert compare(name, "autograd", grads[name], t.grad, 1e-12).close, name
    assert compare("logits", "autograd", dlogits, logits.grad, 1e-12).close
    fused_loss, fused_grad = loss_and_gradient(CrossEntropy(ignore_index), logits.detach(), targets)
    torch.testing.assert_close(loss.detach(), fused_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(dlogits, fused_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [CrossEntropy, CrossEntropyStepwise])
@pytest.mark.parametrize("plant", ["divides by all targets", "ignored rows counted", "rows handed back flat"])
def test_check_catches_a_wrong_sequence_backward(cls, plant):
    """The comparisons above fail for the likely mistakes: the mean's divisor taken as every target, the
    ignored rows given a gradient, the gradient handed back as (N*T, V)."""
    shape, ignore_index = (3, 4, 5), -1
    logits, targets, ignored = sequence_batch(shape, ignore_index, seed=5)
    _, ref_grad = sequence_reference(logits, targets, ignore_index)
    loss_fn = cls(ignore_index)
    with torch.no_grad():
        loss_fn.forward(logits, targets)
        s = loss_fn.saved
        if plant == "divides by all targets":
            s["count"] = torch.tensor(float(targets.numel()), dtype=logits.dtype)
        elif plant == "ignored rows counted":  # as though each ignored target (-1) were class 0
            s["counted"], s["targets"] = torch.ones_like(s["counted"]), s["targets"].clamp_min(0)
        else:
            s["shape"] = None
        dlogits = loss_fn.backward()
    assert not compare("logits", "autograd", dlogits, ref_grad, 1e-6).close
    numeric = finite_differences(cls, ignore_index, logits, targets, 1.0)
    assert not compare("logits", "fd", dlogits, numeric.view(shape), 1e-6).close
    if plant == "ignored rows counted":
        assert not torch.equal(dlogits[ignored], torch.zeros_like(dlogits[ignored]))


def test_model_check_passes_with_ignored_targets():
    """The model's gradient check, its loss stepwise with an ignore index: every named intermediate and
    parameter against autograd, and the parameters against finite differences, with padded targets."""
    config = ModelConfig(vocab_size=7, block_size=3, n_embd=4, n_hidden=8, stepwise=True)
    model = build_model(config, seed=1, dtype=torch.float64)
    model.loss_fn = CrossEntropyStepwise(ignore_index=-1)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 7, (12, 3), generator=g)
    y = torch.randint(0, 7, (12,), generator=g)
    y[::3] = -1
    with torch.no_grad():
        ref_loss = torch.nn.functional.cross_entropy(model.forward(x), y, ignore_index=-1)
        torch.testing.assert_close(model.forward(x, y), ref_loss, rtol=0, atol=1e-12)
    results = check_model(model, x, y)
    assert {r.name for r in results} >= {"loss.logprobs", "loss.counts_sum", "loss.logit_maxes"}
    assert passed(results), [r for r in results if not r.close]
    assert passed(finite_difference_check(model, x, y, samples_per_param=4))


@pytest.mark.parametrize("shape,ignore_index", [((32, 27), None), ((2, 6, 5), -1)])
def test_cross_entropy_traces_whole(shape, ignore_index):
    """torch.compile traces forward and backward as one graph (the compiled step's path); the same
    results as eager."""
    logits, targets, _ = sequence_batch(shape, ignore_index, seed=3)
    loss_fn = CrossEntropy(ignore_index)

    def step(logits, targets):
        return loss_fn.forward(logits, targets), loss_fn.backward()

    with torch.no_grad():
        traced_loss, traced_grad = torch.compile(step, fullgraph=True, backend="eager")(logits, targets)
        loss, dlogits = step(logits, targets)
    torch.testing.assert_close(traced_loss, loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(traced_grad, dlogits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [CrossEntropy, CrossEntropyStepwise])
def test_ignored_targets_replay(cls):
    """With an ignore index no value is read into Python: a step recorded on one batch replays another,
    whose count of ignored targets differs, to the eager results."""
    shape, ignore_index = (3, 4, 5), -1
    loss_fn = cls(ignore_index)

    def step(logits, targets):
        return loss_fn.forward(logits, targets), loss_fn.backward()

    logits, targets, _ = sequence_batch(shape, ignore_index, seed=1, ignored_share=0.2)
    with torch.inference_mode():
        _, replay = record(step, logits, targets)
        for seed, every_target_ignored in ((2, False), (3, True)):
            logits, targets, _ = sequence_batch(shape, ignore_index, seed=seed, ignored_share=0.6)
            if every_target_ignored:
                targets.fill_(ignore_index)
            replayed = [t.clone() for t in replay(logits, targets)]
            eager = step(logits, targets)
            assert all(torch.equal(a, b) for a, b in zip(replayed, eager))
            if not every_target_ignored:
                with torch.inference_mode(False):
                    ref_loss, ref_grad = sequence_reference(logits.clone(), targets.clone(), ignore_index)
                torch.testing.assert_close(replayed[0], ref_loss, rtol=0, atol=1e-12)
                torch.testing.assert_close(replayed[1], ref_grad, rtol=0, atol=1e-12)
            else:
                assert float(replayed[0]) == 0.0 and not replayed[1].any()
