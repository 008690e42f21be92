"""Real interruptions of a real `handgrad train` process: kill -9 at random moments, and Ctrl-C.
Every time, the folder still loads (`handgrad eval`) and `--resume` continues it, and the run
that finally completes is bit-identical to one that was never interrupted."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from cli_run import QUICK, assert_bit_identical, metrics, run_cli, weights

from handgrad import checkpoint

# long enough that five kills, each at most a checkpoint and 0.15 s after the last, cannot reach the end
# even at twice this machine's 5,000 steps/s (a run that ended before its kill could not be resumed)
STEPS, SAVE_EVERY = 20_000, 200
RUN = ["--steps", str(STEPS), "--save-every", str(SAVE_EVERY), *QUICK]


def start(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "handgrad.cli", *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def file_id(path):
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return None


def wait_for_new_checkpoint(proc: subprocess.Popen, out, timeout: float = 120.0) -> None:
    """Until the process has written a checkpoint of its own past step 0 (then it is surely training)."""
    before = file_id(out / checkpoint.CHECKPOINT)
    deadline = time.monotonic() + timeout
    while file_id(out / checkpoint.CHECKPOINT) in (before, None) or checkpoint.load_checkpoint(out).step == 0:
        assert proc.poll() is None, f"the run exited early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    from handgrad import cli

    out = tmp_path_factory.mktemp("straight") / "run"
    assert cli.main(["train", "-o", str(out), *RUN]) == 0
    return out


def test_kill_9_at_random_moments(tmp_path, capsys, straight_run):
    out = tmp_path / "run"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    saved_steps = []
    for attempt in range(5):
        proc = start(["train", "-o", out, *(RUN if attempt == 0 else ["--resume"])])
        wait_for_new_checkpoint(proc, out)
        time.sleep(rng.uniform(0, 0.15))  # a random moment: mid-step, mid-log or mid-save (a save every ~40 ms)
        assert proc.poll() is None, f"seed {seed}: the run finished before kill {attempt + 1}"
        proc.kill()
        proc.wait()
        rc, stdout, err = run_cli(["eval", "-o", out], capsys)
        assert rc == 0, f"seed {seed}, kill {attempt + 1}: {err}"
        assert stdout.startswith("train")
        step = checkpoint.load_checkpoint(out).step
        assert step % SAVE_EVERY == 0 and step > (saved_steps[-1] if saved_steps else 0), f"seed {seed}"
        saved_steps.append(step)
    rc, _, err = run_cli(["train", "-o", out, "--resume"], capsys)
    assert rc == 0, f"seed {seed}: {err}"
    assert_bit_identical(weights(straight_run), weights(out))
    assert metrics(straight_run) == metrics(out)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_saves_the_step_it_stopped_at(tmp_path, capsys, straight_run):
    out = tmp_path / "run"
    proc = start(["train", "-o", out, *RUN])
    wait_for_new_checkpoint(proc, out)
    time.sleep(random.uniform(0, 0.3))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    saved = checkpoint.load_checkpoint(out).step
    assert f"saved the state after step {saved:,} " in err
    rc, stdout, err = run_cli(["train", "-o", out, "--resume"], capsys)
    assert rc == 0, err
    assert f"at step {saved:,}" in stdout
    assert_bit_identical(weights(straight_run), weights(out))
    assert metrics(straight_run) == metrics(out)
