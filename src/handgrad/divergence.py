"""Stop a diverging run: a NaN or infinite loss or gradient, found at the step it appeared.

On a CPU each step is checked as it ends: its loss, and one sum over every
gradient (a NaN or inf anywhere makes the sum NaN or inf; only where the sum is
bad are the gradients looked at one by one, to name the first). Reading a value
off a GPU every step would stall it, so there each step only queues a few
numbers: its loss, and the norm of each gradient from one fused op; `check`
stacks and reads the queue where the loop reads the device anyway: a logged
loss, a checkpoint, the end.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .errors import HandgradError
from .layers import packed

MAX_PENDING = 1000  # steps between forced checks, however rarely the loop logs


class DivergenceWatch:
    """`left_on_disk()` ends each error message: what the run leaves behind (the last good checkpoint).
    `grad_buffer`, where given, is one tensor whose parts are the gradient buffers (`Model.grad_buffer`):
    one sum of it checks them all."""

    def __init__(self, named_grads: list[tuple[str, torch.Tensor]], lr: float, left_on_disk: Callable[[], str] = lambda: "",
                 grad_buffer: torch.Tensor | None = None):
        self.names = ["loss"] + [f"gradient of {name}" for name, _ in named_grads]
        self.grads = [g for _, g in named_grads]
        self.lr = lr
        self.left_on_disk = left_on_disk
        self.pending: list[tuple[int, torch.Tensor, list[torch.Tensor]]] = []
        self.now = all(g.device.type == "cpu" for g in self.grads)  # check each step as it ends
        covered = grad_buffer is not None and packed(self.grads) is grad_buffer  # the buffers fill it, nothing else
        self.sums = [grad_buffer] if covered else self.grads

    def observe(self, step: int, loss: torch.Tensor) -> None:
        """After the backward, before the update. (Finite values overflow float32 only when a run has blown up anyway.)"""
        if self.now:
            if not math.isfinite(float(loss)):
                self.fail(step, 0)
            if not all(math.isfinite(float(t.sum())) for t in self.sums):
                bad = next((i for i, g in enumerate(self.grads) if not bool(torch.isfinite(g).all())), None)
                if bad is not None:  # else finite gradients whose sum overflowed: the weights' check will tell
                    self.fail(step, 1 + bad)
            return
        self.pending.append((step, loss, torch._foreach_norm(self.grads)))
        if len(self.pending) >= MAX_PENDING:
            self.check()

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

    def check_weights(self, step: int, params: list[torch.Tensor]) -> None:
        """Before a save: finite gradients times a large learning rate can still overflow the weights."""
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise HandgradError(f"step {step}: the weights became NaN or infinite: {self.hint()}{self.left_on_disk()}")
