"""Gradient checks: every manual gradient against autograd, and against
central finite differences in float64.

The model check compares the gradient buffers the optimizer reads (pass the
optimizer's own list as `grads`), not copies of them: a backward that wrote its
result anywhere else fails here. Both checks run the manual backward on a
forward run as training runs it, with autograd off; autograd's reference runs
its own forward of the same inputs, parameters and running statistics.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch

from .layers import Module

# A manual gradient is close to its reference when both bounds hold: max |manual - reference| <= ATOL
# and norm(manual - reference) / norm(reference) <= RTOL, per dtype. The relative bound catches an error
# that is small in absolute terms only because the gradient is (float32: 0.5% of a tensor of entries
# near 1e-3 passes 1e-5). Measured on the mlp, deep-mlp and wavenet, stepwise and fused, batches of 32
# and 128: relative errors up to 1.6e-6 in float32 and 3.7e-15 in float64 (the layer tests' Linear ->
# BatchNorm -> Tanh over a few rows, ill-conditioned: 1.8e-10).
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5}
RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}
FD_EPS = 1e-4
FD_ATOL = 1e-9  # five-point central differences in float64: truncation ~h^4, round-off ~1e-16/h
# No relative bound on central differences: their error is absolute (the objective's round-off over h,
# measured up to 6e-12), so on a gradient of entries near 1e-8 a correct backward differs by 1e-3
# relative; the absolute bound already holds every entry above 1e-3 to 1e-6 of its value.
FD_RTOL = math.inf


@dataclass
class TensorCheck:
    name: str
    kind: str  # "intermediate", "parameter" or "finite-difference"
    shape: tuple[int, ...]
    exact: bool
    close: bool
    max_abs_diff: float
    rel_diff: float = 0.0  # norm(manual - reference) / norm(reference)
    note: str = ""  # the contract a failure broke, or what a sampled row covers

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def shape_text(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def with_note(result: TensorCheck, note: str, close: bool | None = None) -> TensorCheck:
    """`result` with `note` added to its notes (and `close` set, where given)."""
    notes = "; ".join(n for n in (result.note, note) if n)
    return replace(result, note=notes, close=result.close if close is None else close)


def compare(name: str, kind: str, manual: torch.Tensor | None, reference: torch.Tensor, atol: float,
            rtol: float | None = None) -> TensorCheck:
    """`manual` against `reference`: close when max |diff| <= atol and norm(diff) / norm(reference) <= rtol
    (by default the relative bound of `manual`'s dtype). A reference that the absolute bound cannot tell
    from zero (every entry within atol of 0, a gradient that is zero but for rounding) is held to the
    absolute bound alone: its relative error would be rounding noise over rounding noise."""
    shape = tuple(reference.shape)
    if manual is None:
        return TensorCheck(name, kind, shape, False, False, math.inf, math.inf, "no gradient was produced")
    manual = manual.detach()
    reference = reference.detach().to(manual.dtype)
    rtol = relative_tolerance(manual.dtype) if rtol is None else rtol
    if manual.shape != reference.shape:
        return TensorCheck(name, kind, shape, False, False, math.inf, math.inf,
                           f"shape {shape_text(manual.shape)} where {shape_text(shape)} was expected")
    if not manual.numel():
        return TensorCheck(name, kind, shape, True, True, 0.0, 0.0)
    if not torch.isfinite(manual).all():
        return TensorCheck(name, kind, shape, False, False, math.inf, math.inf, "non-finite entries")
    diff = (manual - reference).double()
    max_diff = float(diff.abs().max())
    diff_norm, ref_norm = float(torch.linalg.vector_norm(diff)), float(torch.linalg.vector_norm(reference.double()))
    rel_diff = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf)
    near_zero = float(reference.abs().max()) <= atol
    close = max_diff <= atol and (rel_diff <= rtol or near_zero)
    note = "zero but for rounding: held to the absolute bound" if near_zero and rel_diff > rtol else ""
    return TensorCheck(name, kind, shape, bool(torch.equal(manual, reference)), close, max_diff, rel_diff, note)


def central_difference(objective, flat: torch.Tensor, i: int, h: float = FD_EPS) -> float:
    """d objective / d flat[i] by the five-point central stencil
    (-f(x+2h) + 8 f(x+h) - 8 f(x-h) + f(x-2h)) / 12h, error O(h^4); flat[i] is restored.
    """
    orig = flat[i].item()
    values = []
    for k in (2, 1, -1, -2):
        flat[i] = orig + k * h
        values.append(objective())
    flat[i] = orig
    f2, f1, fm1, fm2 = values
    return (-f2 + 8 * f1 - 8 * fm1 + fm2) / (12 * h)


def tolerance(dtype: torch.dtype) -> float:
    """The absolute bound of a manual gradient in `dtype` against autograd's."""
    return ATOL.get(dtype, 1e-3)


def relative_tolerance(dtype: torch.dtype) -> float:
    """The relative bound, norm(diff) / norm(reference), of a manual gradient in `dtype`."""
    return RTOL.get(dtype, 1e-2)


def _saved_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def _restore_buffers(model, saved):
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(saved[n])


class SameDraws:
    """The random generators' state (torch's CPU one, and the GPU's where the model is there), taken
    once; `restore()` puts it back before each forward of a check, so that every forward draws the same
    numbers: a Dropout layer the same mask in autograd's forward, the manual one and each finite
    difference's. The check is then of the backward training runs, mask included, at one draw."""

    def __init__(self, model):
        self.cpu = torch.get_rng_state()
        params = model.parameters()
        self.device = params[0].device if params and params[0].device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def float64_copy(obj):
    """A deep copy of a layer or model in float64 (one deep copy: a tensor two layers share stays shared)."""
    return copy.deepcopy(obj).to(dtype=torch.float64)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


REPLACED = "the backward replaced the gradient buffer instead of accumulating into it"
NOT_ACCUMULATED = ("the backward must accumulate into the gradient buffer (add_), not assign it (copy_ or =): "
                   "two backward calls without zeroing did not give twice the gradient")


def autograd_reference(model, x, y) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """One forward with autograd on: gradients of every named intermediate and every parameter.

    The forward is the model's own (the same layers, the same ops); only the
    backward is autograd's. It runs with autograd recording, which is not how
    training runs it: the manual backward is checked on a forward of its own.
    """
    params = model.parameters()
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            loss = model.forward(x, y)
            inter = model.named_intermediates()
            for t in inter.values():
                if t.requires_grad:
                    t.retain_grad()
            loss.backward()
        inter_grads = {
            n: (t.grad if t.grad is not None else torch.zeros_like(t)).detach().clone()
            for n, t in inter.items()
            if t.requires_grad
        }
        param_grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    return inter_grads, param_grads, loss.detach()


def check_model(model, x, y, grads: list[torch.Tensor] | None = None, atol: float | None = None,
                rtol: float | None = None) -> list[TensorCheck]:
    """Compare the manual backward with autograd on one batch, tensor by tensor.

    `grads` are the buffers the optimizer will read, in the order of
    `model.parameters()`; by default the model's own. The manual forward and
    backward run with autograd off, as in training; autograd's reference runs
    its own forward from the same running statistics. BatchNorm running
    statistics are restored, and the gradient buffers left holding this batch's
    manual gradients.
    """
    grads = model.grads() if grads is None else grads
    dtype = model.parameters()[0].dtype
    atol = tolerance(dtype) if atol is None else atol
    rtol = relative_tolerance(dtype) if rtol is None else rtol
    saved, draws = _saved_buffers(model), SameDraws(model)
    try:
        inter_ref, param_ref, _ = autograd_reference(model, x, y)
        _restore_buffers(model, saved)
        draws.restore()
        own_before = model.grads()
        with torch.no_grad():
            model.zero_grad()
            for g in grads:
                g.zero_()
            model.forward(x, y)
            model.backward()
        manual_inter = model.named_intermediate_grads()
        own_after = model.grads()
    finally:
        _restore_buffers(model, saved)
    results = [compare(n, "intermediate", manual_inter.get(n), ref, atol, rtol) for n, ref in inter_ref.items()]
    for (name, _), g, ref, before, after in zip(model.named_parameters(), grads, param_ref, own_before, own_after):
        result = compare(name, "parameter", g, ref, atol, rtol)
        if after is not before:
            result = with_note(result, REPLACED, close=False)
        elif not result.close and not _same_memory(g, after):
            result = with_note(result, "the optimizer reads another tensor than the backward fills")
        results.append(result)
    return results


def finite_difference_check(
    model, x, y, samples_per_param: int = 8, eps: float = FD_EPS, seed: int = 0, atol: float = FD_ATOL,
    rtol: float = FD_RTOL,
) -> list[TensorCheck]:
    """Manual parameter gradients against central differences of the loss,
    on sampled coordinates, in float64, with no autograd at all.

    Runs on a float64 copy, so the model given is left as it was. Each row has
    the parameter's shape; its note says how many entries were sampled.
    """
    model.clear_saved()  # saved tensors of an autograd forward cannot be deep-copied
    m = float64_copy(model)
    gen = torch.Generator().manual_seed(seed)
    draws = SameDraws(m)

    def loss() -> float:
        draws.restore()
        return m.forward(x, y).item()

    with torch.no_grad():
        m.zero_grad()
        draws.restore()
        m.forward(x, y)
        m.backward()
        results = []
        for (name, p), g in zip(m.named_parameters(), m.grads()):
            flat_p, flat_g = p.view(-1), g.view(-1)
            k = min(samples_per_param, flat_p.numel())
            idx = torch.randperm(flat_p.numel(), generator=gen)[:k]
            numeric = torch.empty(k, dtype=torch.float64, device=flat_p.device)
            for j, i in enumerate(idx.tolist()):
                numeric[j] = central_difference(loss, flat_p, i, eps)
            sampled = compare(name, "finite-difference", flat_g[idx], numeric, atol, rtol)
            results.append(with_note(replace(sampled, shape=tuple(p.shape)), f"{k} of {flat_p.numel()} entries"))
    return results


def _floating_dtype(layer: Module, x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: its input's, or for ids its first floating parameter's."""
    if x.is_floating_point():
        return x.dtype
    return next((p.dtype for _, p in layer.named_parameters() if p.is_floating_point()), torch.float64)


def check_layer(layer: Module, x: torch.Tensor, dout: torch.Tensor | None = None, atol: float | None = None,
                rtol: float | None = None, fd_eps: float = FD_EPS, fd_atol: float = FD_ATOL,
                fd_rtol: float = FD_RTOL) -> list[TensorCheck]:
    """One layer against autograd and central differences, for the scalar sum(out * dout).

    `x` is floating (or integer ids for Embedding), in the layer's dtype. The
    manual forward and backward run with autograd off, as in training, and are
    compared with autograd within the bounds of that dtype (`atol`, `rtol`).
    The check holds the backward to the contracts the optimizer relies on:
    the gradient buffers in `layer.grads` before the backward are the ones
    holding the gradient after it, and it accumulates into them (a second
    backward without zeroing doubles them); dx has the input's shape. The
    central differences run on a float64 copy of the layer, input and dout,
    on every coordinate, against that copy's manual gradients.
    """
    floating = x.is_floating_point()
    x = x.detach().clone()
    dtype = _floating_dtype(layer, x)
    atol = tolerance(dtype) if atol is None else atol
    rtol = relative_tolerance(dtype) if rtol is None else rtol
    buffers = {n: b.clone() for n, b in layer.named_buffers()}

    def restore():
        with torch.no_grad():
            for n, b in layer.named_buffers():
                b.copy_(buffers[n])

    with torch.no_grad():
        probe = layer.forward(x)
    restore()
    if dout is None:
        dout = torch.randn(probe.shape, dtype=probe.dtype, generator=torch.Generator().manual_seed(1)).to(probe.device)

    # autograd, on a forward of its own
    params = dict(layer.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    xr = x.clone().requires_grad_(floating)
    try:
        with torch.enable_grad():
            (layer.forward(xr) * dout).sum().backward()
        ref_dx = (torch.zeros_like(x) if xr.grad is None else xr.grad.clone()) if floating else None
        # a parameter the output does not depend on (a Linear's bias under BatchNorm, folded into the
        # mean it subtracts) gets no gradient from autograd: its gradient is zero
        ref_params = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in params.items()}
    finally:
        for p in params.values():
            p.grad = None
            p.requires_grad_(False)
    restore()

    # manual, as training runs it; then the same forward and backward again, without zeroing
    buffers_before = dict(layer.named_grads())
    with torch.no_grad():
        layer.zero_grad()
        layer.forward(x)
        dx = layer.backward(dout.clone())  # a clone: a backward may reuse its dout's memory
        buffers_after = dict(layer.named_grads())
        once = {n: g.clone() for n, g in buffers_before.items()}
        restore()
        layer.forward(x)
        layer.backward(dout.clone())
        twice = {n: g.clone() for n, g in buffers_before.items()}
        for n, g in buffers_before.items():  # the buffers left holding one backward's gradient
            g.copy_(once[n])
    restore()
    results = []
    if floating:
        result = compare("input", "intermediate", dx, ref_dx, atol, rtol)
        if dx is not None and dx.shape != x.shape:
            result = replace(result, note=f"the backward returned dx of shape {shape_text(dx.shape)}; "
                                          f"the input's is {shape_text(x.shape)}")
        elif dx is None:
            result = replace(result, note="the backward returned no gradient for its input")
        results.append(result)
    for n, p in params.items():
        if n not in buffers_before:
            results.append(TensorCheck(n, "parameter", tuple(p.shape), False, False, math.inf, math.inf,
                                       "no gradient buffer in grads for this parameter (add_param makes one)"))
            continue
        result = compare(n, "parameter", once[n], ref_params[n], atol, rtol)
        if buffers_after.get(n) is not buffers_before[n]:
            result = with_note(result, REPLACED, close=False)
        elif not torch.allclose(twice[n], 2 * once[n], rtol=rtol, atol=atol, equal_nan=True):
            result = with_note(result, NOT_ACCUMULATED, close=False)
        results.append(result)

    # central finite differences on every coordinate (layers in tests are small), in float64
    layer.clear_saved()  # saved tensors of an autograd forward cannot be deep-copied
    layer64 = float64_copy(layer)
    x64 = x.to(torch.float64).contiguous() if floating else x
    dout64 = dout.to(torch.float64)
    with torch.no_grad():
        layer64.zero_grad()
        layer64.forward(x64)
        dx64 = layer64.backward(dout64.clone())
        grads64 = dict(layer64.named_grads())

        def objective():
            return float((layer64.forward(x64) * dout64).sum())

        targets = [("input", x64, dx64)] if floating else []
        targets += [(n, p, grads64.get(n)) for n, p in layer64.named_parameters()]
        for name, t, g in targets:
            flat = t.view(-1)
            numeric = torch.empty_like(flat)
            for i in range(flat.numel()):
                numeric[i] = central_difference(objective, flat, i, fd_eps)
            result = compare(name, "finite-difference", g, numeric.view(t.shape), fd_atol, fd_rtol)
            results.append(with_note(result, f"{flat.numel()} of {flat.numel()} entries"))
    return results


def passed(results: list[TensorCheck]) -> bool:
    return all(r.close for r in results)


def format_table(results: list[TensorCheck]) -> str:
    """One line per tensor; a note column where any row has a note."""
    notes = any(r.note for r in results)
    header = (f"{'tensor':<28} {'kind':<17} {'shape':<14} {'exact':<6} {'close':<6} {'max abs diff':>12} {'rel diff':>9}"
              + ("  note" if notes else ""))
    lines = [header, "-" * len(header)]
    for r in results:
        line = (f"{r.name:<28} {r.kind:<17} {shape_text(r.shape):<14} {str(r.exact):<6} {str(r.close):<6} "
                f"{r.max_abs_diff:>12.3e} {r.rel_diff:>9.1e}")
        lines.append(line + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)
