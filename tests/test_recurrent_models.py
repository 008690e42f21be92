"""The recurrent model families (rnn, gru, lstm) through the whole pipeline: check, train, eval, sample,
exact resume; and manual training tracking autograd's step for step."""
import json

import pytest
from cli_run import QUICK, assert_bit_identical, metrics, run_cli, weights

from handgrad import checkpoint

FAMILIES = ["rnn", "gru", "lstm"]
SMALL = ["--n-embd", "8", "--n-hidden", "16"]  # small enough for the suite's time; the shapes are the defaults' kind


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("model", FAMILIES)
def test_check_passes_on_the_seed_data_listing_the_first_and_last_steps(model, dtype, names_txt, capsys):
    rc, out, err = run_cli(["check", "--model", model, "--dtype", dtype, "-i", names_txt, "--fd-samples", "4"], capsys)
    assert rc == 0, out + err
    assert out.rstrip().splitlines()[-1].startswith("PASS")
    assert f"{model}1.step0.h " in out and f"{model}1.step15.h " in out  # the longest name: 15 characters and the end


@pytest.mark.parametrize("model", FAMILIES)
def test_train_eval_sample_and_resume_bit_for_bit(model, tmp_path, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = ["--model", model, *SMALL, "--steps", "60", "--warmup", "10", "--save-every", "0", *QUICK]
    rc, _, err = run_cli(["train", "-o", straight, *common], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["train", "-o", stopped, *common, "--stop-at", "25"], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["train", "-o", stopped, "--resume"], capsys)
    assert rc == 0, err
    assert_bit_identical(weights(straight), weights(stopped))
    assert metrics(straight) == metrics(stopped)
    run = json.loads((straight / "run.json").read_text())
    assert run["model_config"]["sequences"] and run["model_config"]["block_size"] == 12  # the built-in names' longest + 1
    rc, out, err = run_cli(["eval", "-o", straight], capsys)
    assert rc == 0, err
    val = float(out.splitlines()[1].split()[1])
    assert abs(val - run["final"]["val"]) <= 5e-5 and "predictions" in out
    rc, out, err = run_cli(["sample", "-o", straight, "-n", "5", "--seed", "3"], capsys)
    assert rc == 0 and len(out.splitlines()) == 5, err
    assert checkpoint.load_checkpoint(stopped).meta["config"]["model"] == model


@pytest.mark.parametrize("model", FAMILIES)
def test_manual_training_tracks_autograd_at_every_logged_step(model, tmp_path, capsys):
    """2,000 steps, float32: the hand-written backward through time against autograd's, to 1e-4 at every
    logged step (measured: within 2e-6)."""
    common = ["--model", model, *SMALL, "--batch-size", "16", "--steps", "2000", "--warmup", "100",
              "--log-every", "100", "--eval-every", "500", "-n", "0", "--no-check", "--save-every", "0"]
    for grad in ("manual", "autograd"):
        rc, _, err = run_cli(["train", "-o", tmp_path / grad, "--grad", grad, *common], capsys)
        assert rc == 0, err
    m, a = metrics(tmp_path / "manual"), metrics(tmp_path / "autograd")
    assert [r["step"] for r in m] == [r["step"] for r in a] and len(m) == 21
    for rm, ra in zip(m, a):
        assert abs(rm["train_loss"] - ra["train_loss"]) <= 1e-4, rm["step"]
        assert abs(rm.get("val_loss", 0) - ra.get("val_loss", 0)) <= 1e-4, rm["step"]
    assert m[-1]["val_loss"] < m[0]["val_loss"] - 0.5  # and it learned
