"""Helpers for tests that drive the `handgrad` command: run it in-process, snapshot a run folder."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from handgrad import checkpoint, cli

# a tiny, fast run: few steps, no gradient check, no samples
QUICK = ["-n", "0", "--no-check", "--eval-every", "0", "--log-every", "20"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `handgrad ARGV`; argparse's exits count as statuses."""
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "error:" in lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in a folder, hidden ones too, by name: compare two to prove nothing changed."""
    folder = Path(folder)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def weights(folder: Path, name: str = checkpoint.MODEL_WEIGHTS) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / name)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs"


def metrics(folder: Path) -> list[dict]:
    """metrics.jsonl without wall-clock times, which no two runs share."""
    lines = (Path(folder) / checkpoint.METRICS).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed"} for line in lines]


def interrupt_after_save(monkeypatch, at_step: int) -> None:
    """Press Ctrl-C right after the checkpoint of `at_step` is written, as a user could."""
    save = checkpoint.save_checkpoint

    def save_then_interrupt(out_dir, *, step, **kw):
        save(out_dir, step=step, **kw)
        if step == at_step:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_interrupt)


def assert_resumes_bit_for_bit(folder: Path, capsys, argv: list, stop_at: int) -> tuple[Path, Path]:
    """`handgrad train ARGV` straight, and the same stopped at `stop_at` then resumed: the same weights and
    metrics, bit for bit. The two run folders, straight and resumed."""
    straight, stopped = Path(folder) / "straight", Path(folder) / "stopped"
    for out, extra in ((straight, []), (stopped, ["--stop-at", str(stop_at)])):
        rc, _, err = run_cli(["train", "-o", out, *argv, *extra], capsys)
        assert rc == 0, err
    rc, _, err = run_cli(["train", "-o", stopped, "--resume"], capsys)
    assert rc == 0, err
    assert_bit_identical(weights(straight), weights(stopped))
    assert metrics(straight) == metrics(stopped)
    return straight, stopped


def assert_tracks_autograd(folder: Path, capsys, argv: list, tolerance: float) -> list[dict]:
    """`handgrad train ARGV` with the manual backward and with autograd's: the same logged steps, the
    losses within `tolerance` at each; the manual run's metrics."""
    for grad in ("manual", "autograd"):
        rc, _, err = run_cli(["train", "-o", Path(folder) / grad, "--grad", grad, *argv], capsys)
        assert rc == 0, err
    m, a = metrics(Path(folder) / "manual"), metrics(Path(folder) / "autograd")
    assert [r["step"] for r in m] == [r["step"] for r in a]
    for rm, ra in zip(m, a):
        assert abs(rm["train_loss"] - ra["train_loss"]) <= tolerance, rm["step"]
        assert ("val_loss" in rm) == ("val_loss" in ra)
        assert abs(rm.get("val_loss", 0) - ra.get("val_loss", 0)) <= tolerance, rm["step"]
    return m
