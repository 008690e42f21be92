"""The recurrent models with dropout (`--dropout`): the gradient check holds with the masks drawn (every
forward of a check sees the same draw), and catches a backward that forgets the mask; training records
the setting and resumes bit for bit (the mask draws come from the generator the checkpoint saves); eval
and sampling run without dropout."""
import json

import pytest
import torch
from cli_run import QUICK, assert_bit_identical, metrics, run_cli, weights

from handgrad.data import make_sequence_dataset
from handgrad.gradcheck import check_model, finite_difference_check, passed
from handgrad.layers import Dropout
from handgrad.model import ModelConfig, build_model

FAMILIES = ["rnn", "gru", "lstm"]
SMALL = ["--n-embd", "8", "--n-hidden", "16"]


def dropout_model(model: str, p: float = 0.3, n_layers: int = 2):
    data = make_sequence_dataset(None, seed=0)
    config = ModelConfig(model=model, vocab_size=len(data.vocab), block_size=data.block_size, n_embd=6,
                         n_hidden=7, n_layers=n_layers, sequences=True, dropout=p)
    return build_model(config, seed=1, dtype=torch.float64), data.X["train"][:9], data.Y["train"][:9]


@pytest.mark.parametrize("model", FAMILIES)
def test_the_check_passes_in_training_mode_with_masks_drawn(model):
    net, x, y = dropout_model(model)
    assert [n for n in net.net.layers if n.startswith("dropout")] == ["dropout0", "dropout1", "dropout2"]
    results = check_model(net, x, y)
    mask = net.net.layers["dropout1"].saved["mask"]  # the manual forward's draw: some entries dropped, some kept
    assert (mask == 0).any() and (mask > 0).any()
    results += finite_difference_check(net, x, y, samples_per_param=4)
    assert passed(results), [r for r in results if not r.close]


def test_the_check_fails_when_the_backward_forgets_the_mask(monkeypatch):
    net, x, y = dropout_model("gru")
    monkeypatch.setattr(Dropout, "backward", lambda self, dout: dout)
    assert not passed(check_model(net, x, y))


def test_no_dropout_layers_at_zero_and_the_same_weights():
    with_dropout, _, _ = dropout_model("lstm", p=0.5)
    without, _, _ = dropout_model("lstm", p=0.0)
    assert not any(n.startswith("dropout") for n in without.net.layers)
    assert_bit_identical(with_dropout.state_dict(), without.state_dict())  # dropout draws no weights


def test_eval_mode_draws_no_mask():
    net, x, _ = dropout_model("rnn", p=0.5)
    net.eval()
    before = torch.get_rng_state()
    assert torch.equal(net.forward(x), net.forward(x))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_handgrad_check_passes_with_dropout(dtype, capsys):
    rc, out, err = run_cli(["check", "--model", "gru", *SMALL, "--dropout", "0.3", "--dtype", dtype,
                            "--fd-samples", "4"], capsys)
    assert rc == 0, out + err
    assert "dropout0" in out and out.rstrip().splitlines()[-1].startswith("PASS")


def test_train_records_dropout_resumes_bit_for_bit_and_samples(tmp_path, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    checked = [a for a in QUICK if a != "--no-check"]  # the gradient check before training passes with masks drawn
    common = ["--model", "lstm", *SMALL, "--dropout", "0.25", "--steps", "40", "--warmup", "5", "--save-every", "0",
              *checked]
    rc, _, err = run_cli(["train", "-o", straight, *common], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["train", "-o", stopped, *common, "--stop-at", "17"], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["train", "-o", stopped, "--resume"], capsys)
    assert rc == 0, err
    assert_bit_identical(weights(straight), weights(stopped))
    assert metrics(straight) == metrics(stopped)
    run = json.loads((straight / "run.json").read_text())
    assert run["model_config"]["dropout"] == 0.25 and run["config"]["dropout"] == 0.25
    rc, out, err = run_cli(["eval", "-o", straight], capsys)
    assert rc == 0, err
    assert abs(float(out.splitlines()[1].split()[1]) - run["final"]["val"]) <= 5e-5  # eval mode: no masks
    rc, out, err = run_cli(["sample", "-o", straight, "-n", "5", "--seed", "3"], capsys)
    assert rc == 0 and len(out.splitlines()) == 5, err
