"""Stop a diverging run: a NaN or infinite loss or gradient, found at the step it appeared.

Reading a value off the device every step would stall a GPU, so each step only
queues a few numbers: its loss, and the norm of each gradient from one fused op
(a NaN or inf in a gradient makes its norm NaN or inf); `check` stacks and reads
the queue where the loop reads the device anyway: a logged loss, a checkpoint,
the end.
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import HandgradError

MAX_PENDING = 1000  # steps between forced checks, however rarely the loop logs


class DivergenceWatch:
    """`left_on_disk()` ends each error message: what the run leaves behind (the last good checkpoint)."""

    def __init__(self, named_grads: list[tuple[str, torch.Tensor]], lr: float, left_on_disk: Callable[[], str] = lambda: ""):
        self.names = ["loss"] + [f"gradient of {name}" for name, _ in named_grads]
        self.grads = [g for _, g in named_grads]
        self.lr = lr
        self.left_on_disk = left_on_disk
        self.pending: list[tuple[int, torch.Tensor, list[torch.Tensor]]] = []

    def observe(self, step: int, loss: torch.Tensor) -> None:
        """After the backward, before the update. (Finite values overflow float32 only when a run has blown up anyway.)"""
        self.pending.append((step, loss, torch._foreach_norm(self.grads)))
        if len(self.pending) >= MAX_PENDING:
            self.check()

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
            raise HandgradError(f"step {steps[row]}: the {self.names[col]} became NaN or infinite: {self.hint()}{self.left_on_disk()}")

    def check_weights(self, step: int, params: list[torch.Tensor]) -> None:
        """Before a save: finite gradients times a large learning rate can still overflow the weights."""
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise HandgradError(f"step {step}: the weights became NaN or infinite: {self.hint()}{self.left_on_disk()}")
