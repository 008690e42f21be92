"""Exercise files: the cells of a level, written as a Python file (`# %%` cells) and as a notebook with
the same content, and read back from either into cells that know where they came from."""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import atomic_write_bytes
from ..errors import HandgradError
from .levels import CHECK_HOW, VERSIONS, Version

CELL_MARK = re.compile(r"^# %%(.*)$")
HEADER = re.compile(r"^# handgrad exercise (\S+):", re.MULTILINE)
# a gradient cell opens with `# d loss / d logprobs -> dlogprobs, ...`
SLOT = re.compile(r"^#\s*d loss / d (\w+)\s*->\s*(\w+)")
FORMATS = (".py", ".ipynb")


@dataclass
class Cell:
    kind: str  # "code" or "markdown"
    source: str
    cell_number: int | None = None  # a notebook's cells, counted from 1
    first_line: int = 1  # a Python file's line of the cell's first source line

    def where(self, line: int) -> str:
        """`line 42` of a Python file, `cell 7, line 2` of a notebook, for line `line` of this cell's source."""
        if self.cell_number is None:
            return f"line {self.first_line + line - 1}"
        return f"cell {self.cell_number}, line {line}"


def shape_text(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def slot_line(version: Version, gradient, shapes: dict) -> str:
    return f"# d loss / d {gradient.of} -> {gradient.name}, shape {shape_text(shapes[gradient.name])}"


def template_cells(version: Version, solved: bool) -> list[Cell]:
    from .checker import reference  # the shapes come from the exercise's own forward

    shapes = {name: tuple(t.shape) for name, t in reference(version).expected.items()}
    if version.level == 4:
        return training_cells(version, solved, shapes)
    params = ", ".join(version.params)
    intro = (f"# Exercise {version.key}: {version.title}\n\n{version.about}\n\n{CHECK_HOW}\n\n"
             "Every tensor is float64. Shapes are compared strictly: a gradient has its tensor's shape, "
             "nothing that merely broadcasts to it.")
    setup = (f"# handgrad exercise {version.key}: {version.title}\n"
             "import torch\nimport torch.nn.functional as F\nfrom handgrad.exercise import runtime\n\n"
             f"x, y, ({params},) = runtime.check_batch({version.params!r})\n")
    forward = "# forward (given: the checker runs this same forward on the same batch)\n" + version.forward
    for name, of in version.given.items():
        forward += f"\n# given: d loss / d {of}, the right one\n{name} = runtime.given_gradient({version.key!r}, {name!r})\n"
    cells = [Cell("markdown", intro), Cell("code", setup), Cell("code", forward),
             Cell("markdown", "## Backward\n\nOne cell per gradient, in backward order: replace each `None` "
                              "with the gradient's value. Keep each cell's first line: it tells the checker "
                              "which gradient the cell computes.")]
    for g in version.gradients:
        body = g.answer if solved else f"{g.name} = None"
        cells.append(Cell("code", slot_line(version, g, shapes) + "\n" + body + "\n"))
    cells.append(Cell("markdown", "## Check\n\n`handgrad exercise check` with this file's path prints one row per "
                                  "gradient and marks the first wrong one; `--json` gives the same as JSON."))
    return cells


def training_cells(version: Version, solved: bool, shapes: dict) -> list[Cell]:
    params = ", ".join(version.params)
    grads = ", ".join(f"{p}_grad" for p in version.params)
    intro = (f"# Exercise {version.key}: {version.title}\n\n{version.about}\n\n"
             "Run `handgrad exercise train THIS_FILE` (`--steps` caps the steps, default 2000). "
             "Everything is float64, so a right backward and update track autograd's run to ~1e-12.")
    setup = (f"# handgrad exercise {version.key}: {version.title}\n"
             "import torch\nfrom handgrad.exercise import runtime\n\n"
             "n_steps = 2000  # handgrad exercise train stops at --steps (default 2000) if that comes first\n\n\n"
             "def learning_rate(step):\n"
             "    \"\"\"The seed notebook's schedule: 1.0, then 0.1 from the halfway step.\"\"\"\n"
             "    return 1.0 if step < n_steps // 2 else 0.1\n\n\n"
             "params = runtime.initial_params()  # the seed notebook's initialisation, float64\n"
             f"{params} = params\n"
             "# one buffer per parameter: backward() fills them, update() reads them\n"
             f"{grads} = param_grads = [torch.zeros_like(p) for p in params]\n")
    intermediates = [g for g in version.gradients if g.of not in version.params]
    buffers = [g for g in version.gradients if g.of in version.params]
    doc = ("    # d loss / d every intermediate, from the forward's globals, in backward order (your own names):\n"
           + "".join(f"    #   {g.name} {shape_text(shapes[g.name])}\n" for g in intermediates)
           + "    # then d loss / d each parameter, written into its buffer (the update reads the buffers):\n"
           + "".join(f"    #   {g.name} {shape_text(shapes[g.name])}\n" for g in buffers))
    if solved:
        lines = [line for g in intermediates for line in g.answer.splitlines()]
        for g in buffers:
            lines += into_buffer(g)
        body = textwrap.indent("\n".join(lines), "    ") + "\n"
        update_body = "    for p, g in zip(params, param_grads):\n        p -= lr * g\n"
    else:
        body = "    pass\n"
        update_body = "    pass\n"
    backward = "def backward():\n" + doc + body
    update = ("def update(lr):\n"
              "    # SGD: every parameter p <- p - lr * (d loss / d p), in place; params and param_grads pair them\n"
              + update_body)
    loop = ("for step in range(n_steps):\n"
            "    x, y = runtime.get_batch(step)\n"
            "    # forward (the seed notebook's)\n"
            + textwrap.indent(version.forward, "    ")
            + "    backward()\n"
            "    update(learning_rate(step))\n"
            "    if step % 500 == 0:\n"
            "        print(f\"step {step}: loss {loss.item():.4f}\")\n")
    return [Cell("markdown", intro), Cell("code", setup), Cell("code", backward), Cell("code", update),
            Cell("code", loop)]


def into_buffer(g) -> list[str]:
    """A parameter's answer rewritten to fill its buffer in place: `dw = expr` -> `dw.copy_(expr)`,
    `dw = torch.zeros_like(w)` -> `dw.zero_()`."""
    out = []
    for line in g.answer.splitlines():
        target, eq, expr = line.partition(" = ")
        if eq and target == g.name:
            out.append(f"{g.name}.zero_()" if expr.startswith("torch.zeros_like(") else f"{g.name}.copy_({expr})")
        else:
            out.append(line)
    return out


def to_python(cells: list[Cell]) -> str:
    parts = []
    for cell in cells:
        if cell.kind == "markdown":
            parts.append("# %% [markdown]\n" + "".join(f"# {line}".rstrip() + "\n" for line in cell.source.splitlines()))
        else:
            parts.append("# %%\n" + cell.source.rstrip("\n") + "\n")
    return "\n".join(parts)


def to_notebook(cells: list[Cell]) -> str:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(c.source) if c.kind == "markdown"
                else nbformat.v4.new_code_cell(c.source.rstrip("\n")) for c in cells]
    return nbformat.writes(nb)


def write_exercises(folder: Path, keys, solved: bool, force: bool = False) -> list[Path]:
    """Each version of `keys` as DIR/<stem>.py and DIR/<stem>.ipynb; a file already there is refused
    (it may hold a learner's work) unless `force`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HandgradError(f"{folder} is a file, not a folder")
    targets = [(VERSIONS[k], folder / f"{VERSIONS[k].file_stem}{ext}") for k in keys for ext in FORMATS]
    there = [str(p) for _, p in targets if p.exists()]
    if there and not force:
        raise HandgradError(f"{there[0]} already exists (your work?); choose another folder, or --force to overwrite"
                            + (f" it and {len(there) - 1} more" if len(there) > 1 else ""))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HandgradError(f"cannot create {folder}: {e.strerror}") from None
    written = []
    for key in keys:
        cells = template_cells(VERSIONS[key], solved)
        for ext, text in ((".py", to_python(cells)), (".ipynb", to_notebook(cells))):
            path = folder / f"{VERSIONS[key].file_stem}{ext}"
            atomic_write_bytes(path, text.encode("utf-8"))
            written.append(path)
    return written


def read_cells(path: Path) -> list[Cell]:
    path = Path(path)
    if path.suffix not in FORMATS:
        raise HandgradError(f"{path}: expected a .py or .ipynb exercise file")
    if not path.is_file():
        raise HandgradError(f"exercise file not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HandgradError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise HandgradError(f"cannot read {path}: {e.strerror}") from None
    return notebook_cells(path, text) if path.suffix == ".ipynb" else python_cells(text)


def python_cells(text: str) -> list[Cell]:
    cells, kind, lines, first = [], "code", [], 1

    def close():
        if kind == "markdown":
            body = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
        else:
            body = lines
        if any(line.strip() for line in body):
            cells.append(Cell(kind, "\n".join(body) + "\n", first_line=first))

    for number, line in enumerate(text.splitlines(), start=1):
        mark = CELL_MARK.match(line)
        if mark:
            close()
            kind = "markdown" if "[markdown]" in mark.group(1) else "code"
            lines, first = [], number + 1
        else:
            lines.append(line)
    close()
    return cells


def notebook_cells(path: Path, text: str) -> list[Cell]:
    import nbformat

    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as e:  # the reader's errors have no common type: JSON, schema, version
        raise HandgradError(f"{path} is not a readable notebook: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    cells = []
    for number, cell in enumerate(nb.cells, start=1):
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        if cell.get("cell_type") in ("code", "markdown"):
            cells.append(Cell(cell["cell_type"], source, cell_number=number))
    return cells


def version_of(path: Path, cells: list[Cell]) -> Version:
    for cell in cells:
        if cell.kind == "code":
            found = HEADER.search(cell.source)
            if found and found.group(1) in VERSIONS:
                return VERSIONS[found.group(1)]
    raise HandgradError(f"{path} is not a handgrad exercise (no '# handgrad exercise LEVEL:' line in a code cell); "
                        "write one with `handgrad exercise new DIR`")
