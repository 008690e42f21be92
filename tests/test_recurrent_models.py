"""The recurrent model families (rnn, gru, lstm) through the whole pipeline: check, train, eval, sample,
exact resume; and manual training tracking autograd's step for step."""
import json

import pytest
from cli_run import QUICK, assert_resumes_bit_for_bit, assert_tracks_autograd, run_cli

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
    common = ["--model", model, *SMALL, "--steps", "60", "--warmup", "10", "--save-every", "0", *QUICK]
    straight, stopped = assert_resumes_bit_for_bit(tmp_path, capsys, common, stop_at=25)
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
    logged step (measured: within 4.8e-7)."""
    common = ["--model", model, *SMALL, "--batch-size", "16", "--steps", "2000", "--warmup", "100",
              "--log-every", "100", "--eval-every", "500", "-n", "0", "--no-check", "--save-every", "0"]
    m = assert_tracks_autograd(tmp_path, capsys, common, tolerance=1e-4)
    assert len(m) == 21 and m[-1]["val_loss"] < m[0]["val_loss"] - 0.5  # and it learned
