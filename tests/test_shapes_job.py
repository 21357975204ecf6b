"""The built-in main job end to end: configs/shapes.py:smoke through run_train.py.

The smoke variant runs every stage of the full job (autoencoder stage with its
scaling factor, UNet + text encoder from the stage's init checkpoint, end-of-run
sampling and scoring) in seconds; then a second start of the same command finds
every stage done and resumes nothing, and run_sample.py draws from the workdir.
"""

import json
import os
import subprocess
import sys

import pytest

from configs import shapes
from sd_func import checkpoint
from sd_func.checkpoint import training as checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")


def _run(*args):
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=900, check=False)
    assert p.returncode == 0, f"{args[0]} failed ({p.returncode}):\n{p.stderr[-4000:]}"
    return p


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("shapes") / "run")
    p = _run("run_train.py", "--config=configs/shapes.py:smoke", f"--workdir={wd}")
    return wd, p.stdout + p.stderr


def test_all_stages_ran(workdir):
    wd, log = workdir
    assert "vae stage: done, latent scaling factor" in log
    assert "prompt accuracy:" in log
    assert os.path.isfile(os.path.join(wd, "vae", "init.safetensors"))
    assert checkpointing.steps(wd)[-1] == 4
    with open(os.path.join(wd, "eval.json")) as fh:
        ev = json.load(fh)
    cfg = shapes.get_config("smoke")
    assert ev["n"] == 6 and 0.0 <= ev["accuracy"] <= 1.0
    assert (ev["sampler"], ev["steps"], ev["guidance_scale"]) == (cfg.sample.sampler, cfg.sample.steps,
                                                                  cfg.sample.guidance_scale)
    assert len(ev["wrong"]) == round(ev["n"] * (1 - ev["accuracy"]))
    assert all(set(w) == {"index", "prompt", "read"} for w in ev["wrong"])
    assert ev["fid_images"] == cfg.eval.fid_images == 8 and (ev["fid"] is None or ev["fid"] > 0)
    assert os.path.getsize(os.path.join(wd, "samples.png")) > 0
    # The trained VAE and its measured scaling factor are what the UNet stage trained on.
    init, init_cfg = checkpoint.load(os.path.join(wd, "vae", "init.safetensors"))
    params, cfg = checkpointing.load_model(wd)
    assert cfg.vae.scaling_factor == init_cfg.vae.scaling_factor != 1.0
    for k, v in init["vae"]["decoder"]["conv_out"].items():
        assert (params["vae"]["decoder"]["conv_out"][k] == v).all()


def test_rerun_is_a_resume_and_sampling_works(workdir, tmp_path):
    wd, _ = workdir
    p = _run("run_train.py", "--config=configs/shapes.py:smoke", f"--workdir={wd}")
    assert "vae stage: step" not in p.stdout + p.stderr  # the finished stage is not redone
    out = str(tmp_path / "out")
    _run("run_sample.py", "--config=configs/shapes.py:smoke", f"--ckpt={wd}",
         "--prompt=a red circle on a blue background", f"--outdir={out}")
    assert os.path.isfile(os.path.join(out, "00000.png")) and os.path.isfile(os.path.join(out, "grid.png"))
