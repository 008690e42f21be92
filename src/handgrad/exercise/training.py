"""`handgrad exercise train`: the learner's level-4 loop, run as written, beside the same SGD loop on autograd's
gradients from the same initialisation and batches. Each call of `runtime.get_batch` is a checkpoint: the
learner's parameters after the step before are compared with the autograd run's, and the first parameter
that stopped moving or drifted stops the loop, named."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import runtime
from .checker import Report, add_finite_differences, reference, run_forward
from .diagnosis import UNASSIGNED, Context, Judgement, judge, value_hint
from .levels import Version
from .notebook import Cell
from .sandbox import LearnerError, StopLearnerCode, TimeLimit, compile_cell, fresh_namespace, run_code, time_limit

# After every step, max |learner - autograd| <= DRIFT_TOL * (1 + max |autograd|) for every parameter, and at the
# logged steps |loss - autograd's loss| <= LOSS_TOL. Both runs are float64: the solved loop measured at
# most 3.9e-15 apart over 2000 steps (docs/exercise.md), so a bound this loose only ever trips on a mistake.
DRIFT_TOL = 1e-6
LOSS_TOL = 1e-6
DEFAULT_STEPS = 2000


class Finished(StopLearnerCode):
    """The step budget is spent: the loop is ended from inside get_batch."""


class TrainingFailed(StopLearnerCode):
    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step
        self.message = message


@dataclass
class Run:
    losses: list = field(default_factory=list)  # (step, learner's loss, autograd's loss), every step
    steps: int = 0  # updates compared
    max_param_diff: float = 0.0
    max_loss_diff: float = 0.0  # at the logged steps
    failure: str | None = None
    failed_at: int | None = None
    rows: list = field(default_factory=list)  # check mode: one judgement per parameter
    taken: dict = field(default_factory=dict)  # check mode: each parameter's step / the learning rate


def never_moved_message(names: list[str], step: int) -> str:
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    buffer = f"{names[0]}_grad"
    return (f"{listed} never moved at step {step}, where autograd's run moved {'it' if len(names) == 1 else 'them'}: "
            f"the gradients never reach the update (a `{buffer} = ...` inside backward() binds a new local name and "
            f"the buffer the update reads stays zero; write into it: {buffer}.copy_(...))")


class Comparison:
    """The session runtime.get_batch hands each call to while a file runs."""

    def __init__(self, version: Version, ns: dict, max_steps: int, log_every: int, check_only: bool = False):
        self.version, self.ns, self.max_steps, self.log_every = version, ns, max_steps, log_every
        self.check_only = check_only
        self.params = [p.clone().requires_grad_() for p in runtime.initial_params()]
        self.calls = 0
        self.run = Run()
        self.pending = None  # (step, x, learner's parameters before it, autograd's loss and gradients)

    def batch(self, step):
        k = self.calls
        self.calls += 1
        if k > 0:
            self.compare()
        if k >= self.max_steps:
            raise Finished()
        x, y = runtime.batch_at(k)
        ns = run_forward(self.version, x, y, dict(zip(self.version.params, self.params)))
        grads = torch.autograd.grad(ns["loss"], self.params)
        self.pending = (k, x, y, self.learner_params(k), float(ns["loss"].detach()), [g.detach() for g in grads])
        return x.clone(), y.clone()

    def learner_params(self, k: int) -> list[torch.Tensor]:
        out = []
        for name, ref in zip(self.version.params, self.params):
            value = self.ns.get(name)
            if not isinstance(value, torch.Tensor) or value.shape != ref.shape:
                got = "gone" if value is None else (f"of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                                                    else f"a {type(value).__name__}")
                raise TrainingFailed(k, f"{name} is {got} before step {k}; it must stay a tensor of shape {tuple(ref.shape)}")
            out.append(value.detach().to(torch.float64).clone())
        return out

    def learning_rate(self, k: int) -> float:
        rate = self.ns.get("learning_rate")
        if not callable(rate):
            raise TrainingFailed(k, "the file defines no learning_rate(step): the autograd run takes its rate from it")
        try:
            return float(rate(k))
        except Exception as e:  # the learner's function
            raise TrainingFailed(k, f"learning_rate({k}) raised {type(e).__name__}: {e}") from None

    def compare(self) -> None:
        """The learner's parameters after step k against the autograd run's, which takes its step here."""
        k, x, y, before, ref_loss, grads = self.pending
        self.pending = None
        lr = self.learning_rate(k)
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p -= lr * g
        now = self.learner_params(k + 1)
        loss = self.ns.get("loss")
        try:
            loss = float(loss)
        except (TypeError, ValueError, RuntimeError):
            loss = math.nan
        self.run.losses.append((k, loss, ref_loss))
        self.run.steps = k + 1
        if self.check_only:
            self.judge_step(k, x, before, now, grads, lr)
            return
        stuck = [name for name, b, n, g in zip(self.version.params, before, now, grads)
                 if torch.equal(b, n) and bool((lr * g).any())]
        if stuck:
            raise TrainingFailed(k, never_moved_message(stuck, k))
        for name, b, n, p, g in zip(self.version.params, before, now, self.params, grads):
            if not bool(torch.isfinite(n).all()):
                raise TrainingFailed(k, f"{name} holds NaN or inf after step {k}")
            diff = float((n - p.detach()).abs().max())
            self.run.max_param_diff = max(self.run.max_param_diff, diff)
            if diff > DRIFT_TOL * (1 + float(p.detach().abs().max())):
                taken = (b - n) / lr if lr else b - n
                why = value_hint(name, taken, g, Context(of=name, batch_size=int(x.shape[0]), expected={},
                                                         gradient_of={}, table_ids=x if name == "C" else None))
                raise TrainingFailed(k, f"{name} drifts from autograd's at step {k} (max abs diff {diff:.2e}): "
                                        f"the step it took, divided by the learning rate, against autograd's "
                                        f"gradient: {why}")
        if k % self.log_every == 0:
            loss_diff = abs(loss - ref_loss)
            if not loss_diff <= LOSS_TOL:
                raise TrainingFailed(k, f"your loss at step {k} is {loss:.6f}, autograd's {ref_loss:.6f}: "
                                        "the forward differs from the exercise's")
            self.run.max_loss_diff = max(self.run.max_loss_diff, loss_diff)

    def judge_step(self, k, x, before, now, grads, lr) -> None:
        """Check mode: each parameter's step, divided by the learning rate, judged as its gradient."""
        expected = {f"{n}_grad": g for n, g in zip(self.version.params, grads)}
        for name, b, n, g in zip(self.version.params, before, now, grads):
            taken = (b - n) / lr if lr else UNASSIGNED
            self.run.taken[name] = taken
            ctx = Context(of=name, batch_size=int(x.shape[0]), expected=expected,
                          gradient_of={f"{p}_grad": p for p in self.version.params},
                          table_ids=x if name == "C" else None)
            row = judge(f"{name}_grad", taken, g, ctx)
            if torch.equal(b, n):
                row.verdict, row.hint = "missing", never_moved_message([name], k)
            self.run.rows.append(row)
        raise Finished()

    def finish(self) -> None:
        if self.pending is not None:
            self.compare()


def run_training(path: Path, cells: list[Cell], version: Version, max_steps: int, log_every: int = 100,
                 time_limit_s: float | None = 600.0, check_only: bool = False) -> Run:
    ns = fresh_namespace({"torch": torch, "F": F, "math": math})
    session = Comparison(version, ns, max_steps, log_every, check_only)
    run = session.run
    previous, runtime.session = runtime.session, session
    try:
        code = [(cell, compile_cell(cell)) for cell in cells if cell.kind == "code"]
        with time_limit(time_limit_s):
            try:
                for cell, compiled in code:
                    run_code(compiled, cell, ns)
                session.finish()
            except Finished:
                pass
        if session.calls == 0:
            run.failure = "the file never called runtime.get_batch(step): its loop must draw each batch from it"
    except TrainingFailed as e:
        run.failure, run.failed_at = e.message, e.step
    except LearnerError as e:
        run.failure, run.failed_at = f"your code raised, {e.message}", run.steps
    except TimeLimit as e:
        run.failure, run.failed_at = f"{e} after {run.steps} steps", run.steps
    finally:
        runtime.session = previous
    return run


def check_training(path: Path, cells: list[Cell], version: Version, time_limit_s: float | None) -> Report:
    """`exercise check` of a level-4 file: one step of its loop, each parameter's step against autograd's."""
    run = run_training(path, cells, version, max_steps=1, time_limit_s=time_limit_s, check_only=True)
    if not run.rows:
        reason = run.failure or "no step ran"
        rows = [Judgement(f"{n}_grad", None, tuple(t.shape), "missing", None, f"not reached: {reason}")
                for n, t in zip(version.params, runtime.initial_params())]
        return Report(version, Path(path), rows, [reason])
    x, y = runtime.batch_at(0)
    ref = reference(version, x, y, dict(zip(version.params, runtime.initial_params())))
    for index, (row, name) in enumerate(zip(run.rows, version.params)):
        add_finite_differences(row, run.taken[name], version, ref, name, index)
    return Report(version, Path(path), run.rows, [])


def plot(run: Run, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoint import atomic_write_figure

    steps = [s for s, _, _ in run.losses]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r for _, _, r in run.losses], label="autograd's gradients", linewidth=2.5, alpha=0.5)
    ax.plot(steps, [m for _, m, _ in run.losses], label="your backward and update", linewidth=0.9)
    if run.failed_at is not None:
        ax.axvline(run.failed_at, color="red", linestyle=":", label=f"stopped: step {run.failed_at}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (batch)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_figure(path, fig)
    plt.close(fig)
