"""Running a learner's code: a fresh namespace, every exception turned into one line that names where in the
file it happened (no traceback), and a time limit, so that a loop that never ends cannot hang the check.

This is a teaching tool's guard against mistakes, not a security boundary: the code runs in this process."""
from __future__ import annotations

import builtins
import contextlib
import signal
import sys
import threading
import traceback

from .notebook import Cell


class StopLearnerCode(BaseException):
    """Raised into the learner's code to end it (a BaseException: a learner's `except Exception` lets it by)."""


class TimeLimit(StopLearnerCode):
    pass


class LearnerError(Exception):
    """The learner's code raised; `message` is one line: where, the exception's type and its first line."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def fresh_namespace(values: dict | None = None) -> dict:
    ns = {"__name__": "__exercise__", "__builtins__": builtins}
    ns.update(values or {})
    return ns


def cell_filename(cell: Cell) -> str:
    # the marker in a traceback that says "the learner's cell", whatever the file's name
    return f"<exercise {id(cell)}>"


def compile_cell(cell: Cell, source: str | None = None, first_line: int = 1):
    """`source` (default: the cell's) compiled so that its line numbers are the cell's: `first_line` is the
    cell line the source starts at. A syntax error becomes a LearnerError."""
    source = cell.source if source is None else source
    try:
        return compile("\n" * (first_line - 1) + source, cell_filename(cell), "exec")
    except SyntaxError as e:
        raise LearnerError(f"{cell.where(e.lineno or first_line)}: SyntaxError: {e.msg}") from None


def run_code(code, cell: Cell, ns: dict) -> None:
    """Execute compiled learner code in `ns`; its exceptions come out as one-line LearnerErrors."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its prints stay out of the report (and of --json)
            exec(code, ns)
    except (StopLearnerCode, KeyboardInterrupt):
        raise
    except BaseException as e:  # SystemExit too: the learner's exit() ends their code, not the check
        raise LearnerError(describe(e, cell)) from None


def describe(e: BaseException, cell: Cell) -> str:
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if frame.filename == cell_filename(cell):
            line = frame.lineno  # the deepest line of the learner's own code
    text = str(e).strip().splitlines()
    where = cell.where(line) if line is not None else "in code it called"
    return f"{where}: {type(e).__name__}" + (f": {text[0]}" if text else "")


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise TimeLimit in the running code after `seconds` of wall time (main thread on Unix; elsewhere no limit)."""
    usable = (seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise TimeLimit(f"stopped after {seconds:g} s (--time-limit)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
