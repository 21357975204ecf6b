"""slurm/train.sbatch on a real one-node Slurm (slurm/ci_cluster.py: slurmctld + slurmd + munged).

A session fixture installs the Debian packages when missing (root), starts the daemons
on free ports and stops them (and cancels every job) at the end; where Slurm cannot be
installed the tests are skipped saying why. On it, as a user submits, with gloo on CPU:
`sbatch --ntasks=2 slurm/train.sbatch` ends where 1 process ends (the bounds of
tests/train_runs.py::assert_matches_one_process), and its torchrun-per-node launch
(`srun torchrun --nproc_per_node=2`) where the 2 srun tasks end; a job sent SIGUSR1 mid-run writes the
checkpoint of the step its ranks agreed on, requeues itself and finishes identical
(every tensor within 1e-6) to the uninterrupted job; a job whose rank 0 fails (its
checkpoint folder cannot be created) ends FAILED within seconds, with the rank and the
error in its log. Job states come from `scontrol show job -o`, polled with a time bound.
"""

import os
import subprocess
import sys
import time

import pytest

import cluster_runs as cr
import train_runs as runs
from sd_func.train import distributed

sys.path.insert(0, os.path.join(runs.REPO, "slurm"))
import ci_cluster

SBATCH = os.path.join(runs.REPO, "slurm", "train.sbatch")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    try:
        ci_cluster.install()
    except ci_cluster.ClusterError as e:
        pytest.skip(f"Slurm cannot be installed on this machine: {e}")
    state = str(tmp_path_factory.mktemp("slurm"))
    t = time.perf_counter()
    env = ci_cluster.start(state)
    print(f"Slurm up in {time.perf_counter() - t:.1f} s ({state})")
    yield dict(runs.env(), SLURM_CONF=env["SLURM_CONF"])
    ci_cluster.stop(state)


def _scontrol(env, *args) -> str:
    p = subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True, timeout=30, check=True)
    return p.stdout


def job(env, job_id: str) -> dict:
    """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
    fields = _scontrol(env, "show", "job", "-o", job_id).split()
    return dict(f.split("=", 1) for f in fields if "=" in f)


def wait_job(env, job_id: str, ready, timeout: float, log: str) -> dict:
    end = time.time() + timeout
    while True:
        info = job(env, job_id)
        if ready(info):
            return info
        if time.time() > end:
            raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s:\n"
                                 f"{cr.log(log)[-3000:] if os.path.exists(log + '.log') else ''}")
        time.sleep(0.5)


def submit(env, workdir: str, *extra: str, tasks: int = 2) -> str:
    cmd = ["sbatch", "--parsable", f"--ntasks={tasks}", f"--output={workdir}.log", "--job-name=sd_func-test",
           SBATCH, *cr.ARGS, *extra, f"--workdir={workdir}"]
    out = subprocess.run(cmd, cwd=runs.REPO, env=env, capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip().split(";")[0]


def done(info: dict) -> bool:
    return info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def two_tasks(slurm, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("slurm_jobs") / "two_tasks")
    t = time.perf_counter()
    job_id = submit(slurm, workdir)
    info = wait_job(slurm, job_id, done, 300, workdir)
    print(f"sbatch --ntasks=2: {time.perf_counter() - t:.1f} s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", cr.log(workdir)[-3000:]
    return workdir


def test_hostnames_expand_as_scontrol_does(slurm):
    for nodelist in ("node[01-03,07],gpu5", "a1,b[8-11]", "r[1-2]n[1,3]", "gpu[098-101]", "localhost"):
        want = _scontrol(slurm, "show", "hostnames", nodelist).split()
        assert distributed.expand_hostnames(nodelist) == want, nodelist


def test_two_tasks_end_where_one_process_ends(two_tasks, one_process):
    text = cr.log(two_tasks)
    assert "global batch 4 over 2 process(es)" in text and cr.steps_run(text) == [(0, cr.STEPS)], text[-3000:]
    runs.assert_matches_one_process(runs.trees(one_process), runs.trees(two_tasks), cr.LR)
    r1, r2 = runs.rows(one_process), runs.rows(two_tasks)
    assert [r["loss"] for r in r2] == pytest.approx([r["loss"] for r in r1], rel=1e-5)
    assert [r["grad_norm"] for r in r2] == pytest.approx([r["grad_norm"] for r in r1], rel=1e-5)


def test_srun_torchrun_per_node_ends_where_two_tasks_end(slurm, two_tasks, tmp_path):
    """The template's other launch: one task per node running `torchrun --nproc_per_node=2`."""
    workdir = str(tmp_path / "torchrun")
    job_id = submit(dict(slurm, SD_FUNC_PROCS_PER_NODE="2"), workdir, tasks=1)
    info = wait_job(slurm, job_id, done, 300, workdir)
    text = cr.log(workdir)
    assert info["JobState"] == "COMPLETED", (info, text[-3000:])
    assert "global batch 4 over 2 process(es)" in text and cr.steps_run(text) == [(0, cr.STEPS)], text[-3000:]
    worst = cr.assert_identical(runs.trees(two_tasks), runs.trees(workdir))
    print(f"srun torchrun --nproc_per_node=2 vs srun --ntasks=2: max abs diff {worst:.1e}")


def test_sigusr1_checkpoints_requeues_and_finishes_identically(slurm, two_tasks, tmp_path):
    workdir = str(tmp_path / "preempted")
    job_id = submit(slurm, workdir, "--config.train.checkpoint_every=3")  # step 1's checkpoint is the stop's
    t = time.perf_counter()
    wait_job(slurm, job_id, lambda i: done(i) or (os.path.exists(workdir + ".log") and
                                                  "sd_func train: starting" in cr.log(workdir)), 300, workdir)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm, check=True, timeout=30)
    info = wait_job(slurm, job_id, lambda i: done(i) or i["Restarts"] == "1" and i["JobState"] == "PENDING",
                    120, workdir)
    assert info["JobState"] == "PENDING", (info, cr.log(workdir)[-3000:])
    print(f"requeued {time.perf_counter() - t:.1f} s after submission ({info['Reason']})")
    # Slurm holds a requeued batch job ~2 minutes (Reason=BeginTime); release it now.
    _scontrol(slurm, "update", f"JobId={job_id}", "StartTime=now")
    info = wait_job(slurm, job_id, done, 300, workdir)
    text = cr.log(workdir)
    print(f"SIGUSR1, requeue, resume: {time.perf_counter() - t:.1f} s")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-3000:])
    first = os.path.join(workdir, "checkpoints", "1")
    assert f"stopped by SIGUSR1 after step 1; checkpoint {first}; requeued Slurm job {job_id}" in text, text[-3000:]
    assert f"sd_func job {job_id} (restart 1)" in text and f"resumed from step 1 ({first})" in text, text[-3000:]
    assert cr.steps_run(text) == [(1, cr.STEPS)], text[-3000:]
    worst = cr.assert_identical(runs.trees(two_tasks), runs.trees(workdir))
    print(f"SIGUSR1 + requeue vs the uninterrupted job: max abs diff {worst:.1e}")


def test_a_failing_rank_fails_the_job_fast_with_the_error_in_the_log(slurm, tmp_path):
    workdir = str(tmp_path / "failing")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "checkpoints"), "w") as fh:  # rank 0's first save cannot make the folder
        fh.write("not a folder")
    t = time.perf_counter()
    job_id = submit(slurm, workdir)
    info = wait_job(slurm, job_id, done, 240, workdir)
    text = cr.log(workdir)
    print(f"failing rank: job {info['JobState']} {info['ExitCode']} after {time.perf_counter() - t:.1f} s "
          f"(RunTime {info['RunTime']})")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, text[-3000:])
    assert "sd_func train: rank 0 of 2 failed: FileExistsError:" in text, text[-3000:]
    assert not cr.steps_run(text)  # it did not run to the end
    h, m, s = (int(x) for x in info["RunTime"].split(":"))
    assert h * 3600 + m * 60 + s < 120, info["RunTime"]  # the collective timeout is 30 min
