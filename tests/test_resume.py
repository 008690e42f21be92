"""Checkpoints and exact resume, through the command line: an interrupted run, resumed, ends
bit-identical to one that never stopped, and its metrics continue rather than restart."""
import json
import math

import torch
from cli_run import (
    QUICK,
    assert_bit_identical,
    assert_one_line_error,
    interrupt_after_save,
    metrics,
    run_cli,
    snapshot,
    weights,
)

from handgrad import checkpoint
from handgrad.model import Model


def straight_and_resumed(tmp_path, capsys, monkeypatch, steps, stop_at, extra=(), resume_extra=()):
    """Train `steps` straight; train the same run interrupted (Ctrl-C) after `stop_at`, then --resume."""
    a, b = tmp_path / "straight", tmp_path / "resumed"
    rc, _, err = run_cli(["train", "-o", a, "--steps", steps, *QUICK, *extra], capsys)
    assert rc == 0, err
    with monkeypatch.context() as m:
        interrupt_after_save(m, stop_at)
        rc, _, err = run_cli(["train", "-o", b, "--steps", steps, "--save-every", stop_at, *QUICK, *extra], capsys)
    assert rc == 130
    assert f"saved the state after step {stop_at}" in err
    assert checkpoint.load_checkpoint(b).step == stop_at
    assert not (b / "run.json").exists()  # the run did not finish
    rc, out, err = run_cli(["train", "-o", b, "--resume", *resume_extra], capsys)
    assert rc == 0, err
    assert f"at step {stop_at}" in out
    return a, b


def saved_run(tmp_path, capsys, *extra):
    """A finished 20-step run in tmp_path / "run", and a snapshot of its folder to prove a refusal left it alone."""
    out = tmp_path / "run"
    assert run_cli(["train", "-o", out, *extra, "--steps", 20, *QUICK], capsys)[0] == 0
    return out, snapshot(out)


def assert_same_run(a, b):
    assert_bit_identical(weights(a), weights(b))
    # optimizer state and generators too: the two runs could go on identically
    assert_bit_identical(weights(a, checkpoint.CHECKPOINT), weights(b, checkpoint.CHECKPOINT))
    assert metrics(a) == metrics(b)
    assert (a / "samples.txt").read_bytes() == (b / "samples.txt").read_bytes()


def test_resume_is_bit_identical_on_builtin_data(tmp_path, capsys, monkeypatch):
    # the default gradient check stays on here: it must not disturb the resumed state either
    quick = [x for x in QUICK if x != "--no-check"]
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(["train", "-o", a, "--steps", 400, *quick], capsys)[0] == 0
    with monkeypatch.context() as m:
        interrupt_after_save(m, 200)
        assert run_cli(["train", "-o", b, "--steps", 400, "--save-every", 200, *quick], capsys)[0] == 130
    assert run_cli(["train", "-o", b, "--resume"], capsys)[0] == 0
    assert_same_run(a, b)
    assert [r["step"] for r in metrics(b)] == [*range(0, 400, 20), 399]  # continued, not restarted
    assert json.loads((b / "run.json").read_text())["config"]["steps"] == 400


def test_resume_is_bit_identical_on_names_txt(tmp_path, capsys, monkeypatch, names_txt):
    a, b = straight_and_resumed(tmp_path, capsys, monkeypatch, 400, 200, ["-i", names_txt, "--eval-every", 200])
    assert_same_run(a, b)
    assert any("val_loss" in r for r in metrics(b))


def test_resume_restores_adamw_state(tmp_path, capsys, monkeypatch):
    extra = ["--optimizer", "adamw", "--schedule", "cosine", "--warmup", 20, "--lr", 0.01]
    a, b = straight_and_resumed(tmp_path, capsys, monkeypatch, 100, 50, extra)
    assert_same_run(a, b)
    assert any(k.startswith("optimizer.") and k != "optimizer.step" for k in weights(b, checkpoint.CHECKPOINT))


def test_resume_after_a_kill_drops_metrics_past_the_checkpoint(tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(["train", "-o", a, "--steps", 200, *QUICK], capsys)[0] == 0
    with monkeypatch.context() as m:
        interrupt_after_save(m, 100)
        assert run_cli(["train", "-o", b, "--steps", 200, "--save-every", 100, *QUICK], capsys)[0] == 130
    # what a kill -9 after step 100's checkpoint leaves: records past it, and half a line
    with open(b / checkpoint.METRICS, "a") as f:
        f.write(json.dumps({"step": 120, "lr": 1.0, "train_loss": 9.0}) + "\n" + '{"step": 140, "lr": 1.0, "tr')
    assert run_cli(["train", "-o", b, "--resume"], capsys)[0] == 0
    assert metrics(a) == metrics(b)
    assert_bit_identical(weights(a), weights(b))


def test_resume_with_more_steps_continues_the_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", "-o", out, "--steps", 60, *QUICK], capsys)[0] == 0
    first = metrics(out)
    rc, _, err = run_cli(["train", "-o", out, "--resume", "--steps", 100], capsys)
    assert rc == 0, err
    steps = [r["step"] for r in metrics(out)]
    assert metrics(out)[: len(first)] == first
    assert steps == sorted(set(steps)) and steps[-1] == 99
    assert checkpoint.load_checkpoint(out).step == 100
    assert json.loads((out / "run.json").read_text())["config"]["steps"] == 100


def test_resume_of_a_finished_run_says_how_to_go_on(tmp_path, capsys):
    out, before = saved_run(tmp_path, capsys)
    rc, _, err = run_cli(["train", "-o", out, "--resume"], capsys)
    assert_one_line_error(rc, err, "already finished its 20 steps", "--steps")
    rc, _, err = run_cli(["train", "-o", out, "--resume", "--steps", 10], capsys)
    assert_one_line_error(rc, err, "--steps 10", "saved step 20")
    assert snapshot(out) == before


def test_resume_refuses_a_setting_that_changes_the_run(tmp_path, capsys):
    out, before = saved_run(tmp_path, capsys)
    rc, _, err = run_cli(["train", "-o", out, "--resume", "--steps", 40, "--batch-size", 64], capsys)
    assert_one_line_error(rc, err, "--batch-size 64 differs from the saved run's 32")
    # setting a value the run already has is no change
    rc, _, err = run_cli(["train", "-o", out, "--resume", "--steps", 40, "--batch-size", 32, "--seed", 42], capsys)
    assert rc == 0, err
    assert checkpoint.load_checkpoint(out).step == 40
    assert before.keys() <= snapshot(out).keys()


def test_resume_refuses_different_data(tmp_path, capsys):
    data = tmp_path / "words.txt"
    data.write_text("\n".join(f"name{chr(97 + i)}{chr(97 + j)}" for i in range(6) for j in range(6)) + "\n")
    out, before = saved_run(tmp_path, capsys, "-i", data)
    data.write_text(data.read_text() + "zelda\n")
    rc, _, err = run_cli(["train", "-o", out, "--resume", "--steps", 40], capsys)
    assert_one_line_error(rc, err, "data differs", "same file")
    assert snapshot(out) == before


def test_a_fresh_run_never_overwrites_a_saved_one(tmp_path, capsys):
    out, before = saved_run(tmp_path, capsys)
    rc, _, err = run_cli(["train", "-o", out, "--steps", 20, *QUICK], capsys)
    assert_one_line_error(rc, err, "already holds a run", "--resume")
    assert snapshot(out) == before


def test_nothing_to_resume(tmp_path, capsys):
    rc, _, err = run_cli(["train", "-o", tmp_path, "--resume"], capsys)
    assert_one_line_error(rc, err, "nothing to resume", checkpoint.CHECKPOINT)
    rc, _, err = run_cli(["train", "-o", tmp_path / "absent", "--resume"], capsys)
    assert_one_line_error(rc, err, "no such run folder")


def test_checkpoints_every_n_steps_hold_the_whole_state(tmp_path, capsys, monkeypatch):
    saved = []
    save = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda out, *, step, **kw: (save(out, step=step, **kw), saved.append(step)))
    out = tmp_path / "run"
    assert run_cli(["train", "-o", out, "--steps", 50, "--save-every", 20, *QUICK], capsys)[0] == 0
    assert saved == [0, 20, 40, 50]  # the untrained state, every 20 steps, and at the end
    ckpt = checkpoint.load_checkpoint(out)
    assert ckpt.step == 50 and ckpt.meta["config"]["steps"] == 50
    assert {"rng.torch_cpu"} <= ckpt.rng.keys() and len(ckpt.meta["python_random"][1]) == 625
    assert "batchnorm1.running_var" in ckpt.model_state
    assert ckpt.optimizer_state["step"] == 50
    model_meta = json.loads((out / checkpoint.MODEL_META).read_text())
    assert model_meta["step"] == 50 and model_meta["data"]["source"] == "builtin:names"


def test_divergence_stops_with_the_step_and_a_hint(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(["train", "-o", out, "--steps", 50, "--lr", 1e30, *QUICK], capsys)
    assert_one_line_error(rc, err, "step 1: the loss", "lower the learning rate (--lr",
                          "the checkpoint of step 0 is left as it was")
    assert checkpoint.load_checkpoint(out).step == 0  # the untrained state, saved before the first step


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """A NaN gradient at step 25 (the loss itself stays finite): the checkpoint of step 20 is left whole."""
    out = tmp_path / "run"
    saved = {}
    save = checkpoint.save_checkpoint

    def save_and_record(out_dir, *, step, **kw):
        save(out_dir, step=step, **kw)
        saved[step] = snapshot(out_dir)

    backward, calls = Model.backward, []

    def backward_nan_at_25(self):
        backward(self)
        if len(calls) == 25:
            self.grads()[0].view(-1)[0] = math.nan
        calls.append(1)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_checkpoint", save_and_record)
        m.setattr(Model, "backward", backward_nan_at_25)
        # eager: a replayed step would not call the patched backward again after recording it
        rc, _, err = run_cli(["train", "-o", out, "--steps", 100, "--save-every", 10, "--impl", "eager", *QUICK], capsys)
    assert_one_line_error(rc, err, "step 25: the gradient of embedding.weight became NaN", "lower the learning rate",
                          "checkpoint of step 20 is left as it was")
    assert sorted(saved) == [0, 10, 20]
    after = snapshot(out)
    for name in (checkpoint.CHECKPOINT, checkpoint.MODEL_WEIGHTS, checkpoint.MODEL_META):
        assert after[name] == saved[20][name]
    assert all(r["step"] < 25 for r in metrics(out))
    # the hint works: resume from step 20 with a lower learning rate
    rc, out_text, err = run_cli(["train", "-o", out, "--resume", "--lr", 0.5], capsys)
    assert rc == 0, err
    assert "at step 20" in out_text
    assert checkpoint.load_checkpoint(out).meta["config"]["lr"] == 0.5
    assert all(torch.isfinite(t).all() for t in weights(out).values())


def test_a_resumed_run_keeps_the_path_auto_chose_though_the_steps_left_would_choose_another(tmp_path, capsys,
                                                                                          monkeypatch):
    """`--impl auto` chooses from the steps left: a run long enough to compile, resumed with too few steps left
    to repay a compile, would replay (other arithmetic). The checkpoint records the path: the resumed run
    compiles too, and ends bit for bit where the uninterrupted run does."""
    from handgrad import fastpath

    # 40 steps of batch 128 repay this compile, the 10 left after step 30 do not
    monkeypatch.setattr(fastpath, "COMPILE_SECONDS", 30 * 1.05e-6 * 28)
    assert fastpath.worth_compiling(40, 128) and not fastpath.worth_compiling(10, 128)
    a, b = straight_and_resumed(tmp_path, capsys, monkeypatch, 40, 30, extra=("--batch-size", 128))
    assert checkpoint.load_checkpoint(b).meta["step_impl"] == "compiled"
    assert json.loads((b / "run.json").read_text())["impl"] == "compiled"
    assert_same_run(a, b)


def test_a_resume_that_changes_the_arithmetic_says_so(tmp_path, capsys):
    out, _ = saved_run(tmp_path, capsys, "--save-every", 10)
    rc, _, err = run_cli(["train", "-o", out, "--resume", "--steps", 30, "--impl", "eager", "--threads", 2], capsys)
    assert rc == 0, err
    assert ("warning: the saved run's steps ran replay, these run eager; --threads 2 where the saved run had 1: "
            "the resumed run will not be bit-identical to an uninterrupted one") in err.splitlines()
