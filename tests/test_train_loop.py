"""The training loop end to end through run_train.py on configs/tiny.py (CPU, gloo).

One uninterrupted reference run serves three checks: its workdir layout (metrics,
kept checkpoints), a run SIGKILLed right after a checkpoint and restarted (with a
partial temporary checkpoint planted, as a crash during a save leaves) ending
bit-identical to it, and a 2-process torchrun run ending within 1e-5 of it. Compile
is off except in one run, whose step-2 metrics must match the eager reference.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sd_func import tree
from sd_func.checkpoint import training as checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
ARGS = ["--config=configs/tiny.py", "--config.train.compile=False", f"--config.train.steps={STEPS}",
        "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2",
        "--config.train.log_every=2", "--config.train.batch_size=4", "--config.train.lr=1e-4"]
TREES = ("params", "ema", "opt", "state", "frozen")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    env.pop("SD_FUNC_TRACEBACK", None)
    return env


def _cmd(workdir, *extra, nproc=1):
    launch = [sys.executable, "run_train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "run_train.py"]
    return [*launch, *ARGS, *extra, f"--workdir={workdir}"]


def _run(workdir, *extra, nproc=1, check=True):
    p = subprocess.run(_cmd(workdir, *extra, nproc=nproc), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"run_train.py failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def _trees(workdir, step):
    ckpt = os.path.join(workdir, "checkpoints", str(step))
    return {n: tree.flatten(checkpointing.load_tree(ckpt, n)) for n in TREES}


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("train") / "reference")
    t = time.perf_counter()
    _run(workdir, "--config.train.sample_every=4")
    print(f"reference run: {time.perf_counter() - t:.1f} s")
    return workdir


def test_workdir_layout(reference):
    rows = _rows(reference)
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("loss", "grad_norm", "param_norm", "update_norm", "lr", "skipped_steps",
                "skipped_samples", "images_per_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert all(r["skipped_samples"] == 0.0 and r["lr"] == pytest.approx(1e-4) for r in rows)
    assert checkpointing.steps(reference) == [3, 4]  # keep_checkpoints=2 of 1, 2, 3, 4
    assert os.listdir(os.path.join(reference, "samples")) == ["4.png"]  # sample_every=4: EMA grid
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(reference, "tensorboard")))
    meta = checkpointing.read_meta(checkpointing.latest(reference))
    assert meta["step"] == STEPS and meta["data"] == {"ranks": [{"kind": "shapes"}]}
    assert meta["config"]["train"]["batch_size"] == 4
    assert sorted(meta["files"]) == sorted(TREES)
    # The sampling view: EMA UNet + frozen VAE and text encoder, and the stored config.
    params, cfg = checkpointing.load_model(reference)
    ema = tree.flatten(checkpointing.load_tree(checkpointing.latest(reference), "ema"))
    assert sorted(params) == ["text_encoder", "unet", "vae"]
    got = tree.flatten(params["unet"])
    assert all(torch.equal(got[k], ema[f"unet/{k}"]) for k in got)
    assert cfg.unet.block_out_channels == (32, 64) and cfg.train.steps == STEPS


def test_sigkill_after_checkpoint_resumes_identically(reference, tmp_path):
    workdir = str(tmp_path / "killed")
    first = os.path.join(workdir, "checkpoints", "1")
    t = time.perf_counter()
    proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
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
    assert proc.returncode == -signal.SIGKILL
    done = checkpointing.steps(workdir)
    assert done and done[-1] < STEPS, done
    # A save interrupted by a crash leaves a temporary folder: it must be ignored and removed.
    partial = os.path.join(workdir, "checkpoints", f"{checkpointing.TMP_PREFIX}{STEPS}-1")
    os.makedirs(partial)
    with open(os.path.join(partial, "params.safetensors"), "wb") as fh:
        fh.write(b"\x00" * 100)
    assert checkpointing.latest(workdir) == os.path.join(workdir, "checkpoints", str(done[-1]))
    _run(workdir)
    print(f"killed after step {done[-1]}, resumed: {time.perf_counter() - t:.1f} s")
    assert not os.path.exists(partial)
    want, got = _trees(reference, STEPS), _trees(workdir, STEPS)
    for name in TREES:
        assert list(got[name]) == list(want[name]), name
        bad = [k for k in want[name] if not torch.equal(got[name][k], want[name][k])]
        assert not bad, f"{name}: {bad[:5]}"
    assert [r["step"] for r in _rows(workdir)] == [2, 4]  # rows past the checkpoint were dropped


def test_two_processes_match_one(reference, tmp_path):
    workdir = str(tmp_path / "two")
    t = time.perf_counter()
    _run(workdir, nproc=2)
    print(f"torchrun 2 processes: {time.perf_counter() - t:.1f} s")
    want, got = _trees(reference, STEPS), _trees(workdir, STEPS)
    for name in ("params", "ema"):
        err = max((got[name][k] - want[name][k]).abs().max().item() for k in want[name])
        print(f"{name}: max abs diff 2 vs 1 process {err:.2e}")
        assert err < 1e-5, (name, err)
    meta = checkpointing.read_meta(checkpointing.latest(workdir))
    assert meta["world"] == 2 and len(meta["data"]["ranks"]) == 2
    r1, r2 = _rows(reference), _rows(workdir)
    assert [r["loss"] for r in r2] == pytest.approx([r["loss"] for r in r1], rel=1e-4)


def _tiny(**train):
    from configs import tiny
    cfg = tiny.get_config()
    cfg.train.update({"compile": False, "batch_size": 4, "lr": 1e-4, **train})
    return cfg


def test_compiled_loop_resumes_and_matches_eager(reference, tmp_path):
    # The loop with the compiled step (aot_eager: inductor's single graph without codegen),
    # resuming an eager run's checkpoint: one trace, on restored state.
    from sd_func.train import loop
    workdir = str(tmp_path / "compiled")
    t = time.perf_counter()
    loop.train(_tiny(steps=1, log_every=2), workdir)
    loop.train(_tiny(compile=True, steps=2, log_every=2), workdir, compile_backend="aot_eager")
    print(f"eager 1 step + compiled (aot_eager) 1 step, in process: {time.perf_counter() - t:.1f} s")
    assert checkpointing.steps(workdir) == [1, 2]
    got, want = _rows(workdir)[-1], _rows(reference)[0]
    assert got["step"] == want["step"] == 2
    for k in ("grad_norm", "param_norm", "update_norm"):  # "loss": resumed rows average step 2 only
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k


@pytest.mark.slow  # inductor's C++ codegen of the whole step: ~6 min of CPU on a 2-core machine
def test_compiled_run_matches_eager(reference, tmp_path):
    workdir = str(tmp_path / "compiled")
    t = time.perf_counter()
    _run(workdir, "--config.train.compile=True", "--config.train.steps=2")
    print(f"compiled 2-step run: {time.perf_counter() - t:.1f} s")
    got, want = _rows(workdir)[0], _rows(reference)[0]
    assert got["step"] == want["step"] == 2
    for k in ("loss", "grad_norm", "param_norm", "update_norm"):
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k


def test_architecture_change_is_an_error(reference):
    from sd_func.train import loop
    cfg = _tiny(steps=STEPS + 1)
    cfg.unet.block_out_channels = (32, 32)
    with pytest.raises(ValueError, match=r"unet.block_out_channels: checkpoint \[32, 64\], config \[32, 32\]"):
        loop.train(cfg, reference)
    assert checkpointing.steps(reference) == [3, 4]


def test_divergence_stops_with_a_clear_error(tmp_path):
    from sd_func.train import loop
    cfg = _tiny(steps=3, lr=1e38, log_every=1, checkpoint_every=0)
    with pytest.raises(FloatingPointError, match=r"training diverged at step 1: param_norm=inf"):
        loop.train(cfg, str(tmp_path))
    assert checkpointing.steps(str(tmp_path)) == []


@pytest.mark.parametrize("extra, env, message", [
    ([], {}, "--workdir is required"),
    (["--config.train.no_such_field=1", "--workdir=WORKDIR"], {}, "--config.train.no_such_field: no such field"),
    (["--workdir=WORKDIR"], {"WORLD_SIZE": "3"}, "not divisible by the world size 3"),
    (["--workdir=WORKDIR", "--config.data.kind=folder", "--config.data.path=/nonexistent/images"], {},
     "is not a folder"),
])
def test_bad_input_is_one_line(tmp_path, extra, env, message):
    extra = [a.replace("WORKDIR", str(tmp_path / "w")) for a in extra]
    p = subprocess.run([sys.executable, "run_train.py", *ARGS, *extra], cwd=REPO, env=dict(_env(), **env),
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("run_train.py: error:") and message in lines[0], p.stderr
