"""The commands that README.md and docs/*.md show run as written from the repository root: each one
parses with the `handgrad` command's own parser, and every file it reads exists. Nothing is trained
here; the commands are read from the pages each time, so the test follows the pages as they change."""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from handgrad.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)\s*(\S*)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A synopsis (`handgrad eval -o DIR [-i FILE]`) shows a command's shape, not a command to run.
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")


def is_synopsis(command: str) -> bool:
    return any(mark in command for mark in ("[", "...", "\u2026", "\\|")) or any(
        PLACEHOLDER.match(token) for token in command.split())


def handgrad_part(segment: str) -> str | None:
    """`handgrad ...` out of `$ handgrad ...`, `handgrad ...` or `.venv/bin/handgrad ...`, else None."""
    segment = segment.strip()
    if segment.startswith("$ "):
        segment = segment[2:].lstrip()
    for prefix in ("handgrad ", ".venv/bin/handgrad "):
        if segment.startswith(prefix) or segment == prefix.strip():
            return "handgrad " + segment[len(prefix):]
    launcher, _, rest = segment.partition(" -m handgrad ")  # torchrun [its flags] -m handgrad ...
    if rest and launcher.split()[0] in ("torchrun", ".venv/bin/torchrun"):
        return "handgrad " + rest
    return None


def shown_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each handgrad command a page shows: in a shell code block, every line
    (or `&&` part of one) that starts with `$ handgrad `, `handgrad ` or `.venv/bin/handgrad `; outside
    code blocks (prose and tables), every inline code span that starts with `handgrad ` and is not a
    synopsis."""
    commands = []
    fence = None  # the open code block's info string, or None outside one
    for number, line in enumerate(text.splitlines(), start=1):
        opening = FENCE.match(line)
        if opening:
            fence = opening.group(2) if fence is None else None
            continue
        if fence is not None:
            if fence in ("", "sh", "bash", "console", "shell"):
                for segment in line.split("&&"):
                    command = handgrad_part(segment)
                    if command is not None:
                        commands.append((number, command))
            continue
        for span in INLINE_CODE.findall(line):
            if span.startswith("handgrad ") and not is_synopsis(span):
                commands.append((number, span))
    return commands


def input_file_options() -> set[str]:
    """The destinations of every option that names a file to read (metavar FILE: -i/--data), in any
    subcommand. Output folders (-o) are left out: a run creates them."""
    dests = set()
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                dests |= {a.dest for a in sub._actions if a.metavar == "FILE"}
    return dests


def missing_inputs(args) -> list[str]:
    """The files the parsed command would read that do not exist relative to the repository root."""
    values = [getattr(args, dest, None) for dest in sorted(input_file_options())]
    return [v for v in values if v is not None and not (ROOT / v).exists()]


def parse(command: str):
    """The namespace `handgrad` would run with; fails the test with argparse's own message if it would not."""
    argv = shlex.split(command, comments=True)
    assert argv[0] == "handgrad"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv[1:])
    except SystemExit as stop:
        if stop.code in (0, None):  # --help, --version
            return None
        pytest.fail(f"`{command}` does not parse: {err.getvalue().strip()}")


def page_commands():
    for page in PAGES:
        for number, command in shown_commands(page.read_text(encoding="utf-8")):
            yield pytest.param(page, command, id=f"{page.relative_to(ROOT)}:{number}")


@pytest.mark.parametrize("page, command", list(page_commands()))
def test_shown_command_runs_as_written(page, command):
    args = parse(command)
    if args is None:
        return
    for value in missing_inputs(args):
        if (ROOT / value).resolve().is_relative_to(SHARED.resolve()) and not SHARED.exists():
            pytest.skip(f"`{command}` reads {value}, in the shared folder beside the checkout ({SHARED}), "
                        "which is absent here")
        pytest.fail(f"{page.name}: `{command}` reads {value}, which does not exist relative to the "
                    f"repository root ({ROOT})")


def test_readme_shows_each_command():
    shown = {shlex.split(c)[1] for _, c in shown_commands(README.read_text(encoding="utf-8"))}
    assert {"train", "check", "sample", "eval"} <= shown, shown


def test_extraction_finds_commands_and_skips_synopses():
    text = "\n".join([
        "```", "$ handgrad check --data a.txt", "out: handgrad ran", "```",
        "```python", "handgrad = 1", "```",
        "```", "python3 -m venv .venv && .venv/bin/handgrad train", "```",
        "```", "torchrun --nproc-per-node 2 -m handgrad train --steps 5", "```",
        "| `handgrad train -i b.txt --steps 5` | `handgrad eval -o DIR [-i FILE]` |",
        "Run `handgrad sample -n 3`, or `handgrad check --model M`.",
    ])
    assert shown_commands(text) == [(2, "handgrad check --data a.txt"), (9, "handgrad train"),
                                    (12, "handgrad train --steps 5"),
                                    (14, "handgrad train -i b.txt --steps 5"), (15, "handgrad sample -n 3")]
    assert "data" in input_file_options()


def test_check_catches_a_missing_file_and_a_bad_flag():
    assert missing_inputs(parse("handgrad check --data names.txt")) == ["names.txt"]
    assert missing_inputs(parse("handgrad eval -o no-such-run -i README.md")) == []
    assert missing_inputs(parse("handgrad sample -o no-such-run")) == []
    with pytest.raises(pytest.fail.Exception, match="no-such-flag"):
        parse("handgrad sample --no-such-flag")


def test_readme_test_command_is_the_one_ci_runs():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if "pytest" in line and not line.lstrip().startswith("#")]
    readme_lines = []
    fence = False
    for line in README.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fence = not fence
        elif fence and "-m pytest" in line:
            readme_lines.append(line.strip())
    assert len(ci_lines) == 1 and len(readme_lines) == 1, (ci_lines, readme_lines)
    assert readme_lines[0] == ci_lines[0].strip()


def test_page_links_exist():
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("#") or target.startswith("mailto:"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"


QUOTED_FROM = re.compile(r"\(from `([^`]+\.py)`\):\s*$")


def quoted_code(text: str) -> list[tuple[str, str]]:
    """(source path, code) for each code block that the line before it says is quoted "(from `path.py`)"."""
    quotes = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        source = QUOTED_FROM.search(line)
        following = [k for k in range(number + 1, len(lines)) if lines[k].strip()]
        if source and following and FENCE.match(lines[following[0]]):
            start = following[0] + 1
            end = next(k for k in range(start, len(lines)) if FENCE.match(lines[k]))
            quotes.append((source.group(1), "\n".join(lines[start:end])))
    return quotes


def test_quoted_code_is_the_source_as_it_is():
    quotes = [(page, path, code) for page in PAGES for path, code in quoted_code(page.read_text(encoding="utf-8"))]
    assert quotes, "no page quotes the source any more: drop this test with the quote"
    for page, path, code in quotes:
        source = ROOT / path
        assert source.exists(), f"{page.relative_to(ROOT)} quotes {path}, which does not exist"
        assert code in source.read_text(encoding="utf-8"), (
            f"{page.relative_to(ROOT)} quotes {path}, but the code there has changed: copy it again")


def test_the_readme_is_a_newcomers_page_in_the_order_they_need():
    """What handgrad is, the two commands, what a run prints, the gradient check, Python, results, links; a
    few screens, the benchmark narrative in docs/."""
    text = README.read_text(encoding="utf-8")
    headings = [line[3:].strip() for line in text.splitlines() if line.startswith("## ")]
    wanted = ["Two commands", "What a run prints", "The gradient check", "Using it from Python", "Results", "More"]
    found = [next((i for i, h in enumerate(headings) if h.startswith(w)), None) for w in wanted]
    assert None not in found and found == sorted(found), headings
    assert len(text.encode("utf-8")) < 16_000
    assert "docs/python.md" in text and "docs/bench.md" in text
