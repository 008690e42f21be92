"""Stop a diverging run, at the step it went bad, before anything bad is saved.

What a step changes is watched: its loss, its gradients, the weights and the
running statistics (BatchNorm's), and so is every evaluation. A run goes bad
when any of them turns NaN or infinite, or when the loss runs far above where
it started: `LOSS_RISE` times ln(vocabulary) above the first step's loss (a
model that guessed uniformly would score ln(vocabulary); a loss that many
times worse than the start is a run blown up, which float32 would only turn
into NaN thousands of steps later).

On a CPU each step is checked as it ends: its loss, and one sum over every
gradient (a NaN or inf anywhere makes the sum NaN or inf; only where the sum is
bad are the gradients looked at one by one, to name the first). Reading a value
off a GPU every step would stall it, so there each step only queues a few
numbers: its loss, and the norm of each gradient from one fused op; `check`
stacks and reads the queue where the loop reads the device anyway: a logged
loss, a checkpoint, the end. The weights and running statistics are checked at
those points too (`check_state`): a step whose loss and gradients are finite
leaves finite weights unless the update overflows, and then the next step's
loss is NaN.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .errors import HandgradError
from .layers import packed

MAX_PENDING = 1000  # steps between forced checks, however rarely the loop logs
LOSS_RISE = 3  # the loss may rise this many times ln(vocabulary) above its start before the run counts as diverged


def loss_limit(start_loss: float, vocab_size: int) -> float:
    """The highest loss a run that started at `start_loss` may reach before it counts as diverged."""
    return start_loss + LOSS_RISE * math.log(max(vocab_size, 2))


class DivergenceWatch:
    """`left_on_disk()` ends each error message: what the run leaves behind (the last good checkpoint).
    `grad_buffer`, where given, is one tensor whose parts are the gradient buffers (`Model.grad_buffer`):
    one sum of it checks them all. `state` names the tensors a step changes besides the gradients
    (weights, running statistics), checked by `check_state`. `vocab_size` sets the loss's limit, from
    the first loss observed, or from `start_loss` (a resumed run's first logged loss)."""

    def __init__(self, named_grads: list[tuple[str, torch.Tensor]], lr: float, left_on_disk: Callable[[], str] = lambda: "",
                 grad_buffer: torch.Tensor | None = None, state: list[tuple[str, torch.Tensor]] = (),
                 vocab_size: int | None = None, start_loss: float | None = None):
        self.names = ["loss"] + [f"gradient of {name}" for name, _ in named_grads]
        self.grads = [g for _, g in named_grads]
        self.state = list(state)
        self.lr = lr
        self.left_on_disk = left_on_disk
        self.vocab_size = vocab_size
        self.limit = None if vocab_size is None or start_loss is None else loss_limit(start_loss, vocab_size)
        self.pending: list[tuple[int, torch.Tensor, list[torch.Tensor]]] = []
        self.now = all(g.device.type == "cpu" for g in self.grads)  # check each step as it ends
        covered = grad_buffer is not None and packed(self.grads) is grad_buffer  # the buffers fill it, nothing else
        self.sums = [grad_buffer] if covered else self.grads

    def observe(self, step: int, loss: torch.Tensor) -> None:
        """After the backward, before the update. (Finite values overflow float32 only when a run has blown up anyway.)"""
        if self.now:
            value = float(loss)
            if not math.isfinite(value):
                self.fail(step, 0)
            self.check_loss(step, value)
            if not all(math.isfinite(float(t.sum())) for t in self.sums):
                bad = next((i for i, g in enumerate(self.grads) if not bool(torch.isfinite(g).all())), None)
                if bad is not None:  # else finite gradients whose sum overflowed: the weights' check will tell
                    self.fail(step, 1 + bad)
            return
        self.pending.append((step, loss, torch._foreach_norm(self.grads)))
        if len(self.pending) >= MAX_PENDING:
            self.check()

    def check_loss(self, step: int, value: float) -> None:
        """A finite loss far above where the run started: diverged."""
        if self.vocab_size is None:
            return
        if self.limit is None:
            self.limit = loss_limit(value, self.vocab_size)
        elif value > self.limit:
            raise HandgradError(f"step {step}: the loss rose to {value:.4g}, far above where the run started "
                                f"(its limit {self.limit:.4g}): {self.hint()}{self.left_on_disk()}")

    def fail(self, step: int, which: int):
        raise HandgradError(f"step {step}: the {self.names[which]} became NaN or infinite: {self.hint()}{self.left_on_disk()}")

    def hint(self) -> str:
        return f"training diverged; lower the learning rate (--lr, now {self.lr:g})"

    def check(self) -> None:
        """Raise, naming the first bad step, if any step since the last check went bad."""
        if not self.pending:
            return
        values = torch.stack([t for _, loss, norms in self.pending for t in (loss, *norms)]).view(len(self.pending), -1)
        bad = (~torch.isfinite(values)).nonzero().tolist()
        steps = [step for step, _, _ in self.pending]
        self.pending.clear()
        if bad:
            row, col = bad[0]
            self.fail(steps[row], col)
        for step, loss in zip(steps, values[:, 0].tolist()):
            self.check_loss(step, loss)

    def check_state(self, step: int) -> None:
        """The weights and running statistics: finite gradients times a large learning rate can still overflow them."""
        for name, t in self.state:
            if not bool(torch.isfinite(t).all()):
                raise HandgradError(f"step {step}: {name} became NaN or infinite: {self.hint()}{self.left_on_disk()}")

    def check_value(self, step: int, what: str, value: float) -> None:
        """An evaluation's result."""
        if not math.isfinite(value):
            raise HandgradError(f"step {step}: the {what} became NaN or infinite: {self.hint()}{self.left_on_disk()}")
