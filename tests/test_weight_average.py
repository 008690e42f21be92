"""Training with the weights' moving average (`--ema`) and the cosine's floor (`--lr-floor`): what is
evaluated, sampled and saved is the average; the checkpoint keeps both, and a resumed run continues
both bit for bit; the settings are refused where they would do nothing or the wrong thing."""
import json

import torch
from cli_run import QUICK, assert_one_line_error, assert_resumes_bit_for_bit, run_cli, weights

from handgrad import checkpoint

SMALL = ["--model", "transformer", "--n-embd", "16", "--n-hidden", "32", "--n-layers", "1", "--n-heads", "2"]


def test_the_average_is_what_the_run_evaluates_and_saves(tmp_path, capsys):
    common = [*SMALL, "--ema", "0.9", "--lr-floor", "0.5", "--steps", "30", "--warmup", "5", "--save-every", "0",
              "--eval-every", "10", "-n", "0", "--no-check"]
    straight, _ = assert_resumes_bit_for_bit(tmp_path, capsys, common, stop_at=12)
    run = json.loads((straight / "run.json").read_text())
    assert run["config"]["ema"] == 0.9 and run["config"]["lr_floor"] == 0.5
    tensors, _ = checkpoint.read_safetensors(straight / checkpoint.CHECKPOINT)
    assert int(tensors["average.updates"]) == 30
    saved = weights(straight)  # the model that eval and sample read: the average
    trained = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    assert saved.keys() == trained.keys()
    assert any(not torch.equal(saved[k], trained[k]) for k in saved)
    model, _, _ = checkpoint.load_model(straight)
    assert torch.equal(model.param_buffer, tensors["average.0"])
    rc, out, err = run_cli(["eval", "-o", straight], capsys)
    assert rc == 0, err
    assert abs(float(out.splitlines()[1].split()[1]) - run["final"]["val"]) <= 5e-5  # printed to 4 places
    metrics = [json.loads(line) for line in (straight / checkpoint.METRICS).read_text().splitlines()]
    assert metrics[-1]["lr"] > 0.5 * 3e-3 - 1e-9  # the cosine ended at its floor, not at lr/100


def test_the_transformer_averages_by_default_and_others_do_not(tmp_path, capsys):
    from handgrad.train import TrainConfig

    assert TrainConfig(model="transformer").resolved().ema > 0
    assert TrainConfig(model="gru").resolved().ema == 0 and TrainConfig(model="mlp").resolved().lr_floor == 0.01
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--model", "wavenet", "--ema", "0.99", *QUICK], capsys)
    assert_one_line_error(rc, err, "--ema 0.99: the wavenet's BatchNorm statistics")
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--ema", "1.5", "--model", "gru", *QUICK], capsys)
    assert_one_line_error(rc, err, "--ema 1.5", "(0, 1)")
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--lr-floor", "0.1", *QUICK], capsys)
    assert_one_line_error(rc, err, "--lr-floor 0.1: the step schedule has no floor")
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--model", "gru", "--lr-floor", "1", *QUICK], capsys)
    assert_one_line_error(rc, err, "--lr-floor 1", "[0, 1)")


def test_a_run_saved_before_the_average_resumes_without_it(tmp_path, capsys):
    """A checkpoint whose config has neither `ema` nor `lr_floor` (saved by the version before them) evaluated
    its trained weights on a cosine down to lr/100: it resumes so, whatever the defaults say now."""
    from safetensors.torch import save as st_save

    out = tmp_path / "old"
    rc, _, err = run_cli(["train", "-o", out, *SMALL, "--ema", "0", "--steps", "20", "--warmup", "5", "--stop-at", "10",
                          *QUICK], capsys)
    assert rc == 0, err
    path = out / checkpoint.CHECKPOINT
    tensors, metadata = checkpoint.read_safetensors(path)
    meta = json.loads(metadata[checkpoint.HEADER_KEY])
    del meta["config"]["ema"], meta["config"]["lr_floor"]
    path.write_bytes(st_save(tensors, {**metadata, checkpoint.HEADER_KEY: json.dumps(meta)}))
    rc, _, err = run_cli(["train", "-o", out, "--resume"], capsys)
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["ema"] == 0.0 and run["config"]["lr_floor"] == 0.01
