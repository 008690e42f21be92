"""Saving and loading models: safetensors for tensors, JSON for the rest.
Never pickle, so loading a file cannot run code. Every write is atomic.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .data import Vocab
from .errors import HandgradError
from .model import Model, ModelConfig, build_model

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temporary file in the same folder, fsync, rename: readers see the old file or the new one, whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise HandgradError(f"missing file: {path}") from None
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise HandgradError(f"{path} is not a valid safetensors file (truncated or corrupt?): {str(e).splitlines()[0]}") from None


def load_json(path: Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HandgradError(f"missing file: {path}") from None
    except UnicodeDecodeError:
        raise HandgradError(f"{path} is not valid JSON (not UTF-8)") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise HandgradError(f"{path} is not valid JSON (truncated or corrupt?): {e.msg} at line {e.lineno}") from None
    if not isinstance(obj, dict):
        raise HandgradError(f"{path} does not hold a JSON object")
    return obj


def save_model(out_dir: Path, model: Model, vocab: Vocab, extra: dict | None = None) -> None:
    """model.safetensors (weights and BatchNorm running statistics) and model.json (config, vocabulary)."""
    out_dir = Path(out_dir)
    meta = {"config": model.config.to_dict(), "vocab": vocab.chars, **(extra or {})}
    save_tensors(out_dir / MODEL_WEIGHTS, model.state_dict(), {"format": "handgrad-model"})
    atomic_write_json(out_dir / MODEL_META, meta)


def load_model(out_dir: Path, device=None, dtype=None) -> tuple[Model, Vocab, dict]:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise HandgradError(f"no such run folder: {out_dir}")
    if not (out_dir / MODEL_META).exists() or not (out_dir / MODEL_WEIGHTS).exists():
        raise HandgradError(f"no saved model in {out_dir} (expected {MODEL_META} and {MODEL_WEIGHTS}); train one with: handgrad train -o {out_dir}")
    meta = load_json(out_dir / MODEL_META)
    try:
        config = ModelConfig.from_dict(meta["config"])
        vocab = Vocab(list(meta["vocab"]))
    except (KeyError, TypeError, ValueError) as e:
        raise HandgradError(f"{out_dir / MODEL_META} is malformed: {e}") from None
    if config.vocab_size != len(vocab):
        raise HandgradError(f"{out_dir / MODEL_META}: vocab_size {config.vocab_size} disagrees with the {len(vocab)}-token vocabulary")
    state = load_tensors(out_dir / MODEL_WEIGHTS)
    model = build_model(config, device=device, dtype=dtype or next(iter(state.values())).dtype)
    model.load_state_dict(state)
    return model, vocab, meta
