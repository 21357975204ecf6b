"""Helpers for the tests that train through run_train.py as a user would: a subprocess per run.

`args(log_every)` is the tiny run they share (configs/tiny.py, STEPS eager steps of 4
images, a checkpoint every step); `run` starts one to the end, `kill_after_checkpoint`
SIGKILLs one as soon as its first checkpoint folder exists, `trees` / `rows` read
what a run left in its workdir, and `assert_matches_one_process` compares the trees of
an N-process run with a 1-process one (see tests/test_train_loop.py::test_two_processes_match_one).
"""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from sd_func import tree
from sd_func.checkpoint import training as checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TREES = ("params", "ema", "opt", "state", "frozen")


def args(log_every: int) -> list[str]:
    return ["--config=configs/tiny.py", "--config.train.compile=False", f"--config.train.steps={STEPS}",
            "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2",
            f"--config.train.log_every={log_every}", "--config.train.batch_size=4", "--config.train.lr=1e-4"]


ARGS_SHARDED = [*args(log_every=1), "--config.train.shard_optimizer=True", "--config.train.weight_decay=0.1"]


def env() -> dict:
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    out.pop("SD_FUNC_TRACEBACK", None)
    for k in [k for k in out if k.startswith(("SLURM_", "TORCHELASTIC_"))]:  # e.g. CI inside a Slurm job
        out.pop(k)
    return out


def cmd(base: list[str], workdir: str, *extra, nproc: int = 1) -> list[str]:
    launch = [sys.executable, "run_train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "run_train.py"]
    return [*launch, *base, *extra, f"--workdir={workdir}"]


def run(base: list[str], workdir: str, *extra, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd(base, workdir, *extra, nproc=nproc), cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=600, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"run_train.py failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def torchrun(script: str, nproc: int, *script_args, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=N script args`; asserts exit 0."""
    e = dict(env(), PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(script), *map(str, script_args)]
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def kill_after_checkpoint(base: list[str], workdir: str, *extra) -> int:
    """Start a run and SIGKILL it once checkpoints/1 exists; returns its exit status."""
    first = os.path.join(workdir, "checkpoints", "1")
    proc = subprocess.Popen(cmd(base, workdir, *extra), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while not os.path.isdir(first):
            if proc.poll() is not None:
                raise AssertionError(f"run ended before its first checkpoint:\n{proc.stderr.read()[-4000:]}")
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    return proc.returncode


def trees(workdir: str, step: int = STEPS) -> dict:
    ckpt = os.path.join(workdir, "checkpoints", str(step))
    return {n: tree.flatten(checkpointing.load_tree(ckpt, n)) for n in TREES}


def rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def assert_matches_one_process(want: dict, got: dict, lr: float) -> None:
    """An N-process run's trees vs 1 process: AdamW's moments to 1e-5 of the largest, the
    step count exactly, params and EMA to lr / 4 per entry and lr / 100 in RMS (the bounds
    and why: tests/test_train_loop.py::test_two_processes_match_one)."""
    for name in ("mu", "nu"):
        keys = [k for k in want["opt"] if k.startswith(f"adamw/{name}/")]
        err = max((got["opt"][k] - want["opt"][k]).abs().max().item() for k in keys)
        scale = max(want["opt"][k].abs().max().item() for k in keys)
        print(f"{name}: max abs diff N vs 1 process {err:.2e} ({err / scale:.1e} of the largest)")
        assert err <= 1e-5 * scale, (name, err, scale)
    assert torch.equal(got["opt"]["adamw/count"], want["opt"]["adamw/count"])
    for name in ("params", "ema"):
        diff = torch.cat([(got[name][k] - want[name][k]).reshape(-1) for k in want[name]])
        err, rms = diff.abs().max().item(), diff.square().mean().sqrt().item()
        print(f"{name}: max abs diff N vs 1 process {err:.2e} ({err / lr:.3f} lr), rms {rms / lr:.1e} lr")
        assert err < lr / 4 and rms < lr / 100, (name, err, rms)
