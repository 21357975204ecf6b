"""Helpers for the cluster fault tests: run_train.py under torchrun variants, as a user starts it.

A run is a subprocess in its own session with unbuffered output to a log file, so a
test can wait for a log line or a checkpoint folder, signal the run (or one torchrun
worker, found by its RANK in /proc) and always kill what is left (`finish`). The runs
are train_runs' tiny 4-step run with a checkpoint every step and the last 3 kept, at lr 1e-5;
`one_process` and `two_processes` are their uninterrupted references (session fixtures,
made visible to every test module by tests/conftest.py).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

import train_runs as runs

# lr 1e-5: a 2-process run's params then stay within 1e-5 of 1 process's (AdamW moves a
# rounding-level gradient's entry by up to ~0.1 lr, see tests/test_train_loop.py).
LR = 1e-5
ARGS = [*runs.args(log_every=1), "--config.train.keep_checkpoints=3", f"--config.train.lr={LR}"]
STEPS = runs.STEPS


def torchrun(nproc: int, *options: str) -> list[str]:
    """`python -m torch.distributed.run` with one process per rank on this machine (gloo)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *options]


def start(launch: list[str], workdir: str, *extra: str) -> subprocess.Popen:
    """Start `launch run_train.py ARGS extra --workdir` with its output in <workdir>.log."""
    cmd = [*launch, "run_train.py", *ARGS, *extra, f"--workdir={workdir}"]
    with open(workdir + ".log", "w") as log:
        return subprocess.Popen(cmd, cwd=runs.REPO, env=dict(runs.env(), PYTHONUNBUFFERED="1"), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def run(launch: list[str], workdir: str, *extra: str, timeout: float = 300) -> str:
    """A run to its end (status 0); returns its log."""
    proc = start(launch, workdir, *extra)
    rc = finish(proc, workdir, timeout)
    assert rc == 0, log(workdir)[-4000:]
    return log(workdir)


@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
    """The uninterrupted 1-process run (a workdir), shared by tests/test_cluster.py and test_slurm.py."""
    workdir = str(tmp_path_factory.mktemp("cluster") / "one")
    t = time.perf_counter()
    run([sys.executable], workdir)
    print(f"1-process reference: {time.perf_counter() - t:.1f} s")
    return workdir


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory):
    """The uninterrupted 2-process torchrun run on this machine."""
    workdir = str(tmp_path_factory.mktemp("cluster") / "two")
    t = time.perf_counter()
    run(torchrun(2, "--standalone"), workdir)
    print(f"2-process torchrun reference: {time.perf_counter() - t:.1f} s")
    return workdir


def log(workdir: str) -> str:
    with open(workdir + ".log", errors="replace") as fh:
        return fh.read().replace("\r", "\n")


def wait_for(ready, proc: subprocess.Popen, workdir: str, timeout: float = 300) -> None:
    """Poll ready() until true; fail (showing the log) if the run ends or time runs out first."""
    end = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) too early:\n{log(workdir)[-4000:]}")
        if time.time() > end:
            raise AssertionError(f"waited {timeout:.0f} s in vain:\n{log(workdir)[-4000:]}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, workdir: str, timeout: float = 300) -> int:
    """The run's exit status; past timeout its whole session is killed and the test fails."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the run hung for {timeout:.0f} s:\n{log(workdir)[-4000:]}") from None
    finally:
        kill_session(proc)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:  # gone already
        return []


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the run: its session, and torchrun's workers (each in a
    session of its own), children first so that none is orphaned."""
    pids, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += _children(pid)
    for pid in reversed(pids[1:]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of the given RANK (a child of the launcher)."""
    children = _children(launcher_pid)
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(v.split(b"=", 1) for v in fh.read().split(b"\0") if b"=" in v)
        if env.get(b"RANK") == str(rank).encode():
            return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


def assert_identical(want: dict, got: dict, tol: float = 1e-6) -> float:
    """Every tensor of every tree within tol; returns the largest difference."""
    worst = 0.0
    for name in want:
        assert list(got[name]) == list(want[name]), name
        for k, v in want[name].items():
            err = (got[name][k].double() - v.double()).abs().max().item() if v.numel() else 0.0
            assert err <= tol, f"{name}/{k}: max abs diff {err:.2e} > {tol}"
            worst = max(worst, err)
    return worst


def steps_run(text: str) -> list[tuple[int, int]]:
    """The (start, end) of every `sd_func train: ran N steps, start -> end` line of a log."""
    out = []
    for line in text.splitlines():
        if "sd_func train: ran " in line:
            a, b = line.rsplit(",", 1)[1].split("->")
            out.append((int(a), int(b)))
    return out

