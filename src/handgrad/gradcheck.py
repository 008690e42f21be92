"""Gradient checks: every manual gradient against autograd, and against
central finite differences in float64.

The model check compares the gradient buffers the optimizer reads (pass the
optimizer's own list as `grads`), not copies of them: a backward that wrote its
result anywhere else fails here.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch

from .layers import Module, memory_order

# Largest allowed |manual - reference| per dtype.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5}
FD_EPS = 1e-4
FD_ATOL = 1e-9  # five-point central differences in float64: truncation ~h^4, round-off ~1e-16/h


@dataclass
class TensorCheck:
    name: str
    kind: str  # "intermediate", "parameter" or "finite-difference"
    shape: tuple[int, ...]
    exact: bool
    close: bool
    max_abs_diff: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def compare(name: str, kind: str, manual: torch.Tensor | None, reference: torch.Tensor, atol: float) -> TensorCheck:
    if manual is None:  # a gradient the backward never produced
        return TensorCheck(name, kind, tuple(reference.shape), False, False, float("inf"))
    manual = manual.detach()
    reference = reference.detach().to(manual.dtype)
    if manual.shape != reference.shape:
        return TensorCheck(name, kind, tuple(reference.shape), False, False, float("inf"))
    diff = (manual - reference).abs()
    max_diff = float(diff.max()) if diff.numel() else 0.0
    if manual.numel() and not torch.isfinite(manual).all():
        max_diff = float("inf")
    return TensorCheck(name, kind, tuple(manual.shape), bool(torch.equal(manual, reference)), max_diff <= atol, max_diff)


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
    return ATOL.get(dtype, 1e-3)


def _saved_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def _restore_buffers(model, saved):
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(saved[n])


def autograd_reference(model, x, y) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """One forward with autograd on: gradients of every named intermediate and every parameter.

    The forward is the model's own (the same layers, the same ops); only the
    backward is autograd's. The model's saved intermediates stay in place, so a
    manual backward right after uses the very same forward.
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


def check_model(model, x, y, grads: list[torch.Tensor] | None = None, atol: float | None = None) -> list[TensorCheck]:
    """Compare the manual backward with autograd on one batch, tensor by tensor.

    `grads` are the buffers the optimizer will read, in the order of
    `model.parameters()`; by default the model's own. BatchNorm running
    statistics are restored, and the gradient buffers left holding this batch's
    manual gradients.
    """
    grads = model.grads() if grads is None else grads
    dtype = model.parameters()[0].dtype
    atol = tolerance(dtype) if atol is None else atol
    saved = _saved_buffers(model)
    try:
        inter_ref, param_ref, _ = autograd_reference(model, x, y)
        with torch.no_grad():
            model.zero_grad()
            for g in grads:
                g.zero_()
            model.backward()
        manual_inter = model.named_intermediate_grads()
    finally:
        _restore_buffers(model, saved)
    results = [compare(n, "intermediate", manual_inter.get(n), ref, atol) for n, ref in inter_ref.items()]
    for (name, _), g, ref in zip(model.named_parameters(), grads, param_ref):
        results.append(compare(name, "parameter", g, ref, atol))
    return results


def finite_difference_check(
    model, x, y, samples_per_param: int = 8, eps: float = FD_EPS, seed: int = 0, atol: float = FD_ATOL
) -> list[TensorCheck]:
    """Manual parameter gradients against central differences of the loss,
    on sampled coordinates, in float64, with no autograd at all.

    Runs on a float64 copy, so the model given is left as it was.
    """
    model.clear_saved()  # saved tensors of an autograd forward cannot be deep-copied
    m = copy.deepcopy(model).to(dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.zero_grad()
        m.forward(x, y)
        m.backward()
        results = []
        for (name, p), g in zip(m.named_parameters(), m.grads()):
            flat_p, flat_g = memory_order(p), memory_order(torch.empty_like(p).copy_(g))  # g's entries in p's order
            k = min(samples_per_param, flat_p.numel())
            idx = torch.randperm(flat_p.numel(), generator=gen)[:k]
            numeric = torch.empty(k, dtype=torch.float64, device=flat_p.device)
            for j, i in enumerate(idx.tolist()):
                numeric[j] = central_difference(lambda: m.forward(x, y).item(), flat_p, i, eps)
            results.append(compare(name, "finite-difference", flat_g[idx], numeric, atol))
    return results


def check_layer(layer: Module, x: torch.Tensor, dout: torch.Tensor | None = None, atol: float = 1e-10,
                fd_eps: float = FD_EPS, fd_atol: float = FD_ATOL) -> list[TensorCheck]:
    """One layer against autograd and central differences, for the scalar sum(out * dout).

    `x` is float64 (or integer ids for Embedding). Checks the input gradient and
    every parameter's accumulated gradient buffer.
    """
    floating = x.is_floating_point()
    x = x.detach().clone()
    with torch.no_grad():
        probe = layer.forward(x)
    if dout is None:
        dout = torch.randn(probe.shape, dtype=probe.dtype, generator=torch.Generator().manual_seed(1)).to(probe.device)
    buffers = {n: b.clone() for n, b in layer.named_buffers()}

    def restore():
        with torch.no_grad():
            for n, b in layer.named_buffers():
                b.copy_(buffers[n])

    # autograd
    params = dict(layer.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    xr = x.clone().requires_grad_(floating)
    try:
        with torch.enable_grad():
            (layer.forward(xr) * dout).sum().backward()
        ref_dx = xr.grad.clone() if floating else None
        # a parameter the output does not depend on (a Linear's bias under BatchNorm, folded into the
        # mean it subtracts) gets no gradient from autograd: its gradient is zero
        ref_params = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in params.items()}
    finally:
        for p in params.values():
            p.grad = None
            p.requires_grad_(False)
    restore()
    # manual
    with torch.no_grad():
        layer.zero_grad()
        layer.forward(x)
        dx = layer.backward(dout)
    restore()
    results = []
    if floating:
        results.append(compare("input", "intermediate", dx, ref_dx, atol))
    grads = dict(layer.named_grads())
    for n in params:
        results.append(compare(n, "parameter", grads[n], ref_params[n], atol))

    # central finite differences on every coordinate (layers in tests are small)
    def objective():
        return float((layer.forward(x) * dout).sum())

    targets = ([("input", x, dx)] if floating else []) + [(n, p, grads[n]) for n, p in params.items()]
    with torch.no_grad():
        for name, t, g in targets:
            flat = memory_order(t)
            numeric = torch.empty_like(flat)
            for i in range(flat.numel()):
                numeric[i] = central_difference(objective, flat, i, fd_eps)
            results.append(compare(name, "finite-difference", g, numeric.as_strided(t.shape, t.stride()), fd_atol))
    restore()
    return results


def passed(results: list[TensorCheck]) -> bool:
    return all(r.close for r in results)


def format_table(results: list[TensorCheck]) -> str:
    header = f"{'tensor':<28} {'kind':<17} {'shape':<14} {'exact':<6} {'close':<6} {'max abs diff':>12}"
    lines = [header, "-" * len(header)]
    for r in results:
        shape = "x".join(map(str, r.shape)) or "scalar"
        lines.append(
            f"{r.name:<28} {r.kind:<17} {shape:<14} {str(r.exact):<6} {str(r.close):<6} {r.max_abs_diff:>12.3e}"
        )
    return "\n".join(lines)
