"""--diagnostics: recurrent gates' saturation and attention's entropy, on planted values."""
import math

import pytest
import torch

from handgrad import diagnostics
from handgrad.layers import CausalSelfAttention, GRUCell, Recurrent, RNNCell, Sequential
from handgrad.model import Model, ModelConfig


def model_of(*layers):
    return Model(ModelConfig(model="planted", sequences=True), Sequential(list(layers)))


def test_gate_saturation_counts_the_values_near_a_bound():
    gru = Recurrent(GRUCell(2, 4))
    z = torch.tensor([[0.01, 0.5, 0.99, 0.2]])  # two of four within 0.03 of 0 or 1
    r = torch.full((1, 4), 0.5)
    n = torch.tensor([[-0.99, 0.0, 0.5, 0.98]])  # a tanh: two of four within 0.03 of -1 or 1
    gru.saved["steps"] = [{"r": r, "z": z, "n": n}, {"r": r, "z": torch.full((1, 4), 0.5), "n": n}]
    rnn = Recurrent(RNNCell(2, 4))
    rnn.saved["steps"] = [{"h": torch.tensor([[0.99, -0.99, 0.0, 0.1]])}]
    found = diagnostics.gate_saturation(model_of(("gru1", gru), ("rnn2", rnn)))
    assert found == {"gru1.r": 0.0, "gru1.z": 0.25, "gru1.n": 0.5, "rnn2.h": 0.5}


def test_attention_entropy_is_zero_for_one_key_and_the_log_of_the_keys_for_all_alike():
    sharp, even = CausalSelfAttention(4, 2, 3), CausalSelfAttention(4, 2, 3)
    sharp.saved["att"] = torch.eye(3).expand(2, 3, 3)  # each position attends to itself
    even.saved["att"] = torch.full((2, 3, 3), 1 / 3)  # to three alike
    found = diagnostics.attention_entropy(model_of(("a", sharp), ("b", even)))
    assert found["a"] == pytest.approx(0.0, abs=1e-6) and found["b"] == pytest.approx(math.log(3))


def test_a_trained_gru_logs_its_gates(tmp_path, capsys):
    import json

    from cli_run import run_cli

    out = tmp_path / "run"
    rc, _, err = run_cli(["train", "--model", "gru", "--n-embd", "8", "--n-hidden", "16", "--steps", "20",
                          "--warmup", "5", "--eval-every", "10", "--diagnostics", "-o", out, "-n", "0", "--no-check"],
                         capsys)
    assert rc == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "saturation" in line]
    assert rows and {"gru1.r", "gru1.z", "gru1.n"} <= set(rows[-1]["saturation"])
    assert all(0 <= v <= 1 for v in rows[-1]["saturation"].values())
    assert (out / "activations.png").is_file()
