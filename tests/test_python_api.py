"""The Python API as docs/python.md shows it: the page's code runs here, block by block, so the page
cannot go stale; and `fit`, which `handgrad train` calls, writes the run folder the command writes."""
import json
import re
from pathlib import Path

import pytest
import torch
from cli_run import QUICK, run_cli

import handgrad as hg
from handgrad import checkpoint
from handgrad.errors import HandgradError

PAGE = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def page_code() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def test_the_page_has_code_to_run():
    blocks = page_code()
    assert len(blocks) >= 5
    assert any("hg.fit(" in b for b in blocks) and any("hg.check_layer(" in b for b in blocks)


def test_the_python_page_runs_and_trains_a_model_with_its_own_layer(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "python_page"}
    for block in page_code():
        exec(compile(block, str(PAGE), "exec"), scope)
    run_dir = tmp_path / "runs" / "prelu"
    # the same folder `handgrad train` writes
    rc, _, err = run_cli(["train", "-o", tmp_path / "cli", "--steps", "20", "-n", "2"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in (tmp_path / "cli").iterdir())
    run = json.loads((run_dir / "run.json").read_text())
    cli_run = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert run.keys() == cli_run.keys() and run["config"].keys() == cli_run["config"].keys()
    assert run["model_config"]["model"] == "prelu-mlp" and run["config"]["steps"] == 3000
    # the layer of its own trained: its slopes moved from where they started, and the model learned
    slopes = scope["again"].net.layers["prelu1"].params["weight"]
    assert not torch.allclose(slopes, torch.full_like(slopes, 0.25))
    assert run["final"]["val"] < 2.6
    assert checkpoint.load_checkpoint(run_dir).step == 3000


def test_fit_refuses_what_it_cannot_train(tmp_path):
    data = hg.make_dataset(block_size=3)
    model = hg.build_model(hg.ModelConfig(block_size=4, vocab_size=len(data.vocab)))
    with pytest.raises(HandgradError, match="contexts of 4 .* the data has 3"):
        hg.fit(model, data, out=str(tmp_path / "r"), steps=5)
    with pytest.raises(HandgradError, match="Model"):
        hg.fit(model.net, data, out=str(tmp_path / "r"), steps=5)
    assert not (tmp_path / "r").exists()


def test_handgrad_train_and_fit_write_the_same_run(tmp_path, capsys):
    """`handgrad train` builds the model and data, then hands over to `fit`: the same run, bit for bit."""
    rc, _, err = run_cli(["train", "-o", tmp_path / "cli", "--steps", "30", "--save-every", "0", *QUICK], capsys)
    assert rc == 0, err
    data = hg.make_dataset()
    cfg = hg.TrainConfig(steps=30).resolved()
    model = hg.build_model(cfg.model_config(len(data.vocab)), seed=cfg.seed)
    hg.fit(model, data, out=str(tmp_path / "py"), steps=30, save_every=0, num_samples=0, check=False, eval_every=0,
           log_every=20)
    a = checkpoint.read_safetensors(tmp_path / "cli" / checkpoint.MODEL_WEIGHTS)[0]
    b = checkpoint.read_safetensors(tmp_path / "py" / checkpoint.MODEL_WEIGHTS)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_public_names_import_from_handgrad_itself():
    for name in hg.__all__:
        assert getattr(hg, name) is not None
    from handgrad import Linear, Module, Sequential, check_layer, fit  # noqa: F401
    assert issubclass(hg.Linear, hg.Module)
    with pytest.raises(AttributeError):
        hg.not_a_name  # noqa: B018
