"""checkpoint.py: atomic writes, generator states, and no file that can run code."""
import os
import pickle
import random
import shutil
import stat

import pytest
import torch
from cli_run import assert_one_line_error, run_cli, snapshot

from handgrad import checkpoint
from handgrad.errors import HandgradError
from handgrad.optim import make_optimizer


class Payload:
    """Unpickling this creates a folder: the side effect a test can look for."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def pickle_bytes(kind: str, marker, tmp_path) -> bytes:
    if kind == "protocol-0":
        return pickle.dumps(Payload(marker), protocol=0)
    if kind == "protocol-4":
        return pickle.dumps(Payload(marker), protocol=4)
    path = tmp_path / "payload.pt"  # torch.save: a zip archive holding a pickle
    torch.save({"weights": Payload(marker)}, path)
    data = path.read_bytes()
    path.unlink()
    return data


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """The test's own premise: this payload, unpickled, leaves its mark."""
    marker = tmp_path / "ran"
    pickle.loads(pickle_bytes("protocol-4", marker, tmp_path))
    assert marker.is_dir()


@pytest.mark.parametrize("kind", ["protocol-0", "protocol-4", "torch-save"])
@pytest.mark.parametrize("target, command", [
    (checkpoint.MODEL_WEIGHTS, ["sample", "-n", "2"]),
    (checkpoint.MODEL_WEIGHTS, ["eval"]),
    (checkpoint.CHECKPOINT, ["train", "--resume", "--steps", "40"]),
    (checkpoint.MODEL_META, ["sample", "-n", "2"]),
    (checkpoint.MODEL_META, ["train", "--resume", "--steps", "40"]),
])
def test_a_pickle_in_place_of_a_saved_file_is_never_run(saved_run, tmp_path, capsys, kind, target, command):
    run = shutil.copytree(saved_run, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    (run / target).write_bytes(pickle_bytes(kind, marker, tmp_path))
    before = snapshot(run)
    rc, _, err = run_cli([*command, "-o", run], capsys)
    assert not marker.exists(), "the pickle's code ran"
    if target == checkpoint.MODEL_META:
        assert rc == 0, err  # model.json is a readable copy of the header: nothing loads it
    else:
        assert_one_line_error(rc, err, target)
        assert "pickle" in err if kind != "protocol-0" else "not a valid safetensors file" in err
        assert snapshot(run) == before


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    checkpoint.atomic_write_bytes(path, b"old")

    def crash(*args):
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a save

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write_bytes(path, b"new" * 1000)
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left behind
    checkpoint.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"


def test_saved_files_get_the_usual_permissions(tmp_path):
    path = tmp_path / "f"
    checkpoint.atomic_write_bytes(path, b"x")
    plain = tmp_path / "g"
    plain.write_bytes(b"x")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    stale = tmp_path / ".checkpoint.safetensors.abc123.tmp"
    stale.write_bytes(b"half")
    other = tmp_path / ".notes.tmp"
    other.write_bytes(b"someone else's")
    checkpoint.remove_stale_temporaries(tmp_path)
    assert not stale.exists() and other.exists()


def test_generator_states_round_trip():
    device = torch.device("cpu")
    torch.manual_seed(3)
    random.seed(4)
    tensors, meta = checkpoint.rng_state(device)
    expected = (torch.rand(5), random.random())
    torch.manual_seed(99)
    random.seed(99)
    checkpoint.set_rng_state("test", tensors, meta, device)
    assert torch.equal(torch.rand(5), expected[0]) and random.random() == expected[1]


def test_checkpoint_is_one_file_with_everything(saved_run):
    tensors, metadata = checkpoint.read_safetensors(saved_run / checkpoint.CHECKPOINT)
    assert metadata["format"] == checkpoint.CHECKPOINT_FORMAT
    groups = {k.partition(".")[0] for k in tensors}
    assert groups == {"model", "optimizer", "rng"}
    ckpt = checkpoint.load_checkpoint(saved_run)
    assert ckpt.step == 20 and ckpt.meta["vocab"] and ckpt.meta["data"]["sha256"]
    model, vocab, meta = checkpoint.load_model(saved_run)
    for name, t in model.state_dict().items():
        assert torch.equal(t, ckpt.model_state[name])


def train_meta(ckpt: checkpoint.Checkpoint) -> dict:
    """What the training loop passes to save_checkpoint, taken from a saved checkpoint."""
    return {k: ckpt.meta[k] for k in ("config", "data", "elapsed")}


def diverge(tensor: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.view(-1)[0] = float("nan")


def test_save_model_refuses_non_finite_weights_and_writes_nothing(saved_run, tmp_path):
    run = shutil.copytree(saved_run, tmp_path / "run")
    model, vocab, _ = checkpoint.load_model(run)
    diverge(dict(model.named_parameters())["linear1.weight"])
    before = snapshot(run)
    with pytest.raises(HandgradError, match=r"refusing to save .*model\.safetensors: linear1\.weight holds non-finite"):
        checkpoint.save_model(run, model, vocab)
    assert snapshot(run) == before  # byte for byte, and no temporary left behind


@pytest.mark.parametrize("where", ["weights", "running statistics", "optimizer state"])
def test_save_checkpoint_refuses_a_non_finite_state_and_writes_neither_file(saved_run, tmp_path, where):
    run = shutil.copytree(saved_run, tmp_path / "run")
    ckpt = checkpoint.load_checkpoint(run)
    model, vocab, _ = checkpoint.load_model(run)
    optimizer = make_optimizer("momentum", model, lr=0.1)
    if where == "weights":
        diverge(dict(model.named_parameters())["embedding.weight"])
    elif where == "running statistics":
        diverge(model.state_dict()["batchnorm1.running_var"])
    else:
        state = optimizer.state_dict()
        state["2.momentum_buffer"][0] = float("inf")
        optimizer.load_state_dict(state)
    before = snapshot(run)
    with pytest.raises(HandgradError, match=r"refusing to save .*checkpoint\.safetensors: .* holds non-finite values"):
        checkpoint.save_checkpoint(run, step=ckpt.step + 1, model=model, optimizer=optimizer, vocab=vocab,
                                   meta=train_meta(ckpt), device=torch.device("cpu"))
    assert snapshot(run) == before


def test_the_longest_item_reaches_the_models_header(saved_run, tmp_path):
    """train passes max_item_len with the checkpoint's metadata; the model's header carries it to `sample`."""
    run = shutil.copytree(saved_run, tmp_path / "run")
    ckpt = checkpoint.load_checkpoint(run)
    model, vocab, _ = checkpoint.load_model(run)
    optimizer = make_optimizer("sgd", model, lr=0.1)
    checkpoint.save_checkpoint(run, step=ckpt.step, model=model, optimizer=optimizer, vocab=vocab,
                               meta={**train_meta(ckpt), "max_item_len": 15}, device=torch.device("cpu"))
    assert checkpoint.load_model(run)[2]["max_item_len"] == 15


def test_a_safetensors_header_whose_length_opens_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A header of 128 + 256k bytes makes the file's first byte 0x80, as a pickle's is."""
    from safetensors.torch import save as st_save

    for pad in range(0, 300):
        data = st_save({"w": torch.zeros(2)}, {"pad": "x" * pad})
        if data[:1] == b"\x80":
            break
    assert data[:1] == b"\x80"
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    tensors, metadata = checkpoint.read_safetensors(path)
    assert torch.equal(tensors["w"], torch.zeros(2))
    path.write_bytes(pickle.dumps({"w": 1}, protocol=4))
    with pytest.raises(HandgradError, match="is a pickle"):
        checkpoint.read_safetensors(path)
