"""One gradient judged: a verdict (exact / close / WRONG / missing / wrong shape / error) and a hint that says
what kind of mistake it is: a constant factor, a transpose, another tensor's gradient, a missing branch, a
lost keepdim or a missing sum over a broadcast axis, an embedding table assigned rather than accumulated,
NaN or inf, all zeros."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import torch

# A float64 gradient is right when max |learner - autograd| <= ATOL + RTOL * max |autograd|: the learner's
# expression and autograd's differ in the order of their float64 operations (measured on the solved files:
# at most 3.5e-18 apart, 2.1e-16 for level 4's step over the learning rate), while the mistakes this
# checker names are off by 1e-3 relative and more.
ATOL = 1e-10
RTOL = 1e-7
# a float32 tensor (torch.zeros(...) without a dtype) holds the right values to float32 precision at best
FLOAT32_RTOL = 1e-5

OK_VERDICTS = ("exact", "close")


class Unassigned:
    """The value of a gradient the learner's code never assigned."""


UNASSIGNED = Unassigned()


@dataclass
class Judgement:
    name: str
    shape: tuple | None
    expected_shape: tuple
    verdict: str
    max_abs_diff: float | None
    hint: str = ""
    extra: dict = field(default_factory=dict)  # fd_max_abs_diff, for the parameters

    @property
    def ok(self) -> bool:
        return self.verdict in OK_VERDICTS

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["shape"] = list(self.shape) if self.shape is not None else None
        d["expected_shape"] = list(self.expected_shape)
        d.update(self.extra)
        return d


@dataclass
class Context:
    """What the judge of one gradient may compare it with."""

    of: str  # the tensor this is the gradient of
    batch_size: int
    expected: dict  # every gradient of the level, right, by gradient name
    gradient_of: dict  # gradient name -> the tensor it is the gradient of
    forward: dict = field(default_factory=dict)  # the forward's tensors by name
    branches: dict = field(default_factory=dict)  # this gradient's part through each tensor `of` feeds
    table_ids: torch.Tensor | None = None  # the ids that index this embedding table


def tolerance(expected: torch.Tensor) -> float:
    return ATOL + RTOL * (float(expected.abs().max()) if expected.numel() else 0.0)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def matches(value: torch.Tensor, expected: torch.Tensor) -> bool:
    return value.shape == expected.shape and max_abs(value, expected) <= tolerance(expected)


def shape_of(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def as_tensor(value):
    """The learner's value as a float64 tensor, with its original dtype; or (None, reason) for what is no number."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            return None, None, f"a {value.dtype} tensor, not a real-valued one"
        return value.detach().to(torch.float64), value.dtype, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64), None, None
    try:
        return torch.as_tensor(value, dtype=torch.float64), None, None
    except (TypeError, ValueError, RuntimeError):
        return None, None, f"not a tensor: got {type(value).__name__}"


def judge(name: str, value, expected: torch.Tensor, ctx: Context) -> Judgement:
    want = tuple(expected.shape)
    if value is UNASSIGNED:
        return Judgement(name, None, want, "missing", None, f"never assigned: no {name} after its cell ran")
    if value is None or value is Ellipsis:
        return Judgement(name, None, want, "missing", None, f"still {value!r}: not filled in yet")
    tensor, dtype, problem = as_tensor(value)
    if tensor is None:
        return Judgement(name, None, want, "WRONG", None, problem)
    got = tuple(tensor.shape)
    if got != want:
        return Judgement(name, got, want, "wrong shape", None, shape_hint(tensor, expected, ctx))
    if not bool(torch.isfinite(tensor).all()):
        return Judgement(name, got, want, "WRONG", None, non_finite_hint(tensor))
    diff = max_abs(tensor, expected)
    if torch.equal(tensor, expected):
        return Judgement(name, got, want, "exact", 0.0)
    if diff <= tolerance(expected):
        return Judgement(name, got, want, "close", diff)
    if dtype == torch.float32 and diff <= FLOAT32_RTOL * float(expected.abs().max()):
        return Judgement(name, got, want, "close", diff,
                         "float32: right to float32 precision; torch.zeros_like(...) keeps the check's float64")
    return Judgement(name, got, want, "missing" if not bool(tensor.any()) else "WRONG", diff,
                     value_hint(name, tensor, expected, ctx))


def value_hint(name: str, value: torch.Tensor, expected: torch.Tensor, ctx: Context) -> str:
    """Why a gradient of the right shape is wrong, the most specific reason first."""
    if not bool(value.any()):
        return ("all zeros: never written (created, but never filled in; a name assigned inside a function is a "
                "new local, and the tensor outside stays as it was)")
    factor = constant_factor(value, expected)
    if factor is not None:
        return f"off by a factor of {factor_name(factor, ctx.batch_size)}"
    if value.dim() == 2 and value.shape[0] == value.shape[1] and matches(value.T, expected):
        return "transposed: its .T is right (in a matmul's gradient the operands swap and each is transposed)"
    for other, right in ctx.expected.items():
        if other != name and right.shape == value.shape and matches(value, right):
            return (f"equals {other}, the gradient of {ctx.gradient_of[other]}: the wrong variable "
                    f"(this is d loss / d {ctx.of})")
    for tensor_name, t in ctx.forward.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == value.shape and matches(value, t.detach()):
            return f"equals {tensor_name} itself, a forward value, not a gradient"
    if len(ctx.branches) > 1:
        hint = missing_branch_hint(value, ctx)
        if hint:
            return hint
    if ctx.table_ids is not None:
        hint = table_hint(value, expected, ctx)
        if hint:
            return hint
    worst = divmod_index(int((value - expected).abs().argmax()), value.shape)
    rel = max_abs(value, expected) / max(float(expected.abs().max()), 1e-300)
    return f"differs from autograd's by up to {max_abs(value, expected):.3g} ({rel:.2g} relative), most at {worst}"


def constant_factor(value: torch.Tensor, expected: torch.Tensor) -> float | None:
    """c when value = c * expected (c != 1) to the tolerance, else None."""
    norm = float((expected * expected).sum())
    if norm == 0.0:
        return None
    c = float((value * expected).sum()) / norm
    if abs(c - 1) < 1e-9:
        return None
    if max_abs(value, c * expected) <= tolerance(expected) * max(1.0, abs(c)):
        return c
    return None


def factor_name(c: float, n: int) -> str:
    named = [
        (-1.0, "-1: the sign is flipped"),
        (2.0, "2: twice the right value, a factor 2 too many"),
        (0.5, "1/2: half the right value, a factor 2 missing (d x^2/dx = 2x)"),
        (-2.0, "-2: the sign flipped and a factor 2 too many"),
        (-0.5, "-1/2: the sign flipped and a factor 2 missing"),
        (float(n), f"N = {n}: a 1/N is missing (the loss is a mean over the batch of N = {n})"),
        (1.0 / n, f"1/N = 1/{n}: divided by N once too often (N = {n}, the batch)"),
        (-float(n), f"-N = -{n}: the sign flipped and a 1/N missing"),
        (-1.0 / n, f"-1/N: the sign flipped and divided by N once too often (N = {n})"),
        (n / (n - 1), f"N/(N-1) = {n}/{n - 1}: divided by N-1 where the forward divides by N"),
        ((n - 1) / n, f"(N-1)/N = {n - 1}/{n}: divided by N where it takes N-1"),
    ]
    for value, text in named:
        if abs(c - value) <= 1e-6 * abs(value):
            return text
    return f"{c:.4g}: {c:.4g} times the right value"


def missing_branch_hint(value: torch.Tensor, ctx: Context) -> str | None:
    names = list(ctx.branches)
    for size in range(1, len(names)):
        for kept in itertools.combinations(names, size):
            partial = sum(ctx.branches[k] for k in kept)
            if matches(value, partial):
                missing = [k for k in names if k not in kept]
                return (f"a missing branch: {ctx.of} feeds {listing(names)}, and only the gradient through "
                        f"{listing(kept)} is here; add the part that flows back through {listing(missing)}")
    return None


def listing(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def table_hint(value: torch.Tensor, expected: torch.Tensor, ctx: Context) -> str | None:
    counts = torch.bincount(ctx.table_ids.reshape(-1), minlength=expected.shape[0])[: expected.shape[0]]
    once, repeated = counts <= 1, counts > 1
    if not bool(repeated.any()):
        return None
    if matches(value[once], expected[once]) and not matches(value[repeated], expected[repeated]):
        return (f"right on the rows whose id occurs once in the batch, wrong on the {int(repeated.sum())} rows whose "
                "id repeats: `=` (and `t[ids] += ...`) keeps one write per row, so accumulate: index_add_, or += "
                "in a loop over the ids")
    return None


def divmod_index(flat: int, shape) -> tuple:
    index = []
    for size in reversed(shape):
        flat, r = divmod(flat, size)
        index.append(r)
    return tuple(reversed(index))


def non_finite_hint(value: torch.Tensor) -> str:
    nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
    parts = []
    if nan:
        parts.append(f"NaN in {nan} of {value.numel()} entries (0/0, inf - inf, or the log or sqrt of a negative number)")
    if inf:
        parts.append(f"inf in {inf} of {value.numel()} entries (a division by zero, or an overflowing exp)")
    return "holds " + "; ".join(parts)


def shape_hint(value: torch.Tensor, expected: torch.Tensor, ctx: Context) -> str:
    got, want = tuple(value.shape), tuple(expected.shape)
    head = f"{shape_of(got)} where {shape_of(want)} is expected"
    if got == () and want != ():
        return head + ": a number where a tensor is expected"
    if len(got) == len(want):
        if len(got) == 2 and got == want[::-1]:
            right = " (its .T is right)" if matches(value.T, expected) else ""
            return (head + f": transposed{right}; in a matmul's gradient the operands swap and each is "
                    "transposed (for y = a @ b: da = dy @ b.T, db = a.T @ dy)")
        axes = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        if all(want[i] == 1 for i in axes):
            summed = value.sum(dim=axes, keepdim=True)
            right = " (summed so, it is right)" if matches(summed, expected) else ""
            where = ", ".join(map(str, axes))
            return (head + f": axis {where} is {', '.join(str(got[i]) for i in axes)} where 1 is expected; the forward "
                    f"broadcast this tensor along axis {where}, so its gradient sums over it: "
                    f".sum({axes[0] if len(axes) == 1 else tuple(axes)}, keepdim=True){right}")
        i = axes[0]
        return head + f": axis {i} is {got[i]} where {want[i]} is expected"
    if len(got) < len(want):
        lost = lost_axes(got, want)
        if lost is not None:
            right = " (with it, it is right)" if matches(value.reshape(want), expected) else ""
            return (head + f": the size-1 axis {', '.join(map(str, lost))} is missing; keepdim=True on the sum "
                    f"(or mean, max) keeps it{right}")
    if len(got) > len(want) and all(w in (1, g) for g, w in zip(got[len(got) - len(want):], want)):
        extra = tuple(range(len(got) - len(want)))
        summed = value.sum(dim=extra)
        right = " (summed so, it is right)" if summed.shape == expected.shape and matches(summed, expected) else ""
        return (head + f": axis {', '.join(map(str, extra))} is extra; the forward broadcast this tensor over it, "
                f"so its gradient sums over it: .sum({extra[0] if len(extra) == 1 else extra}){right}")
    if value.numel() == expected.numel():
        right = " (viewed so, it is right)" if matches(value.reshape(want), expected) else ""
        return head + f": the same number of entries in another shape; .view{shape_of(want)}{right}"
    i = next((k for k, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
    return head + (f": axis {i} is {got[i]} where {want[i]} is expected" if i < min(len(got), len(want))
                   else f": {len(got)} axes where {len(want)} are expected")


def lost_axes(got: tuple, want: tuple) -> list[int] | None:
    """The axes of size 1 in `want` that `got` lacks, when dropping them from `want` gives `got`."""
    for k in range(1, len(want) - len(got) + 1):
        for axes in itertools.combinations(range(len(want)), k):
            if all(want[a] == 1 for a in axes) and tuple(s for i, s in enumerate(want) if i not in axes) == got:
                if len(got) + k == len(want):
                    return list(axes)
    return None
