"""Cluster faults outside Slurm, through run_train.py as users start it (configs/tiny.py, gloo).

Each fault run ends where an uninterrupted run of the same world size ends, every tensor
of the final checkpoint within 1e-6: one torchrun run with `--max-restarts=2` whose rank 1
gets SIGTERM before step 1 (both ranks stop after step 1, rank 0 writes its checkpoint,
torchrun restarts the group, which resumes) and is then SIGKILLed after the step-3
checkpoint (before the restart-safe store the restarted round failed in gloo's
connectFullMesh, or hung), and a newest checkpoint damaged on disk (resume falls
back to the previous complete one with a warning naming the bad one). Two torchrun
"nodes" (`--nnodes=2`, one process each, c10d rendezvous on 127.0.0.1) end where the
one-machine 2-process run ends and where 1 process ends for the same global batch (to
the bounds of tests/train_runs.py::assert_matches_one_process). Slurm's environment is
parsed by pure functions tested here; the jobs on a real Slurm are in tests/test_slurm.py.
"""

import os
import shutil
import signal
import socket
import sys
import time

import pytest
import torch

import cluster_runs as cr
import train_runs as runs
from sd_func.checkpoint import training as checkpointing
from sd_func.errors import UserError
from sd_func.train import distributed, preemption

STEPS, LR = cr.STEPS, cr.LR


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("localhost", ["localhost"]),
    ("a1,b[8-11]", ["a1", "b8", "b9", "b10", "b11"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
])
def test_expand_hostnames_as_scontrol_does(nodelist, hosts):
    assert distributed.expand_hostnames(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node[a-b]"])
def test_bad_hostlist_is_a_user_error(bad):
    with pytest.raises(UserError, match="hostlist"):
        distributed.expand_hostnames(bad)


SRUN_TASK = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "node[07-10]", "SLURM_JOB_ID": "123456", "SLURM_RESTART_COUNT": "2"}


def test_launch_env_of_an_srun_task():
    env = distributed.launch_env(SRUN_TASK)
    assert (env["launcher"], env["rank"], env["world"], env["local_rank"]) == ("slurm", 3, 8, 1)
    assert (env["master_addr"], env["master_port"], env["restart"]) == ("node07", 15000 + 123456 % 15000, 2)
    assert not env["agent_store"] and not env["missing"]
    assert distributed.launch_env(dict(SRUN_TASK, MASTER_PORT="29400"))["master_port"] == 29400


def test_launch_env_torchrun_wins_and_a_batch_script_is_one_process():
    torchrun = dict(SRUN_TASK, RANK="5", WORLD_SIZE="16", LOCAL_RANK="1", MASTER_ADDR="node09", MASTER_PORT="29500",
                    TORCHELASTIC_RESTART_COUNT="1", TORCHELASTIC_USE_AGENT_STORE="True")
    env = distributed.launch_env(torchrun)
    assert (env["launcher"], env["rank"], env["world"], env["master_addr"], env["master_port"]) == (
        "torchrun", 5, 16, "node09", 29500)
    assert env["restart"] == 1 and env["agent_store"]
    batch = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}  # sbatch's script, outside srun
    assert distributed.launch_env(batch)["world"] == 1
    assert distributed.launch_env({})["launcher"] == "none"
    assert distributed.launch_env({"WORLD_SIZE": "2", "RANK": "0"})["missing"] == [
        "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]


def test_sigterm_then_sigkill_under_torchrun_restarts_resume_identically(two_processes, tmp_path):
    """One `torchrun --max-restarts=2` run of 2 workers, two faults (checkpoints at steps 3, 4):

    1. SIGTERM to rank 1 alone, before step 1: both ranks stop after step 1 (they agree),
       rank 0 writes checkpoint 1 and every worker exits 75; torchrun restarts the group,
       and round 1 resumes from step 1.
    2. SIGKILL of rank 1 right after round 1's step-3 checkpoint: torchrun restarts again,
       and round 2 (which, before the per-round PrefixStore, failed in gloo's
       connectFullMesh or hung) resumes from step 3.
    The run ends where the uninterrupted 2-process run ends."""
    workdir = str(tmp_path / "faults")
    third = os.path.join(workdir, "checkpoints", "3")
    proc = cr.start(cr.torchrun(2, "--standalone", "--max-restarts=2"), workdir, "--config.train.checkpoint_every=3")
    try:
        # Rank 0 prints this line after the group's first barrier: both handlers are in place.
        cr.wait_for(lambda: "sd_func train: starting" in cr.log(workdir), proc, workdir)
        os.kill(cr.worker_pid(proc.pid, rank=1), signal.SIGTERM)  # rank 1 only: the ranks must agree
        cr.wait_for(lambda: os.path.isdir(third), proc, workdir, timeout=180)
        os.kill(cr.worker_pid(proc.pid, rank=1), signal.SIGKILL)
        t = time.perf_counter()
        rc = cr.finish(proc, workdir, timeout=180)
    finally:
        cr.kill_session(proc)
    text = cr.log(workdir)
    print(f"round 2: {time.perf_counter() - t:.1f} s after the SIGKILL")
    assert rc == 0, text[-4000:]
    first = os.path.join(workdir, "checkpoints", "1")
    assert f"sd_func train: stopped by SIGTERM after step 1; checkpoint {first}; run again" in text, text[-4000:]
    assert f"exitcode: {preemption.EXIT_PREEMPTED}" in text, text[-4000:]
    resumed = [line.split("resumed from step ")[1].split()[0] for line in text.splitlines() if "resumed from" in line]
    assert resumed == ["1", "3"] and cr.steps_run(text) == [(3, STEPS)], text[-4000:]
    worst = cr.assert_identical(runs.trees(two_processes), runs.trees(workdir))
    print(f"SIGTERM to rank 1 + SIGKILL of rank 1, two torchrun restarts, vs uninterrupted: max abs diff {worst:.1e}")


def test_damaged_checkpoints_fall_back_to_the_previous_complete_one(one_process, tmp_path, caplog):
    workdir = str(tmp_path / "damaged")
    shutil.copytree(one_process, workdir)
    assert checkpointing.steps(workdir) == [2, 3, 4]
    newest, middle = (os.path.join(workdir, "checkpoints", s) for s in ("4", "3"))
    opt = os.path.join(newest, "opt.safetensors")
    with open(opt, "r+b") as fh:
        fh.truncate(os.path.getsize(opt) - 100)
    os.remove(os.path.join(middle, "ema.safetensors"))
    assert checkpointing.latest(workdir) == os.path.join(workdir, "checkpoints", "2")
    assert f"checkpoint {newest} is damaged" in caplog.text and "truncated" not in caplog.text.split(newest)[0]
    text = cr.run([sys.executable], workdir)
    for bad, why in ((newest, "opt.safetensors: not a readable safetensors file"), (middle, "ema.safetensors")):
        assert f"checkpoint {bad} is damaged and is skipped" in text and why in text, text[-3000:]
    assert "resumed from step 2 " in text and cr.steps_run(text) == [(2, STEPS)], text[-3000:]
    worst = cr.assert_identical(runs.trees(one_process), runs.trees(workdir))
    print(f"resumed from step 2 past 2 damaged checkpoints vs uninterrupted: max abs diff {worst:.1e}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_end_where_one_machine_and_one_process_end(one_process, two_processes, tmp_path):
    workdir = str(tmp_path / "nodes")
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [cr.start(cr.torchrun(1, "--nnodes=2", f"--node_rank={r}", "--rdzv_backend=c10d",
                                  f"--rdzv_endpoint={endpoint}", "--rdzv_id=sd_func_test"),
                      workdir + ("" if r == 0 else f"-node{r}")) for r in range(2)]
    try:
        rcs = [cr.finish(p, workdir + ("" if r == 0 else f"-node{r}"), timeout=180) for r, p in enumerate(nodes)]
    finally:
        for p in nodes:
            cr.kill_session(p)
    assert rcs == [0, 0], cr.log(workdir)[-3000:]
    text = cr.log(workdir) + cr.log(workdir + "-node1")
    assert "global batch 4 over 2 process(es)" in text, text[-3000:]
    got = runs.trees(workdir)
    worst = cr.assert_identical(runs.trees(two_processes), got)
    print(f"2 nodes x 1 process vs 1 machine x 2 processes: max abs diff {worst:.1e}")
    want = runs.trees(one_process)
    runs.assert_matches_one_process(want, got, LR)  # params within LR / 4 = 2.5e-6
    worst = max((got[n][k] - v).abs().max().item() for n in ("params", "ema") for k, v in want[n].items())
    print(f"2 nodes x 1 process vs 1 process, same global batch: params max abs diff {worst:.2e}")
    assert worst < 1e-5


def test_stop_signals_are_recorded_and_the_handlers_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with preemption.catch_stop_signals() as caught:
        assert caught["signal"] == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # recorded, the process lives on
        time.sleep(0.01)
        assert caught["signal"] == signal.SIGUSR1 and preemption.agreed_signal(caught) == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_rotation_after_a_fallback_keeps_the_checkpoint_just_written(tmp_path):
    # Step 4 written (and later damaged), the run resumed from an older one writes step 3 with
    # keep=1: step 3 stays (the newest up to 3), step 4 waits to be overwritten at step 4.
    workdir = str(tmp_path)
    for step in (2, 4, 3):
        checkpointing.save(workdir, step, {"params": {"w": torch.full((2,), float(step))}}, {}, keep=1)
    assert checkpointing.steps(workdir) == [3, 4]
