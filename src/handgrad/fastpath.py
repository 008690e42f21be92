"""The fast path: whole manual training steps compiled into one graph.

`CompiledStep` traces the model's own layers (their `forward` and `backward`,
the very methods the eager path runs) and the optimizer's own `step`, with
`torch.compile`, and runs `steps_per_call` consecutive steps per call: batch
gather, zero_grad, forward, backward, update. Nothing is re-derived here: there
is no second copy of the math, so the gradient check of the layers covers this
path, and tests run it side by side with the eager path (losses, weights,
running statistics).

What a compiled step changes in place is exactly what the eager step changes:
the parameter tensors and the gradient buffers the optimizer holds, the
BatchNorm running statistics and the optimizer's state. The layers' saved
intermediates are dropped at the end of each call.

Costs: compiling takes seconds to tens of seconds, once per model shape,
batch size and learning rate (each distinct rate is a constant of its graph,
so a schedule with a new rate every step suits the eager path). Speed: at small
batches the eager path spends its time dispatching operations one by one; one
compiled call issues a handful of fused kernels per step instead, and several
steps per call share the call's fixed cost. At large batches the fused kernels
make fewer passes over memory.
"""
from __future__ import annotations

import time

import torch

from .errors import HandgradError
from .optim import SGD

IMPLS = ("eager", "compiled", "auto")


def can_compile(optimizer) -> bool:
    """Optimizers whose `step` compiles into the graph: SGD (with or without momentum).

    AdamW's bias corrections are Python numbers of the step count, a new
    constant every step, so every step would compile again.
    """
    return isinstance(optimizer, SGD)


class CompiledStep:
    """`steps_per_call` manual training steps, compiled: batch gather, zero_grad, forward, backward,
    and the optimizer's update; without an optimizer, one step's forward and backward only (the
    caller updates, as `handgrad train` does with any optimizer and schedule).

    Call with the training inputs `X`, targets `Y`, batch indices `idx` of
    shape (steps_per_call, batch) and the learning rate; returns the losses of
    the steps, shape (steps_per_call,).
    """

    def __init__(self, model, optimizer=None, steps_per_call: int = 1, options: dict | None = None):
        if steps_per_call < 1:
            raise HandgradError(f"steps per call must be at least 1, got {steps_per_call}")
        if optimizer is None and steps_per_call != 1:
            raise HandgradError("several steps per call need the optimizer's update between them")
        if optimizer is not None and not can_compile(optimizer):
            raise HandgradError(f"the compiled update supports the sgd and momentum optimizers, not {type(optimizer).__name__}")
        self.model, self.optimizer, self.steps_per_call = model, optimizer, steps_per_call
        self.compile_seconds = 0.0
        self._compiled = torch.compile(self._steps, fullgraph=True, dynamic=False, options=options)
        self._seen: set[tuple] = set()

    def _steps(self, X, Y, idx, lr):
        losses = []
        for k in range(self.steps_per_call):
            x, y = (X, Y) if idx is None else (X[idx[k]], Y[idx[k]])
            self.model.zero_grad()
            losses.append(self.model.forward(x, y))
            self.model.backward()
            if self.optimizer is not None:
                self.optimizer.step(lr)
        self.model.clear_saved()
        return torch.stack(losses)

    def __call__(self, X: torch.Tensor, Y: torch.Tensor, idx: torch.Tensor | None, lr: float | None = None) -> torch.Tensor:
        """`idx` None: X and Y are one step's batch."""
        if idx is None and self.steps_per_call != 1:
            raise HandgradError(f"{self.steps_per_call} steps per call need batch indices")
        if idx is not None and (idx.ndim != 2 or idx.shape[0] != self.steps_per_call):
            raise HandgradError(f"batch indices must have shape ({self.steps_per_call}, batch), got {tuple(idx.shape)}")
        if not self.model.training:
            raise HandgradError("the compiled step trains: put the model in training mode first")
        lr = None if self.optimizer is None else float(self.optimizer.lr if lr is None else lr)
        key = (None if idx is None else tuple(idx.shape), tuple(X.shape), X.device, self.model.parameters()[0].dtype, lr)
        if key in self._seen:
            # this exact call has compiled before: check only the guards that tell compiled
            # versions apart (the learning rate), not every attribute the trace read
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True), torch.no_grad():
                return self._compiled(X, Y, idx, lr)
        t0 = time.perf_counter()
        with torch.no_grad():
            losses = self._compiled(X, Y, idx, lr)
        self._seen.add(key)
        self.compile_seconds += time.perf_counter() - t0
        return losses


# Choosing a path for `handgrad train --impl auto`: compile when the run is long enough that the
# time saved exceeds the compile time. Measured with `handgrad bench` on one CPU core: compiling
# takes about COMPILE_SECONDS, and a compiled step saves about SAVED_PER_STEP + SAVED_PER_EXAMPLE
# * batch seconds over the eager one.
COMPILE_SECONDS = 30.0
SAVED_PER_STEP = 1e-4
SAVED_PER_EXAMPLE = 5e-7


def worth_compiling(steps: int, batch_size: int) -> bool:
    return steps * (SAVED_PER_STEP + SAVED_PER_EXAMPLE * batch_size) > COMPILE_SECONDS


def choose_impl(impl: str, grad: str, steps: int, batch_size: int, diagnostics: bool = False) -> tuple[str, str]:
    """The path `handgrad train` takes, and why: ("eager" or "compiled", reason)."""
    if impl not in IMPLS:
        raise HandgradError(f"unknown --impl {impl!r}: choose one of {', '.join(IMPLS)}")
    if grad != "manual":
        if impl == "compiled":
            raise HandgradError("--impl compiled compiles the manual backward; it cannot run with --grad autograd")
        return "eager", "autograd gradients run eagerly"
    if impl == "compiled":
        if diagnostics:
            raise HandgradError("--diagnostics reads each layer's saved activations, which the compiled step does not keep; "
                                "use --impl eager")
        return "compiled", "--impl compiled"
    if impl == "eager":
        return "eager", "--impl eager"
    if diagnostics:
        return "eager", "auto: --diagnostics reads the eager path's saved activations"
    if worth_compiling(steps, batch_size):
        return "compiled", f"auto: {steps:,} steps of batch {batch_size} repay a ~{COMPILE_SECONDS:.0f}s compile"
    return "eager", f"auto: {steps:,} steps of batch {batch_size} would not repay a ~{COMPILE_SECONDS:.0f}s compile"


def compiled_train_step(model):
    """A `step_fn(model, x, y) -> loss` for the training loop: forward and backward compiled, update left to the loop."""
    compiled = CompiledStep(model)

    def step_fn(m, x, y):
        if m is not model:
            raise HandgradError("this compiled step belongs to another model")
        return compiled(x, y, None)[0]

    step_fn.compiled = compiled
    return step_fn
