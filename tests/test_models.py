"""The deeper models: their layers, their gradients tensor by tensor, their init, their training defaults,
the diagnostics, and train / sample / eval / check through the CLI for each model."""
import json
import math

import pytest
import torch

from handgrad import diagnostics
from handgrad.cli import main
from handgrad.errors import HandgradError
from handgrad.gradcheck import check_layer, check_model, finite_difference_check, passed
from handgrad.layers import FlattenConsecutive, Linear, Tanh
from handgrad.model import DEFAULTS, MODELS, TRAINING, ModelConfig, build_model
from handgrad.train import TrainConfig, manual_step, train

TINY = {
    "mlp": dict(block_size=3, n_embd=3, n_hidden=6, n_layers=1),
    "deep-mlp": dict(block_size=3, n_embd=3, n_hidden=6, n_layers=3),
    "wavenet": dict(block_size=4, n_embd=3, n_hidden=6, n_layers=2),
}


def tiny(model, vocab_size=7, **kw):
    return ModelConfig(model=model, vocab_size=vocab_size, **{**TINY[model], **kw})


def batch(vocab_size, block, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, block), generator=g), torch.randint(0, vocab_size, (n,), generator=g)


def test_every_model_has_defaults():
    assert set(MODELS) == set(DEFAULTS) == set(TRAINING) == {"mlp", "deep-mlp", "wavenet", "transformer", "rnn", "gru", "lstm"}


def test_layer_names_are_readable():
    deep = build_model(ModelConfig(model="deep-mlp", **DEFAULTS["deep-mlp"]))
    assert list(deep.net.layers) == ["embedding", "flatten"] + [
        f"{kind}{i}" for i in range(1, 6) for kind in ("linear", "batchnorm", "tanh")] + ["linear6"]
    wn = build_model(ModelConfig(model="wavenet", **DEFAULTS["wavenet"]))
    assert list(wn.net.layers) == ["embedding"] + [
        f"{kind}{i}" for i in range(1, 4) for kind in ("flatten", "linear", "batchnorm", "tanh")] + ["linear4"]
    assert all(isinstance(wn.net.layers[f"flatten{i}"], FlattenConsecutive) for i in range(1, 4))


def test_wavenet_size():
    # 27*24 embedding + 48*128 + 2*256*128 hidden weights + 3 BatchNorms of 2*128 + 128*27+27 output
    model = build_model(ModelConfig(model="wavenet", vocab_size=27, **DEFAULTS["wavenet"]))
    assert model.num_params() == 76_579
    assert DEFAULTS["deep-mlp"]["n_layers"] == 5 and DEFAULTS["deep-mlp"]["n_hidden"] == 100


def test_wavenet_fuses_the_context_down_to_one_step():
    model = build_model(ModelConfig(model="wavenet", **DEFAULTS["wavenet"]))
    x = torch.randint(0, 27, (5, 8))
    with torch.enable_grad():  # the layers' outputs are kept where autograd may record
        logits = model.forward(x)
    assert logits.shape == (5, 27)
    shapes = {n: tuple(t.shape) for n, t in model.net.outputs.items()}
    assert shapes["flatten1"] == (5, 4, 48) and shapes["tanh1"] == (5, 4, 128)
    assert shapes["flatten2"] == (5, 2, 256) and shapes["flatten3"] == (5, 256)


def test_wavenet_needs_block_size_a_power_of_two():
    with pytest.raises(HandgradError, match="block_size must be 2\\^n_layers"):
        build_model(ModelConfig(model="wavenet", block_size=6, n_layers=3))
    assert build_model(ModelConfig(model="wavenet", block_size=16, n_layers=4, n_hidden=8)).forward(
        torch.zeros(2, 16, dtype=torch.long)).shape == (2, 27)


@pytest.mark.parametrize("n_layers", [1, 2, 4])
def test_n_layers_sets_the_depth(n_layers):
    deep = build_model(tiny("deep-mlp", n_layers=n_layers))
    assert sum(isinstance(l, Tanh) for l in deep.net.layers.values()) == n_layers
    wn = build_model(tiny("wavenet", n_layers=n_layers, block_size=2**n_layers))
    assert sum(isinstance(l, FlattenConsecutive) for l in wn.net.layers.values()) == n_layers


@pytest.mark.parametrize("stepwise", [True, False])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", ["deep-mlp", "wavenet"])
def test_check_covers_every_intermediate_and_parameter(name, dtype, atol, stepwise):
    model = build_model(tiny(name, stepwise=stepwise), dtype=dtype)
    results = check_model(model, *batch(7, TINY[name]["block_size"]))
    assert passed(results) and all(r.max_abs_diff <= atol for r in results)
    names = {r.name for r in results}
    assert {n for n, _ in model.named_parameters()} <= names
    assert {f"{layer}.out" for layer in model.net.layers} <= names  # every layer's output
    if stepwise:
        assert {"batchnorm1.bnvar", "batchnorm2.bnraw", "loss.probs"} <= names


@pytest.mark.parametrize("name", ["deep-mlp", "wavenet"])
def test_default_sizes_pass_autograd_and_finite_differences(name):
    model = build_model(ModelConfig(model=name, stepwise=True, **DEFAULTS[name]), dtype=torch.float64)
    x, y = batch(27, DEFAULTS[name]["block_size"], n=32)
    assert passed(check_model(model, x, y))
    assert passed(finite_difference_check(model, x, y, samples_per_param=3))


@pytest.mark.parametrize("name", ["deep-mlp", "wavenet"])
def test_whole_network_against_finite_differences_on_every_coordinate(name):
    """The Sequential as one layer: ids in, logits out, every parameter coordinate perturbed."""
    torch.manual_seed(0)
    net = build_model(tiny(name, vocab_size=5, n_embd=2, n_hidden=3), dtype=torch.float64).net
    x, _ = batch(5, TINY[name]["block_size"], n=6)
    results = check_layer(net, x)
    bad = [(r.name, r.kind, r.max_abs_diff) for r in results if not r.close]
    assert not bad, bad
    assert {r.kind for r in results} == {"parameter", "finite-difference"}


def test_check_catches_a_wrong_flatten_consecutive(monkeypatch):
    """A backward that returns the gradient in the wrong order of time steps is caught."""

    def wrong_backward(self, dout):
        B, T, C = self.saved["shape"]
        return dout.reshape(B, T // self.n, self.n, C).flip(2).reshape(B, T, C)

    monkeypatch.setattr(FlattenConsecutive, "backward", wrong_backward)
    model = build_model(tiny("wavenet"), dtype=torch.float64)
    results = check_model(model, *batch(7, 4))
    assert not passed(results)
    assert not next(r for r in results if r.name == "embedding.weight").close


def test_init_keeps_deep_activations_healthy():
    """Kaiming for tanh (gain 5/3): every hidden Linear's output has std near 1, tanh is rarely saturated,
    and the first loss is near ln(vocab_size) (the output layer is scaled down)."""
    torch.manual_seed(0)
    for name in ("deep-mlp", "wavenet"):
        model = build_model(ModelConfig(model=name, **DEFAULTS[name]))
        x, y = batch(27, DEFAULTS[name]["block_size"], n=512)
        with torch.enable_grad():  # the layers' outputs are kept where autograd may record
            loss = model.forward(x, y)
        assert abs(float(loss) - math.log(27)) < 0.1
        for layer_name, layer in model.net.layers.items():
            out = model.net.outputs[layer_name]
            if isinstance(layer, Linear) and layer_name != list(model.net.layers)[-1] and layer_name != "linear1":
                assert 0.7 < float(out.std()) < 1.5, (name, layer_name, float(out.std()))
            if isinstance(layer, Tanh):
                assert float((out.abs() > 0.97).float().mean()) < 0.1
        for layer_name, layer in model.net.layers.items():
            if isinstance(layer, Linear) and "bias" not in layer.params:
                fan_in = layer.params["weight"].shape[0]
                assert float(layer.params["weight"].std()) == pytest.approx(5 / 3 / math.sqrt(fan_in), rel=0.1)


def test_diagnostics_measure_every_tanh_and_weight():
    model = build_model(tiny("deep-mlp"))
    manual_step(model, *batch(7, 3, n=32))
    d = diagnostics.measure(model)
    assert set(d["saturation"]) == {"tanh1", "tanh2", "tanh3"}
    assert all(0 <= v <= 1 for v in d["saturation"].values())
    assert set(d["grad_to_data"]) == {"embedding.weight", "linear1.weight", "linear2.weight", "linear3.weight",
                                      "linear4.weight"}
    assert all(v > 0 for v in d["grad_to_data"].values())
    # saturation really counts |h| > 0.97
    model.net.outputs["tanh1"] = torch.tensor([[0.99, -0.98, 0.5, 0.0]])
    assert diagnostics.tanh_saturation(model)["tanh1"] == 0.5


def test_training_defaults_resolve_per_model():
    mlp = TrainConfig(model="mlp").resolved()
    assert (mlp.optimizer, mlp.lr, mlp.schedule, mlp.steps, mlp.batch_size) == ("sgd", 1.0, "step", 10_000, 32)
    wn = TrainConfig(model="wavenet").resolved()
    assert wn.optimizer == "adamw" and wn.schedule == "cosine"
    over = TrainConfig(model="wavenet", lr=0.5, optimizer="momentum", steps=7).resolved()
    assert (over.lr, over.optimizer, over.steps, over.schedule) == (0.5, "momentum", 7, "cosine")


@pytest.mark.parametrize("name,optimizer", [("deep-mlp", "momentum"), ("wavenet", "adamw")])
def test_train_sample_eval_for_each_model(name, optimizer, tmp_path, capsys):
    out = tmp_path / name
    sizes = TINY[name]
    run = train(TrainConfig(out=str(out), model=name, steps=40, batch_size=16, eval_every=20, log_every=10,
                            optimizer=optimizer, lr=0.01, diagnostics=True, num_samples=3, **sizes))
    assert math.isfinite(run["final"]["val"])
    assert run["config"]["optimizer"] == optimizer and run["model_config"]["model"] == name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 39]
    assert all(set(r["saturation"]) == {f"tanh{i}" for i in range(1, sizes["n_layers"] + 1)} for r in evals)
    assert all("linear1.weight" in r["grad_to_data"] for r in evals)
    assert (out / "activations.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["sample", "-o", str(out), "-n", "4", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert main(["eval", "-o", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[0] for l in lines] == ["train", "val", "test"]
    assert float(lines[1].split()[1]) == pytest.approx(run["final"]["val"], abs=1e-4)


def test_train_without_diagnostics_draws_no_activations(tmp_path):
    train(TrainConfig(out=str(tmp_path), model="wavenet", steps=3, num_samples=0, **TINY["wavenet"]))
    assert not (tmp_path / "activations.png").exists()
    assert "saturation" not in (tmp_path / "metrics.jsonl").read_text()


@pytest.mark.parametrize("name", ["deep-mlp", "wavenet"])
def test_cli_check(name, capsys):
    argv = ["check", "--model", name, "--n-hidden", "8", "--n-embd", "4", "--dtype", "float64", "--fd-samples", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "batchnorm3.bnraw" in out and "tanh3.out" in out


def test_cli_train_flags(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "wavenet", "--n-embd", "3", "--n-hidden", "6", "--n-layers", "2", "--block-size", "4",
            "--steps", "20", "--batch-size", "8", "--optimizer", "momentum", "--schedule", "cosine", "--warmup", "5",
            "--weight-decay", "0.01", "--momentum", "0.5", "--lr", "0.05", "--no-check", "-n", "0", "-o", str(out)]
    assert main(argv) == 0
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert (cfg["optimizer"], cfg["schedule"], cfg["warmup"], cfg["weight_decay"], cfg["momentum"]) == \
        ("momentum", "cosine", 5, 0.01, 0.5)
    lrs = [json.loads(l)["lr"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(0.01)  # warm-up: step 0 of 5 runs at lr/5
    assert main(["train", "--model", "wavenet", "--block-size", "6", "-o", str(tmp_path / "bad")]) == 1
    assert "block_size must be 2^n_layers" in capsys.readouterr().err
