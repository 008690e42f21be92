"""Training settings that would do nothing are refused or warned about, never ignored; run.json
records the values a run used; a refused run prints nothing before its error."""
import json

import pytest
from cli_run import QUICK, assert_one_line_error, run_cli

from handgrad.train import TrainConfig

IDLE = [
    ("n-layers-on-mlp", ["--n-layers", "3"], "the mlp has one hidden layer"),
    ("warmup-with-step-schedule", ["--warmup", "5"], "the step schedule has no warm-up"),
    ("stop-at-beyond-steps", ["--stop-at", "5000", "--steps", "100"], "--stop-at 5,000 is beyond the run's 100 steps"),
    ("warmup-longer-than-the-run", ["--model", "deep-mlp", "--steps", "200", "--warmup", "300"],
     "--warmup 300 is not shorter than the run's 200 steps"),
    ("momentum-without-momentum", ["--momentum", "0.5"], "--momentum belongs to --optimizer momentum"),
]


@pytest.mark.parametrize("argv,needle", [c[1:] for c in IDLE], ids=[c[0] for c in IDLE])
def test_a_setting_that_would_do_nothing_is_refused(argv, needle, tmp_path, capsys):
    rc, out, err = run_cli(["train", "-o", tmp_path / "r", *argv, *QUICK], capsys)
    assert_one_line_error(rc, err, needle)
    assert out == "" and not (tmp_path / "r").exists()


def test_a_learning_rate_of_zero_is_refused(tmp_path, capsys):
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--lr", "0", *QUICK], capsys)
    assert_one_line_error(rc, err, "--lr", "must be positive")
    with pytest.raises(Exception, match="learning rate must be a positive number"):
        TrainConfig(lr=0.0).resolved()


def test_a_default_warmup_longer_than_the_run_is_said_in_one_line(tmp_path, capsys):
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--model", "deep-mlp", "--steps", "20", "--batch-size", "8",
                          *QUICK], capsys)
    assert rc == 0, err
    lines = [line for line in err.splitlines() if "warm-up" in line]
    assert lines == ["warning: the default warm-up of 500 steps is not shorter than the run's 20, so the learning rate "
                     "never reaches its peak; pass --warmup N below 20"]


def test_the_right_settings_are_accepted(tmp_path, capsys):
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--optimizer", "momentum", "--momentum", "0.5",
                          "--schedule", "cosine", "--warmup", "5", "--steps", "20", "--stop-at", "20", *QUICK], capsys)
    assert rc == 0, err


def test_run_json_records_the_values_used(tmp_path, capsys):
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--steps", "10", *QUICK], capsys)
    assert rc == 0, err
    config = json.loads((tmp_path / "r" / "run.json").read_text())["config"]
    assert (config["block_size"], config["n_embd"], config["n_hidden"], config["n_layers"]) == (3, 10, 200, 1)
    assert config["threads"] == 1 and config["warmup"] == 0 and config["lr"] == 1.0
    unused = {k for k, v in config.items() if v is None}
    # built-in data; sgd; no attention, dropout or output layer to tie
    assert unused <= {"data", "momentum", "n_heads", "dropout", "attn_dropout", "tie_weights"}, unused


def test_a_refused_run_into_a_used_folder_prints_nothing_first(saved_run, capsys):
    rc, out, err = run_cli(["train", "-o", saved_run, "--steps", "10", *QUICK], capsys)
    assert_one_line_error(rc, err, "already holds a run")
    assert out == ""


def test_resuming_an_earlier_sgd_run_that_recorded_a_momentum(saved_run, tmp_path, capsys):
    """Earlier versions saved momentum 0.9 for every optimizer: such a run still resumes."""
    import shutil

    from handgrad import checkpoint

    out = shutil.copytree(saved_run, tmp_path / "run")
    tensors, metadata = checkpoint.read_safetensors(out / checkpoint.CHECKPOINT)
    meta = json.loads(metadata[checkpoint.HEADER_KEY])
    meta["config"]["momentum"] = 0.9
    from safetensors.torch import save as st_save

    (out / checkpoint.CHECKPOINT).write_bytes(st_save(tensors, {**metadata, checkpoint.HEADER_KEY: json.dumps(meta)}))
    rc, _, err = run_cli(["train", "-o", out, "--resume", "--steps", "30", *QUICK], capsys)
    assert rc == 0, err
