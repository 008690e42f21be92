"""What `handgrad exercise new | check | train` do and print; the exit status they return."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import HandgradError
from .levels import LEVEL_CHOICES, VERSIONS


def one_thread() -> None:
    """Batches of 32: many tiny ops, which threads only slow down (4x on a shared 2-core machine)."""
    import torch

    torch.set_num_threads(1)


def new(folder: str, level: str, solved: bool, force: bool) -> int:
    from .notebook import write_exercises

    written = write_exercises(Path(folder), LEVEL_CHOICES[level], solved=solved, force=force)
    kind = "solved" if solved else "to fill in"
    print(f"wrote {len(written)} files ({kind}), each level as a Python file and as a notebook:")
    for path in written:
        print(f"  {path}")
    first = written[0]
    verb = "train" if VERSIONS[LEVEL_CHOICES[level][0]].level == 4 else "check"
    print(f"then: handgrad exercise {verb} {first}")
    return 0


def check(file: str, as_json: bool, time_limit: float) -> int:
    from .checker import check_file, format_report

    one_thread()
    report = check_file(Path(file), time_limit_s=time_limit)
    print(json.dumps(report.to_dict(), indent=1) if as_json else format_report(report))
    return 0 if report.passed else 1


def train(file: str, steps: int, log_every: int, plot_path: str | None, time_limit: float) -> int:
    from .notebook import read_cells, version_of
    from .training import DRIFT_TOL, LOSS_TOL, plot, run_training

    one_thread()
    path = Path(file)
    cells = read_cells(path)
    version = version_of(path, cells)
    if version.level != 4:
        raise HandgradError(f"{path} is exercise {version.key}, not a training loop: "
                            f"`handgrad exercise check {path}` checks it (train runs level 4)")
    png = Path(plot_path) if plot_path else path.with_name(f"{path.stem}-loss.png")
    if not png.parent.is_dir():
        raise HandgradError(f"cannot write {png}: no folder {png.parent}")
    print(f"exercise {version.key} ({version.title}): {path}")
    print(f"your loop beside the same loop on autograd's gradients, same initialisation and batches "
          f"(batch 32, float64), up to {steps:,} steps")
    run = run_training(path, cells, version, max_steps=steps, log_every=log_every, time_limit_s=time_limit)
    print(f"{'step':>6}  {'your loss':>10}  {'autograd':>10}  {'|diff|':>8}")
    for step, mine, ref in run.losses:
        if step % log_every == 0 or step == run.losses[-1][0]:
            print(f"{step:>6}  {mine:>10.6f}  {ref:>10.6f}  {abs(mine - ref):>8.1e}")
    if run.losses:
        plot(run, png, f"exercise {version.key}: your run and autograd's")
    if run.failure:
        where = f" at step {run.failed_at}" if run.failed_at is not None else ""
        print(f"FAIL{where}: {run.failure}")
    else:
        print(f"PASS: {run.steps:,} steps; your parameters within {run.max_param_diff:.1e} of autograd's "
              f"(bound {DRIFT_TOL:g}), losses within {run.max_loss_diff:.1e} at every logged step (bound {LOSS_TOL:g})")
    if run.losses:
        print(f"loss curves: {png}")
    return 1 if run.failure else 0
