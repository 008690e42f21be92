"""Saving and loading: safetensors for tensors, JSON for the rest, never pickle.

A run folder holds two self-contained files, each written atomically:

- model.safetensors: weights and BatchNorm running statistics, with the model
  config, vocabulary and data description as JSON in the safetensors header.
  `sample` and `eval` read only this file (model.json is a readable copy).
- checkpoint.safetensors: the whole training state in one file, so it can
  never be half old and half new: the model's tensors ('model.'), the
  optimizer's ('optimizer.'), torch's generator states ('rng.'), and in the
  header the training config, step, elapsed time, Python's `random` state.

Loading parses safetensors (a JSON header and raw numbers), so a file cannot
run code; a pickle found where one of these is expected is refused by name.
Neither file is ever written, nor loaded, with a NaN or an infinity in it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import tempfile
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .data import Vocab
from .errors import HandgradError
from .model import Model, ModelConfig, build_model
from .optim import evaluated

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
RUN_FILES = (CHECKPOINT, MODEL_WEIGHTS, MODEL_META, METRICS, "run.json")
MODEL_FORMAT = "handgrad-model"
CHECKPOINT_FORMAT = "handgrad-checkpoint"
HEADER_KEY = "handgrad"  # the safetensors metadata entry holding our JSON


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~current_umask()  # what open() would give; mkstemp's 0600 would keep shared models private


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temporary file in the same folder, fsync, rename: readers see the old file or the new one, whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
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


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files that a killed write left behind (only ours: '.<run file>.*.tmp')."""
    for name in RUN_FILES:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def atomic_write_figure(path: Path, fig) -> None:
    """A matplotlib figure as a PNG, through the same atomic write as every other file of a run."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity; None when all are finite."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def refuse_non_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The last guard before a save: a diverged state is never written, and the file already there stays."""
    bad = non_finite(tensors)
    if bad is not None:
        raise HandgradError(f"refusing to save {path}: {bad} holds non-finite values (the run diverged); "
                            "the files already saved are left as they were")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # clone: safetensors refuses tensors that share memory, and views of one buffer may do
    atomic_write_bytes(path, st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata))


def read_bytes(path: Path, what: str) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise HandgradError(f"missing {what}: {path}") from None
    except IsADirectoryError:
        raise HandgradError(f"{what} {path} is a folder, not a file") from None
    except OSError as e:
        raise HandgradError(f"cannot read {what} {path}: {e.strerror}") from None


def looks_like_pickle(data: bytes) -> bool:
    """Pickle protocol 2+ opens with 0x80 and the protocol number; torch.save writes a zip archive holding a
    pickle. A safetensors file opens with its header's length (8 bytes, little-endian: a length of 128 more
    than a multiple of 256 opens with 0x80 too), then the header's JSON object, '{'."""
    if data[:4] == b"PK\x03\x04":
        return True
    return data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and data[8:9] != b"{"


def read_safetensors(path: Path, what: str = "safetensors file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of one file, read once (a concurrent save cannot mix two versions)."""
    path = Path(path)
    data = read_bytes(path, what)
    if looks_like_pickle(data):
        raise HandgradError(f"{path} is a pickle (torch.save) file, not safetensors; handgrad never loads pickles, "
                            "since loading one can run arbitrary code")
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError, AttributeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HandgradError(f"{path} is not a valid safetensors file (truncated or corrupt?): {reason}") from None
    return tensors, metadata


def header_json(path: Path, metadata: dict[str, str], fmt: str) -> dict:
    if metadata.get("format") != fmt or HEADER_KEY not in metadata:
        raise HandgradError(f"{path} is not a {fmt} file (its header lacks handgrad's metadata)")
    try:
        obj = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as e:
        raise HandgradError(f"{path}: the header's metadata is not valid JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise HandgradError(f"{path}: the header's metadata is not a JSON object")
    return obj


def model_from_meta(path: Path, meta: dict, state: dict[str, torch.Tensor], device=None, dtype=None) -> tuple[Model, Vocab]:
    """Build the model that `meta` describes and load `state`; every disagreement is a HandgradError naming `path`."""
    try:
        config = ModelConfig.from_dict(meta["config"])
        if not isinstance(meta["vocab"], list) or not all(isinstance(c, str) for c in meta["vocab"]):
            raise ValueError("vocab must be a list of characters")
        vocab = Vocab(meta["vocab"])
        for f in fields(ModelConfig):
            value = getattr(config, f.name)
            if f.type in ("int", int) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{f.name} must be a positive whole number, got {value!r}")
    except (KeyError, TypeError, ValueError, HandgradError) as e:
        raise HandgradError(f"{path}: the model config is malformed: {e}") from None
    if config.vocab_size != len(vocab):
        raise HandgradError(f"{path}: vocab_size {config.vocab_size} disagrees with the {len(vocab)}-token vocabulary")
    if not state:
        raise HandgradError(f"{path} holds no weights")
    try:
        model = build_model(config, device=device, dtype=dtype or next(iter(state.values())).dtype)
    except (RuntimeError, ValueError, TypeError) as e:
        raise HandgradError(f"{path}: cannot build the model its config describes: {e}") from None
    except HandgradError as e:
        raise HandgradError(f"{path}: {e}") from None
    try:
        model.load_state_dict(state)
    except HandgradError as e:
        raise HandgradError(f"{path}: {e}") from None
    return model, vocab


def save_model(out_dir: Path, model: Model, vocab: Vocab, extra: dict | None = None) -> None:
    """model.safetensors (weights and BatchNorm running statistics, config and vocabulary in its header)
    and model.json, a readable copy of the header. `extra` joins the header: the step, the data's
    description, and max_item_len (the data's longest item, in characters: `sample`'s default --max-len).
    Non-finite weights are refused, and nothing is written."""
    out_dir = Path(out_dir)
    meta = {"config": model.config.to_dict(), "vocab": vocab.chars, **(extra or {})}
    state = model.state_dict()
    refuse_non_finite(out_dir / MODEL_WEIGHTS, state)
    save_tensors(out_dir / MODEL_WEIGHTS, state,
                 {"format": MODEL_FORMAT, HEADER_KEY: json.dumps(meta, ensure_ascii=False)})
    atomic_write_json(out_dir / MODEL_META, meta)


def check_run_folder(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise HandgradError(f"{out_dir} is a file, not a run folder")
    if not out_dir.is_dir():
        raise HandgradError(f"no such run folder: {out_dir}")
    return out_dir


def read_run_file(out_dir: Path, name: str, kind: str, fmt: str, missing: str) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """A safetensors file of a run folder and its JSON header; `missing` is the error when it is absent."""
    out_dir = check_run_folder(out_dir)
    path = out_dir / name
    if not path.exists():
        raise HandgradError(missing)
    tensors, metadata = read_safetensors(path, kind)
    return path, tensors, header_json(path, metadata, fmt)


def load_model(out_dir: Path, device=None, dtype=None) -> tuple[Model, Vocab, dict]:
    """The model saved in a run folder, its vocabulary, and its header's metadata."""
    path, state, meta = read_run_file(
        out_dir, MODEL_WEIGHTS, "model file", MODEL_FORMAT,
        f"no saved model in {out_dir} (expected {MODEL_WEIGHTS}); train one with: handgrad train -o {out_dir}")
    bad = non_finite(state)
    if bad is not None:
        raise HandgradError(f"{path} holds non-finite values in {bad} (a diverged run?); "
                            "train it again, with a lower --lr")
    model, vocab = model_from_meta(path, meta, state, device=device, dtype=dtype)
    return model, vocab, meta


def data_fingerprint(words: list[str]) -> str:
    """sha256 of the prepared (deduplicated, shuffled) items: a resumed run must see the very same data."""
    return hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()


def rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Every generator the run can draw from: Python's `random`, torch's CPU one, and the GPU's."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    version, state, gauss_next = random.getstate()
    return tensors, {"python_random": [version, list(state), gauss_next]}


def set_rng_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict, device: torch.device) -> None:
    try:
        version, state, gauss_next = meta["python_random"]
        random.setstate((version, tuple(state), gauss_next))
        torch.set_rng_state(tensors["rng.torch_cpu"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise HandgradError(f"{path}: the random-number-generator state is malformed: {e}") from None


@dataclass
class Checkpoint:
    """A training state read back: where, which step, and what to restore."""

    path: Path
    step: int
    meta: dict  # config, model_config, vocab, data, elapsed, python_random
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    average_state: dict[str, torch.Tensor]  # the weights' moving average (optim.WeightAverage); empty: none kept

    def restore(self, model: Model, optimizer, average=None) -> None:
        """Weights, running statistics, optimizer state and the weights' moving average where the run keeps
        one; the generators come last (`restore_rng`), after anything else that seeds them."""
        try:
            model.load_state_dict(self.model_state)
            optimizer.load_state_dict(self.optimizer_state)
            if average is not None:
                average.load_state_dict(self.average_state)
        except HandgradError as e:
            raise HandgradError(f"{self.path}: {e}") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise HandgradError(f"{self.path}: the optimizer state does not fit this optimizer: {e}") from None

    def restore_rng(self, device: torch.device) -> None:
        set_rng_state(self.path, self.rng, self.meta, device)


def save_checkpoint(out_dir: Path, *, step: int, model: Model, optimizer, vocab: Vocab, meta: dict,
                    device: torch.device, average=None) -> None:
    """checkpoint.safetensors (the training state after `step` steps), then model.safetensors: the model
    evaluation reads, which is the weights' moving average where the run keeps one (`average`).

    Each file is whole on its own; a kill between the two leaves the model one
    save behind the checkpoint, and both load.
    """
    out_dir = Path(out_dir)
    rng_tensors, rng_meta = rng_state(device)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"optimizer.{k}": v for k, v in optimizer.state_dict().items()}
    if average is not None:
        tensors |= {f"average.{k}": v for k, v in average.state_dict().items()}
    refuse_non_finite(out_dir / CHECKPOINT, tensors)  # before either file is written
    tensors |= rng_tensors
    header = {"step": step, "model_config": model.config.to_dict(), "vocab": vocab.chars, **meta, **rng_meta}
    save_tensors(out_dir / CHECKPOINT, tensors,
                 {"format": CHECKPOINT_FORMAT, HEADER_KEY: json.dumps(header, ensure_ascii=False)})
    extra = {"step": step, "data": meta.get("data")}
    if "max_item_len" in meta:  # the longest item of the data: `sample`'s default --max-len
        extra["max_item_len"] = meta["max_item_len"]
    with evaluated(average):
        save_model(out_dir, model, vocab, extra)


def load_checkpoint(out_dir: Path) -> Checkpoint:
    path, tensors, meta = read_run_file(
        out_dir, CHECKPOINT, "checkpoint", CHECKPOINT_FORMAT,
        f"nothing to resume in {out_dir}: no {CHECKPOINT} (start a run with: handgrad train -o {out_dir})")
    step = meta.get("step")
    elapsed = meta.get("elapsed")
    if (not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(meta.get("config"), dict)
            or not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool)):
        raise HandgradError(f"{path}: the header lacks a valid step, training config or elapsed time")
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optimizer": {}, "rng": {}, "average": {}}
    for key, t in tensors.items():
        part, _, name = key.partition(".")
        if part not in parts or not name:
            raise HandgradError(f"{path}: unexpected tensor {key!r}")
        parts[part][name if part != "rng" else key] = t
    bad = non_finite(tensors)
    if bad is not None:
        raise HandgradError(f"{path} holds non-finite values in {bad} (a diverged run?); it cannot be continued: "
                            f"train again, with a lower --lr")
    return Checkpoint(path, step, meta, parts["model"], parts["optimizer"], parts["rng"], parts["average"])


class StopAtStepBoundary:
    """Ctrl-C (SIGINT, and in a run of several processes the launcher's SIGTERM, which it sends on
    Ctrl-C) during training sets `requested`; the loop reads it between steps, so
    the checkpoint it then saves holds whole steps. A second Ctrl-C stops at once (the last
    checkpoint on disk stays whole: every write is atomic)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT,)):
        self.requested = False
        self.signals = signals
        self.previous: dict[int, object] = {}

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopAtStepBoundary":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def refuse_existing_run(out_dir: Path) -> None:
    """A fresh run never overwrites a saved model or checkpoint (the logs of a run that saved neither may go)."""
    found = [name for name in (CHECKPOINT, MODEL_WEIGHTS) if (Path(out_dir) / name).exists()]
    if found:
        raise HandgradError(f"{out_dir} already holds a run ({', '.join(found)}); continue it with "
                            f"handgrad train -o {out_dir} --resume, or choose another -o folder")


def check_resumable(ckpt: Checkpoint, model_config: dict, data: dict) -> None:
    """The rebuilt model and the data must be the checkpoint's, or the resumed run would not continue it."""
    saved = ckpt.meta.get("data") or {}
    if saved.get("sha256") != data["sha256"]:
        raise HandgradError(f"the data differs from the data the checkpoint was trained on ({saved.get('source')}, "
                            f"{saved.get('items')} items); resuming needs the same file, unchanged")
    saved_model = ckpt.meta.get("model_config")
    try:  # a key the saving version did not have yet takes its default: the model it had
        saved_model = ModelConfig.from_dict(saved_model).to_dict()
    except (HandgradError, TypeError, AttributeError):
        pass  # malformed: reported below as it is
    if saved_model != model_config:
        raise HandgradError(f"{ckpt.path}: its model config {ckpt.meta.get('model_config')} disagrees with its "
                            f"training config, which builds {model_config}")


def continue_metrics(path: Path, step: int) -> list[dict]:
    """Keep the records of steps before `step` (a killed run may have logged past its last
    checkpoint, or left half a line), rewrite the file atomically, and return them."""
    path = Path(path)
    kept, lines = [], []
    if step > 0 and path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written last line of a killed run
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] < step:
                kept.append(rec)
                lines.append(line + "\n")
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))
    return kept
