"""The replayed step against the eager step, bit for bit; what a recording refuses; the one
gradient buffer and the per-step divergence check that reads it."""
import json
import math

import pytest
import torch

from handgrad.divergence import DivergenceWatch
from handgrad.errors import HandgradError
from handgrad.fastpath import ReplayStep, compiled_train_step, manual_step
from handgrad.layers import Module, packed
from handgrad.model import ModelConfig, build_model
from handgrad.optim import make_optimizer
from handgrad import replay
from handgrad.replay import ReplayError, record

from cli_run import QUICK, run_cli


def test_a_recording_replays_the_calls_on_new_inputs():
    w = torch.randn(5, 3)
    acc = torch.zeros(3)

    def fn(x):
        h = torch.tanh(x @ w)  # an operator and a function, each written into a buffer of the replay
        acc.add_(h.sum(0))  # in place on a tensor made before: a constant of the replay
        return h.exp() * x.shape[0]  # metadata read into Python: a constant of the shape

    x1, x2 = torch.randn(4, 5), torch.randn(4, 5)
    first, rec = record(fn, x1)
    torch.testing.assert_close(first, torch.tanh(x1 @ w).exp() * 4, rtol=0, atol=0)
    acc_before = acc.clone()
    out2 = rec(x2)
    torch.testing.assert_close(out2, torch.tanh(x2 @ w).exp() * 4, rtol=0, atol=0)
    torch.testing.assert_close(acc, acc_before + torch.tanh(x2 @ w).sum(0), rtol=0, atol=0)
    out3 = rec(x1)
    assert out3 is not out2 and torch.equal(out3, first)  # what it returns is new each call, never a reused buffer
    assert "out=" in rec.source and rec.calls == 6


def test_a_view_of_persistent_tensors_is_made_once_and_writes_stay_calls():
    w = torch.arange(15.0).view(5, 3) - 7  # whole numbers: adding 1 twice is adding 2, exactly
    buf = torch.zeros(4, 3)

    def fn(x):
        w.T.add_(0)  # in place through a view: a call, every replay
        y = torch.mm(x, w.T.T, out=buf)  # w.T.T: views of w alone, made once; the write into buf: a call
        w.view(-1).add_(1)  # in place on a view of w: a call
        return y * w[0]  # w[0]: a view of w alone, made once

    x = torch.randn(4, 5)
    w0 = w.clone()
    _, rec = record(fn, x)
    assert rec.source.count("\n        ") == 5  # mm, add_ (twice), mul, return: no view made in the replay
    rec(x)
    torch.testing.assert_close(w, w0 + 2, rtol=0, atol=0)  # both replayed updates happened
    torch.testing.assert_close(rec(x), torch.mm(x, w0 + 2) * (w0[0] + 3), rtol=0, atol=0)  # mm, then w += 1
    assert w.T.T.data_ptr() == w.data_ptr()


def test_a_tensor_made_from_numbers_and_left_as_made_is_made_once():
    cache = {}

    def fn(x):
        if "rows" not in cache:  # a layer's constants, made on first use (the recording)
            cache["rows"], cache["half"] = torch.arange(x.shape[0]), torch.tensor(0.5)
        acc = torch.zeros(x.shape[1])  # made from numbers, then written: a call, every replay
        acc.add_(x.sum(0))
        ones = torch.ones(x.shape[1])  # returned: a call, never a tensor shared between calls
        scratch = torch.empty(x.shape[0])  # values undefined until written: a call
        torch.mul(x[:, 0], 2, out=scratch)
        return x[cache["rows"]].mul(cache["half"]) + acc + scratch[:, None], ones

    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    first, rec = record(fn, x1)
    made = [c for c in rec.fn.__closure__ if isinstance(c.cell_contents, torch.Tensor)]
    assert any(c.cell_contents is cache["rows"] for c in made) and any(c.cell_contents is cache["half"] for c in made)
    # zeros, sum, add_, ones, empty, select, mul, index, mul, add, [:, None], add: not arange, not tensor
    assert rec.calls == 12
    for x in (x2, x1, x2):
        out, ones = rec(x)
        torch.testing.assert_close(out, x * 0.5 + x.sum(0) + 2 * x[:, :1], rtol=0, atol=0)
        assert torch.equal(ones, torch.ones(3)) and ones is not first[1]
        ones.add_(1)  # the caller's to change: the next call's is new


def test_a_tensor_made_from_numbers_and_written_stays_a_call_even_if_put_back():
    def fn(x):
        z = torch.full((3,), 0.1)
        y = z * 2
        big = x.sum(0) * 1e8
        z.add_(big).sub_(big)  # back to 0.1 exactly when x is 0 (the recording), not in general
        return y + z

    first, rec = record(fn, torch.zeros(4, 3))
    assert torch.equal(first, fn(torch.zeros(4, 3)))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # a tensor kept between calls would start the next call away from 0.1
        torch.testing.assert_close(rec(x), fn(x), rtol=0, atol=0)


@pytest.mark.parametrize("read", [lambda t: t.sum().item(), lambda t: float(t.sum()), lambda t: bool(t.max() > 0),
                                  lambda t: t.tolist(), lambda t: t[t > 0], lambda t: t.nonzero()])
def test_a_recording_refuses_what_a_replay_cannot_repeat(read):
    calls = []

    def fn(x):
        y = x * 2
        read(y)
        calls.append(1)
        return y + 1

    x = torch.randn(3)
    with pytest.raises(ReplayError) as e:
        record(fn, x)
    assert calls == [1]  # the function still ran to its end, once
    torch.testing.assert_close(e.value.result, x * 2 + 1)


def test_random_calls_draw_anew_on_each_replay(monkeypatch):
    monkeypatch.setattr(replay, "RANDOM", set())  # random calls found by the generator's state alone
    mean, std = torch.zeros(4), torch.ones(4)

    def fn(x):
        return torch.normal(mean, std) + torch.nn.functional.dropout(x, 0.5, training=True)

    x = torch.ones(4)
    torch.manual_seed(0)
    eager = [fn(x) for _ in range(3)]
    torch.manual_seed(0)
    first, rec = record(fn, x)
    replayed = [first, rec(x), rec(x)]
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed))  # the same draws, in the same order
    assert not torch.equal(replayed[1], replayed[2])


def test_a_recording_must_return_tensors():
    with pytest.raises(ReplayError, match="must return tensors"):
        record(lambda x: None, torch.zeros(2))


CONFIGS = {
    "mlp": ModelConfig(vocab_size=7, block_size=3, n_embd=4, n_hidden=16),
    "mlp-stepwise": ModelConfig(vocab_size=7, block_size=3, n_embd=4, n_hidden=16, stepwise=True),
    "deep-mlp": ModelConfig(model="deep-mlp", vocab_size=7, block_size=3, n_embd=4, n_hidden=16, n_layers=3),
    "wavenet": ModelConfig(model="wavenet", vocab_size=7, block_size=8, n_embd=4, n_hidden=16, n_layers=3),
}


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def deterministic():
    """Call to have torch pick deterministic kernels (warning where it has none) until the test ends."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield lambda: torch.use_deterministic_algorithms(True, warn_only=True)
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("name,optimizer", [("mlp", "sgd"), ("mlp-stepwise", "momentum"), ("deep-mlp", "adamw"),
                                            ("wavenet", "momentum")])
@pytest.mark.parametrize("dtype,device", [(torch.float32, "cpu"), (torch.float64, "cpu"),
                                          pytest.param(torch.float32, "cuda", marks=needs_gpu)])
def test_replay_is_the_eager_step_bit_for_bit(name, optimizer, dtype, device, deterministic):
    """On a GPU the Embedding's scatter-add adds in whatever order its atomic adds land, so two eager
    steps differ in the last bits too: the GPU run asks for torch's deterministic kernels."""
    if device == "cuda":
        deterministic()
    config = CONFIGS[name]
    models = [build_model(config, seed=3, dtype=dtype, device=device) for _ in range(2)]
    opts = [make_optimizer(optimizer, m, lr=0.1) for m in models]
    replayed = ReplayStep(models[1])
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        batch = 8 if step < 20 else 12  # a second batch shape: a second recording
        x = torch.randint(0, 7, (batch, config.block_size), generator=g).to(device)
        y = torch.randint(0, 7, (batch,), generator=g).to(device)
        assert torch.equal(manual_step(models[0], x, y), replayed(x, y)), step
        for o in opts:
            o.step()
    assert replayed.fallback is None and len(replayed.recordings) == 2
    eager, fast = models
    for a, b in zip(eager.parameters() + eager.grads() + [t for _, t in eager.named_buffers()],
                    fast.parameters() + fast.grads() + [t for _, t in fast.named_buffers()]):
        assert torch.equal(a, b)


class ReadsAValue(Module):
    """Passes the ids through, having read a value into Python, as a recording cannot repeat."""

    def forward(self, x):
        self.saved["largest"] = int(x.max())
        return x

    def backward(self, dout):
        return dout


def test_a_refused_recording_falls_back_to_the_eager_step():
    models = [build_model(CONFIGS["mlp"], seed=3) for _ in range(2)]
    for m in models:
        m.net.layers = {"reads": ReadsAValue(), **m.net.layers}
    replayed = ReplayStep(models[1])
    lines = []
    step_fn = compiled_train_step(models[1], "replay", report=lines.append)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randint(0, 7, (8, 3), generator=g), torch.randint(0, 7, (8,), generator=g)
        assert torch.equal(manual_step(models[0], x, y), step_fn(models[1], x, y))
    assert len(lines) == 1 and "reads a value into Python" in lines[0] and "runs eagerly" in lines[0]
    x, y = torch.randint(0, 7, (8, 3), generator=g), torch.randint(0, 7, (8,), generator=g)
    replayed(x, y)
    assert replayed.fallback is not None and "__int__" in replayed.fallback


@pytest.mark.parametrize("change,why", [
    (lambda held: held["seen"].add_(1), None),
    (lambda held: held.__setitem__("seen", held["seen"] + 1), "seen was replaced by a new tensor during the step"),
    (lambda held: held.pop("seen"), "seen was removed during the step"),
    (lambda held: held.__setitem__("later", torch.zeros(1)), "later was added during the step"),
])
def test_a_recording_refuses_a_persistent_tensor_replaced_rather_than_updated(change, why):
    held = {"seen": torch.zeros(1)}

    def fn(x):
        change(held)
        return x * 2

    x = torch.ones(3)
    if why is None:
        _, rec = record(fn, x, persistent=lambda: list(held.items()))
        rec(x)
        assert float(held["seen"]) == 2  # the recorded step's add, then the replay's
        return
    with pytest.raises(ReplayError, match=f"^{why}; the replay needs persistent tensors updated in place") as e:
        record(fn, x, persistent=lambda: list(held.items()))
    assert torch.equal(e.value.result, x * 2)


class CountsExamples(Module):
    """Passes the ids through, counting the examples it has trained on in a buffer, in place or
    (as a replay cannot repeat) by putting a new tensor in the buffer's place."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place
        self.buffers["seen"] = torch.zeros(())

    def forward(self, x):
        if self.training:
            if self.in_place:
                self.buffers["seen"].add_(x.shape[0])
            else:
                self.buffers["seen"] = self.buffers["seen"] + x.shape[0]
        return x

    # d out / d x = 1
    def backward(self, dout):
        return dout


class CountsStepsInPython(Module):
    """Adds its step count, a Python number, to a buffer (in place): the recording sees an add of a
    constant, and a replay would add the first step's count every step."""

    def __init__(self):
        super().__init__()
        self.steps = 0
        self.buffers["total"] = torch.zeros(())

    def forward(self, x):
        if self.training:
            self.steps += 1
            self.buffers["total"].add_(self.steps)
        return x

    # d out / d x = 1
    def backward(self, dout):
        return dout


class ScalesByStep(Module):
    """Scales the logits by 1 + steps / 10, the step count a Python number: a replay would scale by
    the first step's factor."""

    def __init__(self):
        super().__init__()
        self.steps = 0

    def forward(self, x):
        if self.training:
            self.steps += 1
        self.scale = 1 + self.steps / 10
        return x * self.scale

    # d out / d x = scale
    def backward(self, dout):
        return dout * self.scale


class DropsHalf(Module):
    """Zeroes each activation with probability 1/2 and doubles the rest: random draws on each step."""

    def forward(self, x):
        self.saved["mask"] = (torch.rand(x.shape, dtype=x.dtype) > 0.5).to(x.dtype) * 2
        return x * self.saved["mask"]

    # d out / d x = mask
    def backward(self, dout):
        return dout * self.saved["mask"]


def with_layer(model, after: str | None, name: str, layer):
    """`model` with `layer` put in after the layer `after` (None: first)."""
    layers = list(model.net.layers.items())
    at = 0 if after is None else [n for n, _ in layers].index(after) + 1
    model.net.layers = dict(layers[:at] + [(name, layer)] + layers[at:])
    return model


def run_side_by_side(make_layer, after, steps: int = 5, seeded: bool = False):
    """The eager step and `compiled_train_step(..., "replay")` on two copies of the mlp with `make_layer()`
    put in, `steps` steps of SGD: the losses agree step by step; the two models, the replayed step and
    the lines it reported."""
    models = [with_layer(build_model(CONFIGS["mlp"], seed=3), after, "planted", make_layer()) for _ in range(2)]
    opts = [make_optimizer("sgd", m, lr=0.1) for m in models]
    lines = []
    step_fn = compiled_train_step(models[1], "replay", report=lines.append)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x, y = torch.randint(0, 7, (8, 3), generator=g), torch.randint(0, 7, (8,), generator=g)
        losses = []
        for m, fn in zip(models, (manual_step, step_fn)):
            if seeded:  # each model's step draws the same numbers
                torch.manual_seed(step)
            losses.append(fn(m, x, y))
        assert torch.equal(*losses), step
        for o in opts:
            o.step()
    eager, fast = models
    for a, b in zip(eager.parameters() + eager.grads() + [t for _, t in eager.named_buffers()],
                    fast.parameters() + fast.grads() + [t for _, t in fast.named_buffers()]):
        assert torch.equal(a, b)
    return models, step_fn.replayed, lines


@pytest.mark.parametrize("in_place", [True, False])
def test_a_step_replacing_a_buffer_is_refused_and_runs_eagerly(in_place):
    models, replayed, lines = run_side_by_side(lambda: CountsExamples(in_place), None)
    assert [float(m.net.layers["planted"].buffers["seen"]) for m in models] == [40, 40]  # 5 steps of 8
    if in_place:
        assert replayed.fallback is None and lines == [] and len(replayed.recordings) == 1
    else:
        assert len(lines) == 1 and "runs eagerly" in lines[0]
        assert replayed.fallback == ("layer buffer 'planted.seen' was replaced by a new tensor during the step; "
                                     "the replay needs persistent tensors updated in place (.copy_, .add_, ...)")


@pytest.mark.parametrize("make_layer,after,differs", [
    (CountsStepsInPython, None, "layer buffer 'planted.total'"),
    (ScalesByStep, "linear2", "the loss"),
])
def test_the_first_replay_is_checked_against_the_eager_step(make_layer, after, differs):
    """A Python number that changes each step: the identity of the persistent tensors holds, the
    recording is taken, and the check of its first replay finds the tensor the replay got wrong."""
    models, replayed, lines = run_side_by_side(make_layer, after)
    assert all(m.net.layers["planted"].steps == 5 for m in models)  # the check's eager step counted once
    assert len(lines) == 1 and "runs eagerly" in lines[0]
    assert replayed.fallback.startswith(f"the first replay differs from the eager step in {differs}:")
    assert not replayed.recordings and not replayed.unchecked


def test_the_check_draws_the_same_numbers_for_the_replay_and_the_eager_step():
    _, replayed, lines = run_side_by_side(DropsHalf, "linear1", seeded=True)
    assert replayed.fallback is None and lines == [] and len(replayed.recordings) == 1


def test_the_check_asks_for_deterministic_kernels_on_a_gpu_only_and_puts_the_setting_back():
    from handgrad.fastpath import reproducible_kernels

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    assert not before[0]
    with reproducible_kernels(torch.device("cpu")):
        assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(KeyError):  # put back however the block ends
        with reproducible_kernels(torch.device("cuda")):
            assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
            raise KeyError
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before


def test_train_falls_back_to_the_eager_step_where_a_layer_replaces_a_buffer(tmp_path, capsys, monkeypatch):
    import handgrad.train as training
    from cli_run import weights
    from handgrad.train import TrainConfig

    build = training.build_model
    monkeypatch.setattr(training, "build_model",
                        lambda *a, **kw: with_layer(build(*a, **kw), None, "counter", CountsExamples(False)))
    runs = {}
    for impl in ("replay", "eager"):
        out = tmp_path / impl
        capsys.readouterr()
        run = training.train(TrainConfig(out=str(out), steps=30, batch_size=16, impl=impl, check=False,
                                         eval_every=0, log_every=5, num_samples=0))
        err = capsys.readouterr().err
        assert run["impl"] == "eager" and json.loads((out / "run.json").read_text())["impl"] == "eager"
        assert float(weights(out)["counter.seen"]) == 30 * 16  # every step counted, replay or not
        runs[impl] = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        said = [line for line in err.splitlines() if line.startswith("step:")]
        assert said == ([] if impl == "eager" else [
            "step: the eager step's calls cannot be replayed (layer buffer 'counter.seen' was replaced by a new tensor "
            "during the step; the replay needs persistent tensors updated in place (.copy_, .add_, ...)); it runs eagerly"])
    assert runs["replay"] == runs["eager"] and len(runs["eager"]) == 7


def test_replay_refuses_a_model_in_eval_mode():
    model = build_model(CONFIGS["mlp"])
    model.eval()
    with pytest.raises(HandgradError, match="training mode"):
        ReplayStep(model)(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_train_replay_and_eager_log_the_same_run(tmp_path, capsys):
    runs = {}
    for impl in ("replay", "eager"):
        out = tmp_path / impl
        rc, text, err = run_cli(["train", "-o", out, "--steps", 60, "--impl", impl, "--check-every", 25, *QUICK], capsys)
        assert rc == 0, err
        assert f"manual gradients, {impl}" in text
        runs[impl] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert json.loads((out / "run.json").read_text())["impl"] == impl
    assert [r["train_loss"] for r in runs["replay"]] == [r["train_loss"] for r in runs["eager"]]
    rc, text, _ = run_cli(["train", "-o", tmp_path / "auto", "--steps", 10, *QUICK], capsys)
    assert rc == 0 and "manual gradients, replay (auto: at batch 32" in text


def test_parameters_and_gradient_buffers_are_views_of_one_tensor_each():
    model = build_model(CONFIGS["deep-mlp"])
    values = [p.clone() for p in model.parameters()]
    model.to(dtype=torch.float64)  # moved: gathered again, the values kept
    assert all(torch.equal(p, v.double()) for p, v in zip(model.parameters(), values))
    for flat, tensors in ((model.param_buffer, model.parameters()), (model.grad_buffer, model.grads())):
        assert packed(tensors) is flat and flat.dtype == torch.float64
        flat.fill_(1.0)
        assert all(bool((t == 1).all()) for t in tensors)
    model.zero_grad()  # one op on the flat buffer
    assert not model.grad_buffer.any() and all(not g.any() for g in model.grads())
    model.net.to()  # the layers may hold new tensors: the net forgets the flat ones
    assert model.grad_buffer is None and model.param_buffer is None
    model.grads()[0].fill_(2.0)
    model.zero_grad()  # buffer by buffer
    assert not model.grads()[0].any()


def test_a_tensor_held_twice_is_flattened_once_and_stays_one_tensor():
    """A tensor in two places (tied weights) gets one part of the flat tensor, and both places the
    same view of it: copies would part them. (It was once refused, the tensors left unflattened.)"""
    net = build_model(CONFIGS["mlp"]).net
    bn = net.layers["batchnorm1"]
    tied, tied_grad = bn.params["weight"].clone(), bn.grads["weight"].clone()
    bn.params["weight"] = bn.params["bias"] = tied
    bn.grads["weight"] = bn.grads["bias"] = tied_grad
    net.flatten()
    params, grads = [p for _, p in net.named_parameters()], [g for _, g in net.named_grads()]
    assert net.param_buffer is not None and packed(params) is net.param_buffer
    assert net.grad_buffer is not None and packed(grads) is net.grad_buffer and packed(net.grad_list) is net.grad_buffer
    assert net.param_buffer.numel() == sum(p.numel() for p in params)  # the tied tensor once
    assert bn.params["weight"] is bn.params["bias"] and bn.params["weight"]._base is net.param_buffer
    assert bn.grads["weight"] is bn.grads["bias"] and torch.equal(bn.params["weight"], tied)


@pytest.mark.parametrize("with_buffer", [True, False])
def test_the_divergence_check_names_the_first_bad_gradient_at_its_step(with_buffer):
    model = build_model(CONFIGS["mlp"])
    names = [n for n, _ in model.named_parameters()]
    watch = DivergenceWatch(list(zip(names, model.grads())), 0.1, grad_buffer=model.grad_buffer if with_buffer else None)
    assert watch.sums == ([model.grad_buffer] if with_buffer else model.grads())
    watch.observe(0, torch.tensor(2.0))
    model.grads()[2].view(-1)[1] = -math.inf
    model.grads()[4][0, 0] = math.nan
    with pytest.raises(HandgradError, match=f"step 1: the gradient of {names[2]} became NaN or infinite"):
        watch.observe(1, torch.tensor(2.0))
    with pytest.raises(HandgradError, match="step 2: the loss became NaN"):
        watch.observe(2, torch.tensor(math.nan))
    model.zero_grad()
    model.grads()[0].fill_(3e38)  # finite gradients whose sum overflows: no verdict on them
    watch.observe(3, torch.tensor(2.0))
