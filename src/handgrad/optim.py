"""Optimizers with hand-written updates, and learning-rate schedules.

Each optimizer holds the very gradient buffers the model's backward fills
(`model.grads()`), and `step` reads only those; a parameter tensor given twice
(a layer used twice, tied weights) is held once: one update a step, one state.
The updates follow torch.optim's definitions term by term (tests compare them
over 100 steps).
`state_dict()` is a flat dict of tensors (the step count too) so that a
checkpoint restores the optimizer exactly: '<index>.<name>' per parameter.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .errors import HandgradError
from .layers import packed, views_like

OPTIMIZERS = ("sgd", "momentum", "adamw")
SCHEDULES = ("step", "cosine")


class Optimizer:
    """Parameters, their gradient buffers, a step count and per-parameter state tensors."""

    state_names: tuple[str, ...] = ()

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float):
        params, grads = list(params), list(grads)
        if len(params) != len(grads):
            raise ValueError("one gradient buffer per parameter")
        for p, g in zip(params, grads):
            if p.shape != g.shape:
                raise ValueError(f"a gradient buffer of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")
        # each parameter tensor once (a layer used twice, tied weights): updated once a step, one set of state
        self.given = len(params)
        first: dict[int, int] = {}
        for i, (p, g) in enumerate(zip(params, grads)):
            if id(p) in first and grads[first[id(p)]] is not g:
                raise ValueError("a parameter given twice with two gradient buffers: its gradient must be one buffer")
            first.setdefault(id(p), i)
        self.distinct = list(first.values())  # the positions kept, of the lists given
        params, grads = [params[i] for i in self.distinct], [grads[i] for i in self.distinct]
        self.params, self.grads, self.lr = params, grads, lr
        self.step_count = 0  # a Python number: counting costs no tensor op (the checkpoint stores it as a tensor)
        # Where one tensor holds every parameter and another every gradient buffer in the same order
        # (`Sequential.flatten`), the state is laid out the same way and an update is a few ops on the
        # three flat tensors, whatever the number of parameters: `flat` holds them, else it is None.
        flat_params, flat_grads = packed(params), packed(grads)
        self.flat: dict[str, torch.Tensor] | None = None
        if flat_params is not None and flat_grads is not None and flat_params.shape == flat_grads.shape:
            self.flat = {"params": flat_params, "grads": flat_grads}
        self.state: dict[str, list[torch.Tensor]] = {}
        for name in self.state_names:
            if self.flat is None:
                self.state[name] = [torch.zeros_like(p) for p in params]
            else:
                self.flat[name] = torch.zeros_like(flat_params)
                self.state[name] = views_like(self.flat[name], params)

    def tensors(self, *state_names: str, flat: bool = True):
        """(parameter, gradient, *state) to update alike: the three flat tensors once, where there are
        such (and `flat`), else each parameter's own."""
        if flat and self.flat is not None:
            return [tuple(self.flat[n] for n in ("params", "grads", *state_names))]
        return list(zip(self.params, self.grads, *(self.state[n] for n in state_names)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"step": torch.tensor(self.step_count, dtype=torch.int64)}
        for name, tensors in self.state.items():
            for i, t in enumerate(tensors):
                out[f"{i}.{name}"] = t.clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise HandgradError(
                f"optimizer state does not match {type(self).__name__} over {len(self.params)} parameters"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; unexpected: {', '.join(unexpected)}" if unexpected else "")
            )
        for key, t in own.items():
            if tuple(state[key].shape) != tuple(t.shape):
                raise HandgradError(f"optimizer state {key} has shape {tuple(state[key].shape)}, expected {tuple(t.shape)}")
        self.step_count = int(state["step"])
        for name, tensors in self.state.items():
            for i, t in enumerate(tensors):
                t.copy_(state[f"{i}.{name}"])

    def step(self, lr: float | None = None) -> None:
        """Count the step, then update every parameter from its gradient buffer (at `lr`, or the optimizer's)."""
        lr = self.lr if lr is None else lr
        self.step_count += 1
        if torch.is_grad_enabled():  # the update is not part of any graph
            with torch.no_grad():
                self.update(lr)
        else:  # no context to enter, nor to leave (in inference mode, leaving one slows the next step's ops)
            self.update(lr)

    def update(self, lr: float) -> None:
        """The update of step number `step_count`, which `step` has counted."""
        raise NotImplementedError


def per_parameter(value: float | list[float], optimizer: Optimizer) -> list[float]:
    """One number, or one per parameter given, as one per distinct parameter (a repeat's is its first's)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * optimizer.given
    if len(values) != optimizer.given:
        raise ValueError("one weight decay per parameter")
    return [values[i] for i in optimizer.distinct]


class SGD(Optimizer):
    """p <- p - lr * g;  with momentum mu:  v <- mu * v + g,  p <- p - lr * v  (v = g at the first step).

    `weight_decay` wd (one number or one per parameter) adds wd * p to the
    gradient first: L2 regularisation, as torch.optim.SGD.
    """

    def __init__(self, params, grads, lr: float, momentum: float = 0.0, weight_decay: float | list[float] = 0.0):
        self.state_names = ("momentum_buffer",) if momentum else ()
        super().__init__(params, grads, lr)
        self.momentum = momentum
        self.weight_decay = per_parameter(weight_decay, self)
        self.one_decay = len(set(self.weight_decay)) == 1  # then the flat tensors can be updated as one
        self.plain = not momentum and not any(self.weight_decay)  # p <- p - lr * g, nothing more

    def update(self, lr: float) -> None:
        """The update of `step`, which reads no step count: what the fast paths record in their graphs
        (a Python counter changed inside one would be a new constant each call); they count the steps."""
        # the flat tensors where every parameter has the same decay; compiled, the per-parameter ops fuse
        flat = self.flat is not None and self.one_decay and not torch.compiler.is_compiling()
        if self.plain:
            if flat:  # plain SGD on the flat tensors: one op
                self.flat["params"].add_(self.flat["grads"], alpha=-lr)
            else:  # one call updates every parameter
                torch._foreach_add_(self.params, self.grads, alpha=-lr)
            return
        state = ("momentum_buffer",) if self.momentum else ()
        for (p, g, *v), d in zip(self.tensors(*state, flat=flat), self.weight_decay):
            if d:
                g = g.add(p, alpha=d)
            if self.momentum:
                v[0].mul_(self.momentum).add_(g)  # v starts at zero, so the first step sets v = g exactly
                g = v[0]
            p.add_(g, alpha=-lr)


class AdamW(Optimizer):
    """Adam with decoupled weight decay, t counting from 1:

        p <- p * (1 - lr * wd)
        m <- b1 * m + (1 - b1) * g          v <- b2 * v + (1 - b2) * g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)

    `weight_decay` is one number or one per parameter (biases and BatchNorm's
    gain and shift are usually left undecayed).
    """

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, grads, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float | list[float] = 0.01):
        super().__init__(params, grads, lr)
        self.betas, self.eps = betas, eps
        self.weight_decay = per_parameter(weight_decay, self)

    def update(self, lr: float) -> None:
        t = self.step_count
        b1, b2 = self.betas
        step_size = lr / (1 - b1**t)
        rsqrt_bc2 = 1 / math.sqrt(1 - b2**t)
        for p, wd in zip(self.params, self.weight_decay):
            if wd:
                p.mul_(1 - lr * wd)
        for p, g, m, v in self.tensors("exp_avg", "exp_avg_sq", flat=not torch.compiler.is_compiling()):
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() * rsqrt_bc2).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)


def step_schedule(step: int, total_steps: int, lr: float) -> float:
    """The seed's schedule: lr for the first half of the run, lr / 10 from the halfway step."""
    return lr if step < total_steps // 2 else lr / 10


COSINE_FINAL_FRACTION = 0.01  # cosine decays to lr/100: near zero, so the last steps average the noise away


def cosine_schedule(step: int, total_steps: int, lr: float, warmup: int = 0,
                    floor: float = COSINE_FINAL_FRACTION) -> float:
    """Linear warm-up from lr/warmup to lr over `warmup` steps, then half a cosine down to lr * floor."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(total_steps - 1 - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    low = lr * floor
    return low + (lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate(schedule: str, step: int, total_steps: int, lr: float, warmup: int = 0,
                  floor: float = COSINE_FINAL_FRACTION) -> float:
    """The learning rate for `step` (counting from 0) of a run of `total_steps`; the cosine schedule ends at
    lr * floor."""
    if schedule == "step":
        return step_schedule(step, total_steps, lr)
    if schedule == "cosine":
        return cosine_schedule(step, total_steps, lr, warmup, floor)
    raise HandgradError(f"unknown learning-rate schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay for matrices (embeddings, Linear weights); not for biases or BatchNorm's gain and shift."""
    return p.ndim >= 2


def make_optimizer(name: str, model, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> Optimizer:
    """The optimizer `name` over the model's parameters and the gradient buffers its backward fills."""
    params, grads = model.parameters(), model.grads()
    wd = [weight_decay if decays(n, p) else 0.0 for n, p in model.named_parameters()]
    if name == "sgd":
        return SGD(params, grads, lr=lr, weight_decay=wd)
    if name == "momentum":
        return SGD(params, grads, lr=lr, momentum=momentum, weight_decay=wd)
    if name == "adamw":
        return AdamW(params, grads, lr=lr, weight_decay=wd)
    raise HandgradError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


class WeightAverage:
    """An exponential moving average of the parameters, for evaluation: after each update,
    average <- average + (1 - d) (p - average), d = min(decay, (1 + n) / (10 + n)) at the n-th update,
    so that the first updates, whose average would otherwise lean on the initial weights for thousands
    of steps, weigh the recent weights more (d = 0.18, 0.25, 0.31, ... reaching `decay` after about
    9 / (1 - decay) updates). With a learning rate that ends well above zero, the average of the last
    thousand steps or so generalised better than the last weights here (the transformer, docs/models.md).
    It lies like the parameters: one flat tensor where they are views of one (`Sequential.flatten`).
    `swapped_in()` puts the average into the parameters for a while (evaluation, saving the model)."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        if not 0 < decay < 1:
            raise HandgradError(f"the weight average's decay must be in (0, 1), got {decay:g}")
        self.decay, self.updates = decay, 0
        distinct = list({id(p): p for p in params}.values())  # a tensor held twice (tied weights) once
        flat = packed(distinct)
        self.params = [flat] if flat is not None else distinct
        self.average = [p.detach().clone() for p in self.params]

    def update(self) -> None:
        self.updates += 1
        weight = 1 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for a, p in zip(self.average, self.params):
                a.lerp_(p, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"updates": torch.tensor(self.updates, dtype=torch.int64)}
        out |= {f"{i}": a.clone() for i, a in enumerate(self.average)}
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        if set(state) != set(own) or any(tuple(state[k].shape) != tuple(t.shape) for k, t in own.items()):
            raise HandgradError(f"the weight average does not match the model's parameters "
                                f"(expected {len(self.average)} tensors of shapes "
                                f"{[tuple(a.shape) for a in self.average]})")
        self.updates = int(state["updates"])
        with torch.no_grad():
            for i, a in enumerate(self.average):
                a.copy_(state[f"{i}"])

    @contextlib.contextmanager
    def swapped_in(self):
        """The average in the parameters' place until the block ends, then the trained weights back."""
        held = [p.detach().clone() for p in self.params]
        self.keep()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, h in zip(self.params, held):
                    p.copy_(h)

    def keep(self) -> None:
        """The average into the parameters for good (the end of training)."""
        with torch.no_grad():
            for p, a in zip(self.params, self.average):
                p.copy_(a)


def evaluated(average: WeightAverage | None):
    """The weights evaluation reads, for a `with` block: their moving average swapped in where the run keeps
    one (`average`), else the trained weights as they are."""
    return average.swapped_in() if average is not None else contextlib.nullcontext()
