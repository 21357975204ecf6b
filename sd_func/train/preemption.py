"""Preemption and time limits: stop at a step every rank agrees on, checkpoint, exit for a requeue.

Slurm (`#SBATCH --signal=USR1@120`, `scancel --signal=USR1`, a preemption or a time
limit) and torchrun's agent tell a job to stop with SIGUSR1 or SIGTERM. Inside
`catch_stop_signals()` the handler only records the signal: the step in progress
finishes. After each step the ranks take the largest recorded signal over the group
(`agreed_signal`, one tiny all-reduce), so all of them stop after the same step; the
loop then writes the checkpoint of that step (rank 0, atomically) and calls `stop`:
rank 0 logs it and, in a Slurm job, requeues the job with `scontrol requeue
$SLURM_JOB_ID` (the requeued job starts the same batch script, which resumes from the
checkpoint); every rank then exits with status 75 (EX_TEMPFAIL: "try again") through
`Preempted`, a SystemExit.
"""

import contextlib
import signal
import subprocess
import sys
import threading

from tqdm import tqdm

from sd_func.train import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL


class Preempted(SystemExit):
    """The run stopped on a signal after writing a checkpoint; exit status EXIT_PREEMPTED."""

    def __init__(self, message: str):
        super().__init__(EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def catch_stop_signals():
    """Record SIGTERM / SIGUSR1 in the yielded {"signal": 0 | number} instead of dying.

    The previous handlers come back on exit. Outside the main thread (where Python
    cannot install handlers) nothing is caught and the record stays 0."""
    caught = {"signal": 0}
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def record(signum, frame):
        caught["signal"] = signum

    previous = {s: signal.signal(s, record) for s in STOP_SIGNALS}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def agreed_signal(caught: dict) -> int:
    """The stop signal any rank received (0 if none): a collective, call it on every rank."""
    return distributed.agree_max(caught["signal"])


def _requeue(job: str) -> str:
    try:
        p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`scontrol requeue {job}` failed ({e}); resubmit the job to resume"
    if p.returncode != 0:
        return f"`scontrol requeue {job}` failed ({p.stderr.strip()}); resubmit the job to resume"
    return f"requeued Slurm job {job}"


def stop(signum: int, step: int, ckpt: str, main: bool) -> None:
    """Log the stop (rank 0), requeue a Slurm job (rank 0), and raise Preempted on every rank."""
    name = signal.Signals(signum).name
    message = f"stopped by {name} after step {step}; checkpoint {ckpt}"
    if main:
        job = distributed.slurm_job_id()
        then = _requeue(job) if job else "run again with the same --workdir to resume"
        tqdm.write(f"sd_func train: {message}; {then}")
        sys.stdout.flush()
    distributed.barrier()
    raise Preempted(message)
