"""Data-parallel training from the command line: torchrun, `handgrad train --nproc`, two nodes, resuming
across process counts, and a worker killed mid-run (kill -9), with and without restarts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import NAMES_TXT
from safetensors.torch import load_file

from handgrad import checkpoint, local_sum
from handgrad.parallel_bench import free_port

BIN = Path(sys.executable).parent
STEPS = ["--steps", "300", "--log-every", "20", "--eval-every", "100", "--save-every", "100", "-n", "0"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(*args, nproc: int = 2, extra=()) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", *extra, "-m", "handgrad", "train", *args]


def handgrad(*args) -> list[str]:
    return [str(BIN / "handgrad"), *args]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=240, **kw)


def logged(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(a: Path, b: Path, tol: float = 1e-5) -> None:
    one, two = logged(a), logged(b)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for x, y in zip(one, two):
        for key in ("train_loss", "val_loss"):
            if key in x:
                assert abs(x[key] - y[key]) <= tol, (x["step"], key, x[key], y[key])


def assert_same_weights(a: Path, b: Path, tol: float) -> None:
    """Every saved tensor within `tol` of the other's, relative to its size where that is above 1
    (float32 holds about 7 digits: a running variance of 2 differs by 1e-6 after a few ulps)."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        x, y = wa[k].double(), wb[k].double()
        assert ((x - y).abs() <= tol * x.abs().clamp(min=1)).all(), (k, (x - y).abs().max())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the run in one process."""
    if not NAMES_TXT.exists():
        pytest.skip(f"seed data set not found at {NAMES_TXT}")
    names_txt = NAMES_TXT
    out = tmp_path_factory.mktemp("one") / "run"
    done = run(handgrad("train", "-i", str(names_txt), "--split", "examples", *STEPS, "-o", str(out)))
    assert done.returncode == 0, done.stderr
    return out


def test_torchrun_follows_one_process_and_only_rank_0_speaks(tmp_path, names_txt, one_process):
    out = tmp_path / "two"
    done = run(torchrun("-i", str(names_txt), "--split", "examples", *STEPS, "-o", str(out)))
    assert done.returncode == 0, done.stderr
    assert_same_losses(one_process, out)
    assert done.stdout.count("data: ") == 1 and done.stdout.count("final loss") == 1  # rank 0 alone prints
    assert "processes: 2 (gloo)" in done.stdout
    meta = json.loads((out / "run.json").read_text())
    assert (meta["world_size"], meta["backend"]) == (2, "gloo")
    saved = checkpoint.load_checkpoint(out).meta
    assert (saved["world_size"], saved["backend"]) == (2, "gloo")


def test_a_bad_setting_is_said_once(tmp_path, names_txt):
    done = run(torchrun("-i", str(names_txt), "--model", "gru", "--split", "examples", "-o", str(tmp_path / "r")))
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("handgrad:")]
    assert ours == ["handgrad: error: --split examples: a sequence model trains on whole items, split by words "
                    "(--split words)"]
    done = run(handgrad("train", "--nproc", "2", "--impl", "replay", "-o", str(tmp_path / "r")))
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "handgrad: error: --impl replay runs in one process; a run of 2 processes takes the eager or the compiled "
        "step (--impl eager, compiled or auto)"]


def test_checkpoints_resume_on_another_number_of_processes(tmp_path, names_txt, one_process):
    data = ["-i", str(names_txt), "--split", "examples", *STEPS]
    two_then_one, one_then_two = tmp_path / "a", tmp_path / "b"
    first = run(handgrad("train", "--nproc", "2", *data, "--stop-at", "140", "-o", str(two_then_one)))
    assert first.returncode == 0, first.stderr
    assert "stopped as asked after step 140" in first.stdout
    second = run(handgrad("train", "--resume", "-o", str(two_then_one)))
    assert second.returncode == 0, second.stderr
    assert "1 process where the saved run had 2" in second.stderr
    assert_same_weights(one_process, two_then_one, 1e-6)
    assert run(handgrad("train", *data, "--stop-at", "160", "-o", str(one_then_two))).returncode == 0
    second = run(handgrad("train", "--nproc", "2", "--resume", "-o", str(one_then_two)))
    assert second.returncode == 0, second.stderr
    assert_same_weights(one_process, one_then_two, 1e-6)
    assert_same_losses(one_process, one_then_two)


def test_two_nodes_train_as_one_process(tmp_path, names_txt, one_process):
    port = free_port()
    out = tmp_path / "nodes"

    def node(rank: int) -> subprocess.Popen:
        cmd = [str(BIN / "torchrun"), "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1",
               "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "handgrad", "train",
               "-i", str(names_txt), "--split", "examples", *STEPS, "-o", str(out)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())

    nodes = [node(0), node(1)]
    outputs = [p.communicate(timeout=240) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outputs]
    assert_same_losses(one_process, out)
    assert json.loads((out / "run.json").read_text())["world_size"] == 2


def workers_of(launcher: int) -> list[int]:
    """The processes the launcher started (its children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher:
            found.append(int(stat.parent.name))
    return sorted(found)


LONG = ["-i", str(NAMES_TXT), "--split", "examples", "--steps", "1500", "--log-every", "50", "--save-every", "200",
        "-n", "0"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The reference for the runs stopped midway: 1,500 steps in 2 processes, uninterrupted."""
    if not NAMES_TXT.exists():
        pytest.skip(f"seed data set not found at {NAMES_TXT}")
    out = tmp_path_factory.mktemp("two") / "run"
    done = run(torchrun(*LONG, "-o", str(out)))
    assert done.returncode == 0, done.stderr
    return out


def wait_for_step(out: Path, step: int) -> None:
    deadline = time.monotonic() + 180
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                                    if line.endswith("}")):
            return
        time.sleep(0.2)
    raise AssertionError(f"{out} did not reach step {step}")


def train_and_kill_one_worker(out: Path, restarts: int) -> tuple[subprocess.CompletedProcess, float]:
    """A 2-process run killed (kill -9, one worker) once it has logged step 500; the launcher's exit
    status and output, and the seconds from the kill to its end."""
    cmd = torchrun(*LONG, "-o", str(out), extra=[f"--max-restarts={restarts}"])
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    wait_for_step(out, 500)
    workers = workers_of(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    killed = time.monotonic()
    stdout, stderr = launcher.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, launcher.returncode, stdout, stderr), time.monotonic() - killed


def test_a_killed_worker_stops_the_other_and_leaves_the_checkpoint(tmp_path, names_txt, monkeypatch):
    out = tmp_path / "killed"
    done, seconds = train_and_kill_one_worker(out, restarts=0)
    assert done.returncode != 0 and seconds < 60
    ours = [line for line in done.stderr.splitlines() if line.startswith("handgrad:")]
    assert len(ours) == 1 and ours[0].startswith("handgrad: error: rank 0")
    assert "last checkpoint is left as it was" in ours[0]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # as torchrun set it for the two
    if local_sum.why_not("gloo", 2) is None:  # they summed through shared memory: the survivor saw the process gone
        assert "(rank 1's process " in ours[0] and " has exited)" in ours[0], ours[0]
    evaluated = run(handgrad("eval", "-o", str(out)))
    assert evaluated.returncode == 0, evaluated.stderr


def test_a_restart_resumes_from_the_last_checkpoint_and_ends_as_if_never_killed(tmp_path, two_processes):
    out = tmp_path / "restarted"
    done, _ = train_and_kill_one_worker(out, restarts=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "restarted by the launcher: resuming the run" in done.stderr
    assert_same_weights(two_processes, out, 0.0)
    assert_same_losses(two_processes, out, 0.0)


def test_ctrl_c_saves_every_rank_at_one_step_and_the_run_resumes(tmp_path, two_processes):
    """Ctrl-C reaches the launcher and both workers (one process group, as from a terminal)."""
    out = tmp_path / "interrupted"
    launcher = subprocess.Popen(torchrun(*LONG, "-o", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env(), start_new_session=True)
    wait_for_step(out, 300)
    os.killpg(launcher.pid, signal.SIGINT)
    stdout, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    saved = [line for line in stdout.splitlines() + stderr.splitlines() if line.startswith("interrupted: saved")]
    assert len(saved) == 1, stderr[-2000:]
    step = int(saved[0].split("after step ")[1].split()[0])
    assert [line for line in stderr.splitlines() if line.startswith("handgrad:")] == ["handgrad: interrupted"]
    resumed = run(handgrad("train", "--nproc", "2", "--resume", "-o", str(out)))
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {step:,}" in resumed.stdout
    assert_same_weights(two_processes, out, 0.0)
