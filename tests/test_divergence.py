"""A diverging run stops at the step it went bad, with one line, and leaves the last good checkpoint
whole and loadable: nothing non-finite is ever written as a model."""
import math

import pytest
import torch
from cli_run import QUICK, assert_one_line_error, run_cli, snapshot, weights

from handgrad import checkpoint
from handgrad.divergence import DivergenceWatch, loss_limit
from handgrad.errors import HandgradError
from handgrad.layers import BatchNorm1d
from handgrad.model import ModelConfig, build_model


@pytest.mark.parametrize("lr", ["1e6", "1e9", "1e3"])
def test_a_diverging_run_stops_in_one_line_and_leaves_a_loadable_checkpoint(lr, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(["train", "-o", out, "--lr", lr, "--steps", 300, *QUICK], capsys)
    assert_one_line_error(rc, err, "step ", "lower the learning rate (--lr", "checkpoint of step 0 is left as it was",
                          f"handgrad train -o {out} --resume --lr LOWER")
    assert all(torch.isfinite(t).all() for t in weights(out).values())
    assert all(torch.isfinite(t).all() for t in weights(out, checkpoint.CHECKPOINT).values())
    rc, text, err = run_cli(["sample", "-o", out, "-n", 3, "--seed", 1], capsys)
    assert rc == 0 and len(text.splitlines()) == 3, err
    rc, text, err = run_cli(["eval", "-o", out], capsys)
    assert rc == 0 and "nan" not in text, err
    # the hint works: the run resumes from the checkpoint it left with a lower rate
    rc, text, err = run_cli(["train", "-o", out, "--resume", "--lr", "0.1", "--steps", 50], capsys)
    assert rc == 0, err


def test_on_the_seed_data_too(names_txt, tmp_path, capsys):
    rc, _, err = run_cli(["train", "-i", names_txt, "-o", tmp_path / "r", "--lr", "1e9", "--steps", 500, *QUICK], capsys)
    assert_one_line_error(rc, err, "lower the learning rate")


def test_a_loss_far_above_its_start_stops_the_run_though_finite():
    model = build_model(ModelConfig())
    names = [n for n, _ in model.named_parameters()]
    watch = DivergenceWatch(list(zip(names, model.grads())), 0.1, vocab_size=27)
    watch.observe(0, torch.tensor(3.3))
    limit = loss_limit(3.3, 27)
    assert limit == pytest.approx(3.3 + 3 * math.log(27))
    watch.observe(1, torch.tensor(limit - 0.01))  # high, and still within bounds
    with pytest.raises(HandgradError, match=r"step 2: the loss rose to 16.*far above where the run started"):
        watch.observe(2, torch.tensor(16.0))


def test_the_queued_check_also_watches_the_loss_limit():
    """The GPU's path: steps are queued and read at the next log, the loss's limit among them."""
    model = build_model(ModelConfig())
    names = [n for n, _ in model.named_parameters()]
    watch = DivergenceWatch(list(zip(names, model.grads())), 0.1, vocab_size=27)
    watch.now = False
    for step, loss in enumerate([3.3, 3.0, 2.9, 40.0, 2.0]):
        watch.observe(step, torch.tensor(loss))
    with pytest.raises(HandgradError, match="step 3: the loss rose to 40"):
        watch.check()


def test_a_resumed_run_keeps_the_limit_of_its_first_step():
    model = build_model(ModelConfig())
    named = list(zip([n for n, _ in model.named_parameters()], model.grads()))
    watch = DivergenceWatch(named, 0.1, vocab_size=27, start_loss=3.3)
    with pytest.raises(HandgradError, match="loss rose"):
        watch.observe(500, torch.tensor(14.0))  # the first step observed since the resume: judged, not taken as the start


def test_non_finite_running_statistics_stop_the_run_before_a_save(tmp_path, capsys, monkeypatch):
    """A BatchNorm whose running variance overflows while the loss and gradients stay finite: the run stops
    at the next log naming it, and the last checkpoint stays as it was."""
    update = BatchNorm1d.update_running_stats
    calls = []

    def overflow_at_15(self, mean, var):
        update(self, mean, var)
        calls.append(1)
        if len(calls) == 15:
            self.buffers["running_var"][3] = math.inf

    monkeypatch.setattr(BatchNorm1d, "update_running_stats", overflow_at_15)
    out = tmp_path / "run"
    rc, _, err = run_cli(["train", "-o", out, "--steps", 40, "--save-every", 10, "--impl", "eager", "-n", "0",
                          "--no-check", "--eval-every", "0", "--log-every", "5"], capsys)
    assert_one_line_error(rc, err, "step 15: the running statistic batchnorm1.running_var became NaN or infinite",
                          "checkpoint of step 10 is left as it was")
    assert checkpoint.load_checkpoint(out).step == 10
    assert all(torch.isfinite(t).all() for t in weights(out).values())


def test_a_non_finite_validation_loss_stops_the_run(tmp_path, capsys, monkeypatch):
    from handgrad import train as training

    evaluate = training.evaluate
    monkeypatch.setattr(training, "evaluate",
                        lambda model, X, Y, **kw: math.nan if len(Y) < 5000 else evaluate(model, X, Y, **kw))
    out = tmp_path / "run"
    rc, _, err = run_cli(["train", "-o", out, "--steps", 30, "--eval-every", 10, "-n", "0", "--no-check"], capsys)
    assert_one_line_error(rc, err, "step 0: the validation loss became NaN or infinite")
    before = snapshot(out)
    assert checkpoint.CHECKPOINT in before and checkpoint.load_checkpoint(out).step == 0
