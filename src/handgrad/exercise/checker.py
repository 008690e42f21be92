"""`handgrad exercise check`: the learner's gradient cells run one by one on a fixed float64 batch, each on
the right values of the gradients before it, each judged against autograd (the parameters also against
central finite differences), one row per gradient in backward order."""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import runtime
from .diagnosis import UNASSIGNED, Context, Judgement, judge, shape_of
from .levels import VERSIONS, Version
from .notebook import SLOT, Cell, read_cells, version_of
from .sandbox import LearnerError, TimeLimit, compile_cell, fresh_namespace, run_code, time_limit

FD_EPS = 1e-5
# central differences in float64 of a loss near 3: truncation ~h^2 = 1e-10, round-off ~1e-16 * 3 / h = 3e-11
FD_ATOL = 1e-8
FD_COORDS = 6  # per parameter: the 3 largest entries of autograd's gradient and 3 drawn at random


@dataclass
class Reference:
    """The exercise's forward on the check's batch, and every gradient autograd gives it."""

    version: Version
    values: dict  # the forward's names, tensors detached: what the learner's cells see
    expected: dict  # gradient name -> autograd's value
    gradient_of: dict  # gradient name -> the tensor it is the gradient of
    branches: dict  # gradient name -> {tensor it feeds: its part of the gradient}
    params: dict  # parameter name -> its value
    batch: tuple


def run_forward(version: Version, x, y, params: dict) -> dict:
    ns = {"torch": torch, "F": F, "math": math, "x": x, "y": y, **params}
    exec(version.forward, ns)
    return ns


def reference(version: Version, x=None, y=None, params: dict | None = None) -> Reference:
    if x is None:
        x, y, values = runtime.check_batch(version.params)
        params = dict(zip(version.params, values))
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    ns = run_forward(version, x, y, leaves)
    gradient_of = {g.name: g.of for g in version.gradients}
    gradient_of.update(version.given)
    tensors = list(dict.fromkeys([*gradient_of.values(), *(f for g in version.gradients for f in g.feeds if f != "loss")]))
    grads = dict(zip(tensors, torch.autograd.grad(ns["loss"], [ns[t] for t in tensors], retain_graph=True)))
    expected = {name: grads[of] for name, of in gradient_of.items()}
    values = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in ns.items()
              if not k.startswith("__") and k not in ("torch", "F", "math")}
    branches = {g.name: {f: local_part(version, values, g.of, f, grads.get(f)) for f in g.feeds}
                for g in version.gradients if len(g.feeds) > 1}
    return Reference(version, values, expected, gradient_of, branches,
                     {k: v.detach() for k, v in leaves.items()}, (x, y))


def local_part(version: Version, values: dict, tensor: str, consumer: str, upstream) -> torch.Tensor:
    """The part of d loss / d `tensor` that flows back through `consumer` alone: the forward line that makes
    `consumer` rerun with `tensor` the only input that carries a gradient (its other paths cut)."""
    line = next(line for line in version.forward.splitlines() if line.startswith(f"{consumer} = "))
    leaf = values[tensor].clone().requires_grad_()
    ns = {"torch": torch, "F": F, "math": math, **values, tensor: leaf}
    exec(line, ns)
    return torch.autograd.grad(ns[consumer], leaf, grad_outputs=upstream)[0]


def given_gradient(key: str, name: str) -> torch.Tensor:
    """A gradient the level hands the learner (level 3's dhpreact), as the checker computes it."""
    return reference(VERSIONS[key]).expected[name].clone()


def loss_at(version: Version, x, y, params: dict) -> float:
    with torch.no_grad():
        return float(run_forward(version, x, y, params)["loss"])


def finite_differences(version: Version, x, y, params: dict, name: str, coords) -> torch.Tensor:
    out = []
    for flat in coords:
        values = []
        for sign in (1, -1):
            moved = {k: v.clone() for k, v in params.items()}
            moved[name].view(-1)[flat] += sign * FD_EPS
            values.append(loss_at(version, x, y, moved))
        out.append((values[0] - values[1]) / (2 * FD_EPS))
    return torch.tensor(out, dtype=torch.float64)


def sample_coords(expected: torch.Tensor, seed: int) -> list[int]:
    flat = expected.reshape(-1)
    top = flat.abs().argsort(descending=True)[:FD_COORDS // 2].tolist()
    gen = torch.Generator().manual_seed(seed)
    drawn = torch.randint(0, flat.numel(), (FD_COORDS - len(top),), generator=gen).tolist()
    return list(dict.fromkeys(top + drawn))


def add_finite_differences(row: Judgement, value, version: Version, ref: Reference, param: str, index: int) -> None:
    """The row of a parameter's gradient, also held to central differences of the loss at a few entries."""
    if row.shape != row.expected_shape or not isinstance(value, torch.Tensor):
        return
    x, y = ref.batch
    coords = sample_coords(ref.expected[row.name], seed=index)
    fd = finite_differences(version, x, y, ref.params, param, coords)
    learner = value.detach().to(torch.float64).reshape(-1)[coords]
    diff = float((learner - fd).abs().max())
    row.extra["fd_max_abs_diff"] = diff
    if row.ok and not diff <= FD_ATOL:
        row.verdict = "WRONG"
        row.hint = f"agrees with autograd but not with finite differences (max abs diff {diff:.2g} at {len(coords)} entries)"


@dataclass
class Segment:
    """The code between one gradient cell's first line and the next one's: what computes `gradient`."""

    gradient: str | None  # None: the learner's own code between gradient cells
    cell: Cell
    source: str
    first_line: int


def segments(cells: list[Cell], version: Version) -> tuple[list[Segment], list[tuple[Cell, str]]]:
    """The gradient segments in file order, and the import statements of the cells before the first of them."""
    known = {g.name for g in version.gradients}
    found, preamble, started = [], [], False
    for cell in cells:
        if cell.kind != "code":
            continue
        lines = cell.source.splitlines()
        marks = [i for i, line in enumerate(lines) if SLOT.match(line) and SLOT.match(line).group(2) in known]
        if not marks:
            if started:
                found.append(Segment(None, cell, cell.source, 1))
            else:
                preamble.append((cell, imports_of(cell.source)))
            continue
        started = True
        if marks[0] > 0 and "\n".join(lines[:marks[0]]).strip():
            found.append(Segment(None, cell, "\n".join(lines[:marks[0]]) + "\n", 1))
        for start, end in zip(marks, marks[1:] + [len(lines)]):
            found.append(Segment(SLOT.match(lines[start]).group(2), cell, "\n".join(lines[start:end]) + "\n", start + 1))
    return found, preamble


def imports_of(source: str) -> str:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    return "\n".join(ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))


@dataclass
class Report:
    version: Version
    path: Path
    rows: list[Judgement]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def first_wrong(self) -> str | None:
        return next((r.name for r in self.rows if not r.ok), None)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "first_wrong": self.first_wrong, "level": self.version.key,
                "gradients": [r.to_dict() for r in self.rows], "notes": self.notes}


def check_file(path: Path, time_limit_s: float | None = 60.0) -> Report:
    path = Path(path)
    cells = read_cells(path)
    version = version_of(path, cells)
    if version.level == 4:
        from .training import check_training

        return check_training(path, cells, version, time_limit_s)
    return check_cells(path, cells, version, time_limit_s)


def check_cells(path: Path, cells: list[Cell], version: Version, time_limit_s: float | None) -> Report:
    ref = reference(version)
    order = [g.name for g in version.gradients]
    found, preamble = segments(cells, version)
    ns = fresh_namespace({"torch": torch, "F": F, "math": math})
    notes, values, errors = [], {}, {}
    with time_limit(time_limit_s):
        try:
            for cell, imports in preamble:
                if imports:
                    try:
                        run_code(compile(imports, "<imports>", "exec"), cell, ns)
                    except LearnerError as e:
                        notes.append(f"an import failed: {e.message}")
            for seg in found:
                restore(ns, ref, order, seg.gradient)
                try:
                    run_code(compile_cell(seg.cell, seg.source, seg.first_line), seg.cell, ns)
                except LearnerError as e:
                    if seg.gradient is None:
                        notes.append(f"your code between the gradient cells raised: {e.message}")
                    else:
                        errors[seg.gradient] = e.message
                        continue
                if seg.gradient is not None:
                    values[seg.gradient] = captured(ns.get(seg.gradient, UNASSIGNED))
        except TimeLimit as stop:
            notes.append(f"{stop}: the gradients not yet run are reported missing")
    rows = []
    for index, g in enumerate(version.gradients):
        if g.name in errors:
            rows.append(Judgement(g.name, None, tuple(ref.expected[g.name].shape), "error", None,
                                  f"your code raised, {errors[g.name]}"))
            continue
        if g.name not in values and not any(seg.gradient == g.name for seg in found):
            rows.append(Judgement(g.name, None, tuple(ref.expected[g.name].shape), "missing", None,
                                  f"no cell for it: keep the line `# d loss / d {g.of} -> {g.name}, ...` "
                                  "at the top of the cell that computes it"))
            continue
        value = values.get(g.name, UNASSIGNED)
        row = judge(g.name, value, ref.expected[g.name], context(ref, g))
        if g.of in version.params:
            add_finite_differences(row, value, version, ref, g.of, index)
        rows.append(row)
    return Report(version, path, rows, notes)


def captured(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def restore(ns: dict, ref: Reference, order: list[str], gradient: str | None) -> None:
    """Before a gradient's cell: the forward's tensors as they were, and every gradient before it (and the
    level's given ones) at its right value, so that a mistake upstream does not cascade into this one."""
    for name, value in ref.values.items():
        ns[name] = value.clone() if isinstance(value, torch.Tensor) else value
    for name in ref.version.given:
        ns[name] = ref.expected[name].clone()
    if gradient is None:
        return
    for name in order[:order.index(gradient)]:
        ns[name] = ref.expected[name].clone()


def context(ref: Reference, g) -> Context:
    table = ref.values.get(g.table_index) if g.table_index else None
    return Context(of=g.of, batch_size=int(ref.batch[0].shape[0]), expected=ref.expected, gradient_of=ref.gradient_of,
                   forward={k: v for k, v in ref.values.items() if isinstance(v, torch.Tensor)},
                   branches=ref.branches.get(g.name, {}), table_ids=table)


MARK = ">>"


def format_report(report: Report) -> str:
    v = report.version
    rows = report.rows
    lines = [f"exercise {v.key} ({v.title}): {report.path}"]
    if v.level == 4:
        lines.append("each parameter's step through your backward and update, at step 0, against autograd's gradient")
    else:
        lines.append("batch 32 of the built-in names, float64; each gradient judged on the right values of the ones before it")
    lines.append("")
    table = [("", "gradient", "shape", "verdict", "max abs diff", "hint")]
    first = report.first_wrong
    for r in rows:
        diff = "" if r.max_abs_diff is None else ("0" if r.max_abs_diff == 0 else f"{r.max_abs_diff:.1e}")
        shape = shape_of(r.expected_shape)
        table.append((MARK if r.name == first else "", r.name, shape, r.verdict, diff, r.hint))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        lines.append(("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5]).rstrip())
    lines.append("")
    lines += [f"note: {n}" for n in report.notes]
    bad = sum(not r.ok for r in rows)
    if report.passed:
        lines.append(f"PASS: all {len(rows)} gradients right" if len(rows) > 1 else f"PASS: {rows[0].name} is right")
    else:
        lines.append(f"FAIL: {bad} of {len(rows)} gradients not right; the first is {first} (marked {MARK})")
    return "\n".join(lines)

