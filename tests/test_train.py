"""Training: the manual run tracks the autograd run step for step, and a run leaves a complete folder."""
import gc
import json

import torch

from handgrad.cli import main
from handgrad.train import TrainConfig, gc_frozen, train


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_manual_tracks_autograd_step_for_step(tmp_path):
    common = dict(steps=600, eval_every=200, log_every=50, num_samples=0)
    train(TrainConfig(out=str(tmp_path / "m"), grad="manual", **common))
    train(TrainConfig(out=str(tmp_path / "a"), grad="autograd", **common))
    m, a = read_metrics(tmp_path / "m" / "metrics.jsonl"), read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in m] == [r["step"] for r in a]
    assert len(m) >= 12
    # measured: at most 4.8e-7 apart in the batch loss, 2.1e-7 in the validation loss (float32 sums in
    # another order); a bound a few times that, where a wrong gradient drifts by 1e-3 within a hundred steps
    for rm, ra in zip(m, a):
        assert abs(rm["train_loss"] - ra["train_loss"]) <= 2e-6, rm["step"]
        assert ("val_loss" in rm) == ("val_loss" in ra)
        if "val_loss" in rm:
            assert abs(rm["val_loss"] - ra["val_loss"]) <= 1e-6, rm["step"]
    # and it learns: the seed's broken manual run stayed at 3.24
    assert m[-1]["val_loss"] < m[0]["val_loss"] - 0.5


def test_update_reads_the_buffers_the_backward_fills(tmp_path):
    """If the optimizer read anything but the backward's buffers, the weights would not move."""
    from handgrad.model import ModelConfig, build_model
    from handgrad.optim import SGD
    from handgrad.train import manual_step

    model = build_model(ModelConfig())
    opt = SGD(model.parameters(), model.grads(), lr=0.1)
    before = [p.clone() for p in model.parameters()]
    x, y = torch.randint(0, 27, (32, 3)), torch.randint(0, 27, (32,))
    manual_step(model, x, y)
    expected = [torch.add(p, g, alpha=-0.1) for p, g in zip(model.parameters(), model.grads())]
    opt.step()
    for b, p, e in zip(before, model.parameters(), expected):
        assert not torch.equal(b, p)
        assert torch.equal(p, e)


def test_train_cli_writes_a_complete_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "-o", str(out), "--steps", "300", "--eval-every", "100", "-n", "5"]) == 0
    text = capsys.readouterr().out
    assert "gradient check:" in text and "final loss" in text
    for f in ("metrics.jsonl", "run.json", "loss.png", "samples.txt", "model.safetensors", "model.json"):
        assert (out / f).is_file(), f
    run = json.loads((out / "run.json").read_text())
    assert set(run["final"]) == {"train", "val", "test"}
    assert run["data"]["sizes"]["train"] > 0 and run["config"]["steps"] == 300
    metrics = read_metrics(out / "metrics.jsonl")
    assert metrics[0]["step"] == 0 and metrics[-1]["step"] == 299
    assert all({"step", "lr", "train_loss", "elapsed"} <= set(r) for r in metrics)
    assert sum("val_loss" in r for r in metrics) == 4  # steps 0, 100, 200 and the last
    assert len((out / "samples.txt").read_text().splitlines()) == 5

    assert main(["sample", "-o", str(out), "-n", "7", "--seed", "1"]) == 0
    first = capsys.readouterr().out.splitlines()
    vocab = json.loads((out / "model.json").read_text())["vocab"]
    assert len(first) == 7 and all(s and set(s) <= set(vocab) for s in first)  # words of the data's characters
    assert len(set(first)) > 1
    assert main(["sample", "-o", str(out), "-n", "7", "--seed", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == first  # a seed makes sampling reproducible

    assert main(["eval", "-o", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["train", "val", "test"]
    assert abs(float(lines[1].split()[1]) - run["final"]["val"]) <= 5e-5  # printed to 4 decimals


def test_check_cli_json(tmp_path, capsys):
    assert main(["check", "--dtype", "float64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 23
    assert all({"name", "shape", "exact", "close", "max_abs_diff"} <= set(r) for r in rows)
    assert all(r["max_abs_diff"] <= 1e-10 for r in rows)


def test_check_cli_names_txt_float32_and_fused(names_txt, capsys):
    assert main(["check", "--data", str(names_txt), "--dtype", "float32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["max_abs_diff"] <= 1e-5 for r in rows) and len(rows) >= 23
    assert main(["check", "--data", str(names_txt), "--fused", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    params = [r for r in rows if r["kind"] == "parameter"]
    assert len(params) == 6 and all(r["close"] for r in params)


def test_check_cli_exits_nonzero_on_a_wrong_backward(monkeypatch, capsys):
    from handgrad.layers import Tanh

    monkeypatch.setattr(Tanh, "backward", lambda self, dout: dout)  # derivative dropped
    assert main(["check", "--dtype", "float64"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_stop_at_then_resume_is_bit_identical(tmp_path, capsys):
    from safetensors.torch import load_file

    common = ["--steps", "400", "--eval-every", "100", "--save-every", "0", "-n", "3"]
    assert main(["train", "-o", str(tmp_path / "straight"), *common]) == 0
    assert main(["train", "-o", str(tmp_path / "split"), *common, "--stop-at", "200"]) == 0
    assert "stopped as asked after step 200 of 400" in capsys.readouterr().out
    assert not (tmp_path / "split" / "run.json").exists()  # not finished
    assert main(["train", "-o", str(tmp_path / "split"), "--resume"]) == 0
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "straight" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "split" / "metrics.jsonl"))


def test_check_refuses_a_batch_of_one_with_batchnorm(capsys):
    """With one row BatchNorm's output is constant: a check there would pass without testing anything."""
    assert main(["check", "--batch-size", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "variance" in err and "--batch-size 2" in err


def test_gc_frozen_is_undone_on_the_way_out():
    assert gc.get_freeze_count() == 0
    with gc_frozen():
        assert gc.get_freeze_count() > 0  # what existed is left out of full collections
    assert gc.get_freeze_count() == 0
    try:
        with gc_frozen():
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own freeze is left as it was
    try:
        before = gc.get_freeze_count()
        with gc_frozen():
            pass
        assert gc.get_freeze_count() >= before > 0
    finally:
        gc.unfreeze()


def test_compiled_run_checks_its_own_layers_and_tracks_the_eager_run(tmp_path, capsys, monkeypatch):
    """At batch 128 (over 4x the vocabulary) the compiled step runs the fused table layer: the check
    before training covers it, --check-every checks the model between compiled steps without changing
    their course, and the run's losses follow the eager run's."""
    from handgrad import train as training

    common = dict(steps=8, batch_size=128, eval_every=4, log_every=1, num_samples=0, threads=1, n_hidden=24)
    train(TrainConfig(out=str(tmp_path / "e"), impl="eager", **common))
    capsys.readouterr()
    checked, check_model = [], training.check_model
    monkeypatch.setattr(training, "check_model", lambda *a, **kw: checked.append(1) or check_model(*a, **kw))
    train(TrainConfig(out=str(tmp_path / "c"), impl="compiled", check_every=3, **common))
    assert len(checked) == 2 + 3  # before training (the model, the fused view), then at steps 0, 3 and 6
    text = capsys.readouterr().out
    assert "gradient check of the compiled step's layers (embedding+linear1+batchnorm1+tanh1, linear2)" in text
    e, c = read_metrics(tmp_path / "e" / "metrics.jsonl"), read_metrics(tmp_path / "c" / "metrics.jsonl")
    assert [r["step"] for r in e] == [r["step"] for r in c] == list(range(8))
    for re_, rc in zip(e, c):
        assert abs(re_["train_loss"] - rc["train_loss"]) <= 1e-5, re_["step"]
        assert abs(re_.get("val_loss", 0) - rc.get("val_loss", 0)) <= 1e-5, re_["step"]
