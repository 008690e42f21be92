"""The command as people use it: piped into `head`, with a typo, read from --help, sampling long items."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from cli_run import assert_one_line_error, run_cli, snapshot
from safetensors.torch import save as st_save

from handgrad import checkpoint, cli


def start(argv: list[str], stdout) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "handgrad", *map(str, argv)], env=env, stdout=stdout,
                            stderr=subprocess.PIPE)


def read_lines_then_close(argv: list[str], lines: int) -> tuple[int, list[bytes], str]:
    """Run `handgrad ARGV | head -LINES`: a reader that takes a few lines and goes away.

    The pipe is shrunk to one page and read byte by byte, so output that has not
    been read by the time the reader closes cannot already sit in a buffer.
    """
    read_fd, write_fd = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, 4096)
    except (ImportError, AttributeError, OSError):
        pass  # not Linux: the default pipe, a weaker test
    proc = start(argv, write_fd)
    os.close(write_fd)
    got = []
    with os.fdopen(read_fd, "rb", buffering=0) as reader:
        for _ in range(lines):
            got.append(reader.readline())
    _, err = proc.communicate(timeout=120)
    return proc.returncode, got, err.decode("utf-8", "replace")


def assert_quiet_about_the_pipe(err: str) -> None:
    for word in ("Traceback", "BrokenPipeError", "Exception ignored"):
        assert word not in err, err


def test_train_piped_into_head_trains_on_and_saves(tmp_path):
    out = tmp_path / "run"
    rc, got, err = read_lines_then_close(
        ["train", "-o", out, "--steps", 300, "--eval-every", 100, "--log-every", 100, "-n", 5], lines=2)
    assert got[0].startswith(b"data: ") and len(got) == 2
    assert_quiet_about_the_pipe(err)
    assert rc == 0, err
    for name in (checkpoint.MODEL_WEIGHTS, checkpoint.CHECKPOINT, "run.json", "samples.txt"):
        assert (out / name).is_file(), name
    assert checkpoint.load_checkpoint(out).step == 300
    assert len((out / "samples.txt").read_text().splitlines()) == 5  # the end of the run, after the reader left


def test_check_json_piped_into_head_ends_without_a_traceback():
    rc, got, err = read_lines_then_close(["check", "--json"], lines=3)
    assert got[0].strip() == b"["
    assert_quiet_about_the_pipe(err)
    assert rc == 0, err


@pytest.mark.parametrize("argv, needles", [
    (["train", "--stpes", "5"], ["unrecognized arguments: --stpes 5", "did you mean --steps?", "see handgrad train --help"]),
    (["train", "--stpes=5"], ["did you mean --steps?", "see handgrad train --help"]),
    (["sample", "--temprature", "0.5"], ["did you mean --temperature?", "see handgrad sample --help"]),
    (["eval", "--dvice", "cpu"], ["did you mean --device?", "see handgrad eval --help"]),
    (["trian"], ["invalid choice: 'trian'", "did you mean train?"]),
    (["train", "--model", "mpl"], ["invalid choice: 'mpl'", "did you mean mlp?", "see handgrad train --help"]),
])
def test_a_typo_gets_a_suggestion_and_the_subcommands_help(capsys, argv, needles):
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    assert_one_line_error(rc, err, *needles)


def test_nothing_close_suggests_nothing(capsys):
    rc, _, err = run_cli(["train", "--zzzzzz"], capsys)
    assert rc == 2
    assert_one_line_error(rc, err, "unrecognized arguments: --zzzzzz", "see handgrad train --help")
    assert "did you mean" not in err
    rc, _, err = run_cli(["train", "stray"], capsys)
    assert_one_line_error(rc, err, "unrecognized arguments: stray", "see handgrad train --help")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def shown(default) -> str:
    """A default as a user types it: 32,8192 for a list."""
    return ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


def test_every_option_of_every_command_says_what_it_does_and_its_default():
    commands = subcommands()
    assert set(commands) == set(cli.COMMANDS)
    checked = 0
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            what = f"handgrad {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{what} has no help text"
            if action.default is not None and action.default is not False:
                assert re.search(rf"\bdefault:? {re.escape(shown(action.default))}(?![\w.])", action.help), \
                    f"{what}: its help does not state its default {shown(action.default)!r}: {action.help!r}"
            checked += 1
    assert checked > 50  # the options of all five commands, not a list that came back empty


@pytest.fixture
def run(saved_run, tmp_path):
    return shutil.copytree(saved_run, tmp_path / "run")


def change_model(folder, change_meta=None, change_tensors=None):
    """Re-save model.safetensors with its header metadata and/or tensors changed."""
    path = folder / checkpoint.MODEL_WEIGHTS
    tensors, metadata = checkpoint.read_safetensors(path)
    meta = json.loads(metadata[checkpoint.HEADER_KEY])
    if change_meta:
        change_meta(meta)
    if change_tensors:
        change_tensors(tensors)
    path.write_bytes(st_save(tensors, {"format": checkpoint.MODEL_FORMAT, checkpoint.HEADER_KEY: json.dumps(meta)}))


def never_ends(tensors):
    # the output layer's bias for the boundary token (index 0), pushed far below every other logit
    tensors["linear2.bias"][0] = -1e4


def test_sample_length_defaults_to_the_longest_item_of_the_data(run, capsys):
    change_model(run, lambda m: m.update(max_item_len=3))
    rc, out, err = run_cli(["sample", "-o", run, "-n", 30, "--seed", 1], capsys)
    assert rc == 0, err
    items = out.splitlines()
    assert len(items) == 30 and max(map(len, items)) == 3
    found = re.fullmatch(r"handgrad: note: (\d+) of 30 samples reached --max-len 3 without ending\n", err)
    assert found, err
    assert 0 < int(found[1]) <= sum(len(s) == 3 for s in items)


def test_sample_max_len_flag_and_the_fallback_for_older_files(run, capsys):
    change_model(run, lambda m: m.pop("max_item_len", None), never_ends)  # a header without it, as files saved before it
    rc, out, err = run_cli(["sample", "-o", run, "-n", 4, "--seed", 1], capsys)
    assert rc == 0, err
    assert [len(s) for s in out.splitlines()] == [100] * 4
    assert err == "handgrad: note: 4 of 4 samples reached --max-len 100 without ending\n"
    rc, out, err = run_cli(["sample", "-o", run, "-n", 4, "--seed", 1, "--max-len", 250], capsys)
    assert [len(s) for s in out.splitlines()] == [250] * 4
    assert "4 of 4 samples reached --max-len 250" in err


def test_samples_that_end_are_not_reported(run, capsys):
    change_model(run, lambda m: m.update(max_item_len=40))
    before = snapshot(run)
    rc, out, err = run_cli(["sample", "-o", run, "-n", 10, "--seed", 1, "--temperature", 0], capsys)
    assert rc == 0 and err == "", err
    assert len(out.splitlines()) == 10
    assert snapshot(run) == before


def test_max_len_must_be_positive(run, capsys):
    rc, _, err = run_cli(["sample", "-o", run, "--max-len", "0"], capsys)
    assert rc == 2
    assert_one_line_error(rc, err, "--max-len", "must be positive")


def test_a_tiny_temperature_samples_the_most_likely_item(run, capsys):
    """logits / T overflows to inf for T near 0; the limit is argmax, as --temperature 0."""
    rc, greedy, err = run_cli(["sample", "-o", run, "-n", 3, "--temperature", 0], capsys)
    assert rc == 0, err
    rc, tiny, err = run_cli(["sample", "-o", run, "-n", 3, "--temperature", "1e-320", "--seed", 5], capsys)
    assert rc == 0, err
    assert tiny == greedy and "Traceback" not in err
