"""Each hand-written update against torch.optim on the same gradients, 100 steps, float64;
state_dict round trips; the learning-rate schedules."""
import math

import pytest
import torch

from handgrad.errors import HandgradError
from handgrad.layers import packed, views_like
from handgrad.model import ModelConfig, build_model
from handgrad.optim import SGD, AdamW, WeightAverage, cosine_schedule, learning_rate, make_optimizer, step_schedule

SHAPES = [(5, 3), (4,), (2, 3, 2), ()]
STEPS = 100


def start_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def gradient(p, step, i):
    """Depends on the parameter (as a real loss's would) and on a per-step draw."""
    g = torch.Generator().manual_seed(1000 * step + i)
    return 0.5 * p + torch.sin(3 * p) + torch.randn(p.shape, generator=g, dtype=torch.float64)


def lr_at(step):
    return 0.05 * (1 + math.cos(math.pi * step / STEPS)) / 2 + 1e-3


def as_views(tensors):
    """The tensors' values as views of one flat tensor, end to end (as `Sequential.flatten` lays out a model's)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return views_like(flat, tensors)


def run_ours(make, steps=STEPS, schedule=True, flat=False):
    params = start_params()
    grads = [torch.zeros_like(p) for p in params]
    if flat:
        params, grads = as_views(params), as_views(grads)
    opt = make(params, grads)
    assert (opt.flat is not None) == flat
    for step in range(steps):
        for i, (p, g) in enumerate(zip(params, grads)):
            g.copy_(gradient(p, step, i))
        opt.step(lr_at(step) if schedule else None)
    return params, opt


def run_torch(make, steps=STEPS, schedule=True):
    params = [p.requires_grad_(True) for p in start_params()]
    opt = make(params)
    for step in range(steps):
        with torch.no_grad():
            for i, p in enumerate(params):
                p.grad = gradient(p, step, i)
        if schedule:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
        opt.step()
    return [p.detach() for p in params], opt


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


CASES = {
    "sgd": (lambda p, g: SGD(p, g, lr=0.1),
            lambda p: torch.optim.SGD(p, lr=0.1, foreach=False)),
    "sgd-weight-decay": (lambda p, g: SGD(p, g, lr=0.1, weight_decay=0.05),
                         lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05, foreach=False)),
    "momentum": (lambda p, g: SGD(p, g, lr=0.1, momentum=0.9),
                 lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=False)),
    "momentum-weight-decay": (lambda p, g: SGD(p, g, lr=0.1, momentum=0.8, weight_decay=0.01),
                              lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, weight_decay=0.01, foreach=False)),
    "adamw": (lambda p, g: AdamW(p, g, lr=0.01),
              lambda p: torch.optim.AdamW(p, lr=0.01, foreach=False)),
    "adamw-settings": (lambda p, g: AdamW(p, g, lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
                       lambda p: torch.optim.AdamW(p, lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                                                   foreach=False)),
    # weight decay per parameter: torch's two parameter groups
    "adamw-per-parameter-decay": (
        lambda p, g: AdamW(p, g, lr=0.01, weight_decay=[0.1, 0.0, 0.1, 0.0]),
        lambda p: torch.optim.AdamW([{"params": [p[0], p[2]], "weight_decay": 0.1},
                                     {"params": [p[1], p[3]], "weight_decay": 0.0}], lr=0.01, foreach=False)),
}


@pytest.mark.parametrize("flat", [False, True], ids=["per-parameter", "flat"])
@pytest.mark.parametrize("schedule", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_optim_over_100_steps(case, schedule, flat):
    ours, theirs = CASES[case]
    a, _ = run_ours(ours, schedule=schedule, flat=flat)
    b, _ = run_torch(theirs, schedule=schedule)
    start = start_params()
    assert max_diff(a, start) > 0.1  # the parameters really moved
    assert max_diff(a, b) <= 1e-6


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_flat_update_is_the_per_parameter_update_bit_for_bit(case):
    """Parameters and gradients as views of one tensor each: the same elementwise ops on all of them
    at once, so the same numbers as updating parameter by parameter."""
    flat, opt = run_ours(CASES[case][0], flat=True)
    each, _ = run_ours(CASES[case][0])
    assert all(torch.equal(a, b) for a, b in zip(flat, each))
    assert all(packed(ts) is opt.flat[name] for name, ts in opt.state.items())  # the state laid out alike


def test_packed_finds_only_one_tensor_filled_end_to_end():
    base = torch.arange(10.0)
    a, b, c = base[:4].view(2, 2), base[4:9], base[9:]
    assert packed([a, b, c]) is base
    assert packed([a, b]) is None  # the end left out
    assert packed([b, a, c]) is None  # out of order
    assert packed([a, base[5:9], c]) is None  # a gap
    assert packed([a, b.clone(), c]) is None  # not a view of it
    assert packed([base[:10:2], base[1:10:2]]) is None  # not contiguous
    assert packed([base[:6].view(2, 3).T, base[6:]]) is None  # a transposed view: its numbers are not in its order
    assert packed([base[:6].view(3, 2)[:, :1], base[6:]]) is None  # a column of a matrix does not
    assert packed([]) is None


def test_a_wrong_update_is_caught():
    """The comparison has teeth: AdamW without bias correction drifts far beyond the tolerance."""

    class NoBiasCorrection(AdamW):
        @torch.no_grad()
        def step(self, lr=None):
            self.step_count += 1
            for p, g, m, v in zip(self.params, self.grads, self.state["exp_avg"], self.state["exp_avg_sq"]):
                p.mul_(1 - lr * self.weight_decay[0])
                m.lerp_(g, 0.1)
                v.mul_(0.999).addcmul_(g, g, value=0.001)
                p.addcdiv_(m, v.sqrt() + 1e-8, value=-lr)

    a, _ = run_ours(lambda p, g: NoBiasCorrection(p, g, lr=0.01))
    b, _ = run_torch(lambda p: torch.optim.AdamW(p, lr=0.01, foreach=False))
    assert max_diff(a, b) > 1e-3


@pytest.mark.parametrize("case", ["sgd", "momentum", "adamw-settings"])
def test_state_dict_resumes_exactly(case):
    """40 steps, save, a fresh optimizer loads the state, 60 more: bit for bit the 100-step run."""
    make = CASES[case][0]
    whole, _ = run_ours(make)
    params = start_params()
    grads = [torch.zeros_like(p) for p in params]
    opt = make(params, grads)
    for step in range(STEPS):
        if step == 40:
            state = opt.state_dict()
            assert state["step"].dtype == torch.int64 and int(state["step"]) == 40
            assert all(isinstance(v, torch.Tensor) for v in state.values())
            opt = make(params, grads)
            opt.load_state_dict(state)
        for i, (p, g) in enumerate(zip(params, grads)):
            g.copy_(gradient(p, step, i))
        opt.step(lr_at(step))
    for a, b in zip(params, whole):
        assert torch.equal(a, b)


def test_state_dict_is_a_copy():
    params = start_params()
    grads = [torch.ones_like(p) for p in params]
    opt = AdamW(params, grads, lr=0.1)
    opt.step()
    state = opt.state_dict()
    opt.step()
    assert int(state["step"]) == 1 and int(opt.state_dict()["step"]) == 2


def test_load_state_dict_rejects_a_mismatch():
    params = start_params()
    grads = [torch.zeros_like(p) for p in params]
    adamw = AdamW(params, grads, lr=0.1)
    with pytest.raises(HandgradError, match="missing"):
        adamw.load_state_dict(SGD(params, grads, lr=0.1, momentum=0.9).state_dict())
    with pytest.raises(HandgradError, match="unexpected"):
        SGD(params, grads, lr=0.1).load_state_dict(adamw.state_dict())
    bad = adamw.state_dict()
    bad["0.exp_avg"] = torch.zeros(2)
    with pytest.raises(HandgradError, match="shape"):
        adamw.load_state_dict(bad)


def test_optimizer_holds_the_models_gradient_buffers():
    model = build_model(ModelConfig(model="wavenet", block_size=4, n_embd=3, n_hidden=5, n_layers=2))
    for name in ("sgd", "momentum", "adamw"):
        opt = make_optimizer(name, model, lr=0.1, weight_decay=0.01)
        assert [id(g) for g in opt.grads] == [id(g) for g in model.grads()]
        assert [id(p) for p in opt.params] == [id(p) for p in model.parameters()]
        # and the one tensor that holds them all, and the one that holds every parameter
        assert opt.flat["grads"] is model.grad_buffer and opt.flat["params"] is model.param_buffer
    opt = make_optimizer("adamw", model, lr=0.1, weight_decay=0.01)
    decayed = {n for (n, _), wd in zip(model.named_parameters(), opt.weight_decay) if wd}
    assert decayed == {"embedding.weight", "linear1.weight", "linear2.weight", "linear3.weight"}


def test_make_optimizer_rejects_unknown_name():
    model = build_model(ModelConfig())
    with pytest.raises(HandgradError, match="unknown optimizer"):
        make_optimizer("adagrad", model, lr=0.1)


def test_step_schedule_is_the_seeds():
    assert [step_schedule(s, 10, 1.0) for s in range(10)] == [1.0] * 5 + [0.1] * 5


def test_cosine_schedule():
    lrs = [cosine_schedule(s, 1000, 1.0, warmup=100) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[99] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:99], lrs[1:100]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[99:], lrs[100:]))  # then only falls
    assert lrs[-1] == pytest.approx(0.01)  # down to lr/100 at the last step
    assert cosine_schedule(550, 1000, 1.0, warmup=100) == pytest.approx(0.505, abs=0.01)  # half way: about half
    assert cosine_schedule(0, 10, 1.0) == 1.0  # no warm-up


def test_the_cosine_schedule_ends_at_its_floor():
    lrs = [learning_rate("cosine", s, 1000, 2.0, 100, floor=0.1) for s in range(1000)]
    assert lrs[99] == pytest.approx(2.0) and lrs[-1] == pytest.approx(0.2)
    assert min(lrs[100:]) == pytest.approx(0.2)
    assert learning_rate("cosine", 999, 1000, 2.0, 100) == pytest.approx(0.02)  # lr/100 by default


def test_learning_rate_rejects_unknown_schedule():
    assert learning_rate("step", 7, 10, 1.0) == 0.1
    with pytest.raises(HandgradError, match="unknown learning-rate schedule"):
        learning_rate("linear", 0, 10, 1.0)


# ---- the weights' moving average


def test_the_moving_average_follows_its_formula_on_the_flat_parameters():
    """After update n: average += (1 - d_n) (p - average), d_n = min(decay, (1 + n) / (10 + n)), on the one flat
    tensor the model's parameters are views of; against the formula written out on copies, float64."""
    model = build_model(ModelConfig(model="mlp", n_hidden=8), seed=1, dtype=torch.float64)
    params = model.parameters()
    average = WeightAverage(params, decay=0.9)
    assert len(average.params) == 1 and average.params[0] is model.param_buffer
    expected = [p.clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 41):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        average.update()
        d = min(0.9, (1 + n) / (10 + n))
        expected = [e + (1 - d) * (p - e) for e, p in zip(expected, params)]
    got = views_like(average.average[0], params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
    assert not torch.equal(got[1], params[1])  # an average, not the last weights


def test_the_average_swaps_in_and_out_exactly_and_round_trips():
    model = build_model(ModelConfig(model="mlp", n_hidden=8), seed=1)
    average = WeightAverage(model.parameters(), decay=0.99)
    with torch.no_grad():
        model.param_buffer.add_(1.0)
    average.update()
    trained = model.param_buffer.clone()
    with average.swapped_in():
        assert torch.equal(model.param_buffer, average.average[0])
    assert torch.equal(model.param_buffer, trained)  # bit for bit the trained weights back
    other = WeightAverage(model.parameters(), decay=0.99)
    other.load_state_dict(average.state_dict())
    assert other.updates == 1 and torch.equal(other.average[0], average.average[0])
    with pytest.raises(HandgradError, match="does not match"):
        WeightAverage(model.parameters()[:2], decay=0.99).load_state_dict(average.state_dict())
    average.keep()
    assert torch.equal(model.param_buffer, average.average[0])
    with pytest.raises(HandgradError, match="decay"):
        WeightAverage(model.parameters(), decay=1.0)


def test_tied_weights_are_averaged_once():
    a, b = torch.zeros(3), torch.zeros(2)
    average = WeightAverage([a, b, a], decay=0.5)
    assert len(average.average) == 2
    a.add_(1.0)
    average.update()
    torch.testing.assert_close(average.average[0], torch.full((3,), 1 - 2 / 11))
