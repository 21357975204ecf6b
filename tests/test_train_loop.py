"""The training loop end to end through run_train.py on configs/tiny.py (CPU, gloo).

One uninterrupted reference run serves three checks: its workdir layout (metrics,
kept checkpoints, the optimizer state's per-path trees), a run SIGKILLed right after a
checkpoint and restarted (with a partial temporary checkpoint planted, as a crash
during a save leaves) that logs its resume, runs only the remaining steps and ends
bit-identical to it, and a 2-process torchrun run matching it (to the bounds derived in
test_two_processes_match_one). Compile is off except in one run, whose step-2 metrics
must match the eager reference. Bad config values fail in one line before any model.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_runs as runs
from sd_func import backend, tree
from sd_func.checkpoint import training as checkpointing
from sd_func.errors import UserError
from sd_func.train import checks, loop

ARGS = runs.args(log_every=2)
STEPS, TREES = runs.STEPS, runs.TREES


def _run(workdir, *extra, nproc=1, check=True):
    return runs.run(ARGS, workdir, *extra, nproc=nproc, check=check)


_trees, _rows = runs.trees, runs.rows


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
    assert sorted(meta["files"]) == sorted(TREES) and meta["format"] == "sd_func.train/2"
    # The optimizer state: AdamW's count and its moments per parameter path (no fp16 scale).
    opt = _trees(reference, STEPS)["opt"]
    params = _trees(reference, STEPS)["params"]
    assert sorted(opt) == sorted(["adamw/count"] + [f"adamw/{m}/{k}" for m in ("mu", "nu") for k in params])
    assert int(opt["adamw/count"]) == STEPS and list(_trees(reference, STEPS)["state"]) == ["step"]
    # The sampling view: EMA UNet + frozen VAE and text encoder, and the stored config.
    params, cfg = checkpointing.load_model(reference)
    ema = tree.flatten(checkpointing.load_tree(checkpointing.latest(reference), "ema"))
    assert sorted(params) == ["text_encoder", "unet", "vae"]
    got = tree.flatten(params["unet"])
    assert all(torch.equal(got[k], ema[f"unet/{k}"]) for k in got)
    assert cfg.unet.block_out_channels == (32, 64) and cfg.train.steps == STEPS


def test_sigkill_after_checkpoint_resumes_identically(reference, tmp_path):
    workdir = str(tmp_path / "killed")
    t = time.perf_counter()
    assert runs.kill_after_checkpoint(ARGS, workdir) == -signal.SIGKILL
    done = checkpointing.steps(workdir)
    assert done and done[-1] < STEPS, done
    # A save interrupted by a crash leaves a temporary folder: it must be ignored and removed.
    partial = os.path.join(workdir, "checkpoints", f"{checkpointing.TMP_PREFIX}{STEPS}-1")
    os.makedirs(partial)
    with open(os.path.join(partial, "params.safetensors"), "wb") as fh:
        fh.write(b"\x00" * 100)
    assert checkpointing.latest(workdir) == os.path.join(workdir, "checkpoints", str(done[-1]))
    log = _run(workdir)
    log = log.stdout + log.stderr
    print(f"killed after step {done[-1]}, resumed: {time.perf_counter() - t:.1f} s")
    # The restart resumed (it did not start over: a from-scratch rerun ends identical too,
    # the runs being deterministic) and executed only the remaining steps.
    assert f"sd_func train: resumed from step {done[-1]} " in log, log[-2000:]
    assert f"sd_func train: ran {STEPS - done[-1]} steps, {done[-1]} -> {STEPS}" in log, log[-2000:]
    assert not os.path.exists(partial)
    want, got = _trees(reference, STEPS), _trees(workdir, STEPS)
    for name in TREES:
        assert list(got[name]) == list(want[name]), name
        bad = [k for k in want[name] if not torch.equal(got[name][k], want[name][k])]
        assert not bad, f"{name}: {bad[:5]}"
    assert [r["step"] for r in _rows(workdir)] == [2, 4]  # rows past the checkpoint were dropped


LR = 1e-4  # ARGS' config.train.lr (constant, no warmup in configs/tiny.py)


def test_two_processes_match_one(reference, tmp_path):
    """2 ranks x batch 2 == 1 process x batch 4, to the precision each quantity allows.

    The gradient (AdamW's moments mu, nu are its running averages) differs only by float32
    summation order: 2 per-rank convolutions over 2 examples plus an all-reduce vs one over
    4 (measured: 6e-7 of the largest moment). The params cannot be held to that: AdamW
    moves each entry by lr * m/(sqrt(v) + eps), whose sensitivity to the gradient is up to
    lr/eps. The step-1 gradient of ~50 of the 793k entries is at rounding level (|g| ~
    1e-9 < eps = 1e-8, after clipping), so the order-dependent difference |dg| ~ 1e-9 moves
    them by up to ~0.1 * lr (measured: 1.07e-5 at lr 1e-4, on an entry with g = -1.9e-9 in
    one run and -5.3e-10 in the other), while entries with |g| >> eps agree to ~1e-9. So:
    moments to 1e-5 relative; params and EMA to lr / 4 per entry (a full sign flip of a
    rounding-level step would be ~lr) and to lr / 100 in RMS (measured 2e-4 * lr). A wrong
    split, a missing all-reduce or a sum instead of a mean breaks the moment or loss checks
    by orders of magnitude (Adam being scale-invariant, a sum would hardly move the params).
    """
    workdir = str(tmp_path / "two")
    t = time.perf_counter()
    _run(workdir, nproc=2)
    print(f"torchrun 2 processes: {time.perf_counter() - t:.1f} s")
    runs.assert_matches_one_process(_trees(reference, STEPS), _trees(workdir, STEPS), LR)
    meta = checkpointing.read_meta(checkpointing.latest(workdir))
    assert meta["world"] == 2 and len(meta["data"]["ranks"]) == 2
    r1, r2 = _rows(reference), _rows(workdir)
    assert [r["loss"] for r in r2] == pytest.approx([r["loss"] for r in r1], rel=1e-5)
    assert [r["grad_norm"] for r in r2] == pytest.approx([r["grad_norm"] for r in r1], rel=1e-5)


def _tiny(**train):
    from configs import tiny
    cfg = tiny.get_config()
    cfg.train.update({"compile": False, "batch_size": 4, "lr": 1e-4, **train})
    return cfg


def test_compiled_loop_resumes_and_matches_eager(reference, tmp_path):
    # The loop with the compiled step (aot_eager: inductor's single graph without codegen),
    # resuming an eager run's checkpoint: one trace, on restored state.
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
    cfg = _tiny(steps=STEPS + 1)
    cfg.unet.block_out_channels = (32, 32)
    with pytest.raises(ValueError, match=r"unet.block_out_channels: checkpoint \[32, 64\], config \[32, 32\]"):
        loop.train(cfg, reference)
    assert checkpointing.steps(reference) == [3, 4]


def test_divergence_stops_with_a_clear_error(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(backend, "set_matmul_precision", lambda p: calls.append(p))
    cfg = _tiny(steps=3, lr=1e38, log_every=1, checkpoint_every=0)
    with pytest.raises(checks.TrainingDiverged, match=r"training diverged at step 1: param_norm=inf"):
        loop.train(cfg, str(tmp_path))
    assert checkpointing.steps(str(tmp_path)) == []
    assert issubclass(checks.TrainingDiverged, UserError)  # run_train.py prints it as one line
    assert calls == ["fp32"]  # the loop sets the process-wide precision once, at start


@pytest.mark.parametrize("extra, env, message", [
    ([], {}, "--workdir is required"),
    (["--config.train.no_such_field=1", "--workdir=WORKDIR"], {}, "--config.train.no_such_field: no such field"),
    (["--workdir=WORKDIR"], {"WORLD_SIZE": "3"}, "not divisible by the world size 3"),
    (["--workdir=WORKDIR", "--config.data.kind=folder", "--config.data.path=/nonexistent/images"], {},
     "is not a folder"),
    # Bad values are caught by train.checks.validate before anything is built or read.
    (["--workdir=WORKDIR", "--config.train.lr=0"], {}, "config.train.lr=0.0: expected a number > 0"),
    (["--workdir=WORKDIR", "--config.train.lr=-1"], {}, "config.train.lr=-1.0: expected a number > 0"),
    (["--workdir=WORKDIR", "--config.train.steps=-5"], {}, "config.train.steps=-5: expected an integer >= 0"),
])
def test_bad_input_is_one_line(tmp_path, extra, env, message):
    workdir = tmp_path / "w"
    extra = [a.replace("WORKDIR", str(workdir)) for a in extra]
    p = subprocess.run([sys.executable, "run_train.py", *ARGS, *extra], cwd=runs.REPO, env=dict(runs.env(), **env),
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("run_train.py: error:") and message in lines[0], p.stderr
    # Stopped before any model was built: no start-up line, and no file written.
    assert "sd_func train:" not in p.stdout + p.stderr
    assert not workdir.exists() or not os.listdir(workdir)
