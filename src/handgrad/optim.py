"""Optimizers with hand-written updates. Each holds the very gradient buffers
the model's backward fills (`model.grads()`), and `step` reads only those.
"""
from __future__ import annotations

import torch


class SGD:
    """p <- p - lr * g"""

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float):
        if len(params) != len(grads):
            raise ValueError("one gradient buffer per parameter")
        self.params, self.grads, self.lr = list(params), list(grads), lr

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        for p, g in zip(self.params, self.grads):
            p.add_(g, alpha=-lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def step_schedule(step: int, total_steps: int, lr: float) -> float:
    """The seed's schedule: lr for the first half of the run, lr / 10 from the halfway step."""
    return lr if step < total_steps // 2 else lr / 10
