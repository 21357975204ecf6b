"""The reference venv for the FID parity tests: pytorch-fid 0.3.0 needs torchvision, which this
project's CPU torch has no build of, so `.ci/run` creates `.ci/ref-venv` (torch 2.14.1,
torchvision 0.29.1, pytorch-fid 0.3.0, scipy) and the tests run pytorch-fid's code there in a
subprocess (tests/reference/pytorch_fid_ref.py) on files they wrote, reading its results back.

`SD_FUNC_FID_REF_PYTHON` names another interpreter with those packages. Without one, the
parity tests skip and say why.
"""

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = os.path.join(REPO, ".ci", "ref-venv", "bin", "python")
SCRIPT = os.path.join(REPO, "tests", "reference", "pytorch_fid_ref.py")


def python() -> str:
    """The reference interpreter, or a pytest skip naming what is missing."""
    exe = os.environ.get("SD_FUNC_FID_REF_PYTHON") or VENV_PYTHON
    if not os.path.isfile(exe):
        pytest.skip(f"no pytorch-fid reference venv at {exe}: run .ci/run (or set SD_FUNC_FID_REF_PYTHON)")
    probe = subprocess.run([exe, "-c", "import pytorch_fid, torchvision, scipy"], capture_output=True, text=True,
                           timeout=120)
    if probe.returncode:
        pytest.skip(f"{exe} cannot import pytorch_fid/torchvision/scipy: {probe.stderr.strip()[-300:]}")
    return exe


def run(folder: str) -> dict:
    """Run pytorch-fid on the files in folder; returns ref_fid.json (features in ref_features.npy)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONNOUSERSITE="1")
    res = subprocess.run([python(), SCRIPT, folder], capture_output=True, text=True, timeout=600, env=env,
                         cwd=folder)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(folder, "ref_fid.json")) as fh:
        return json.load(fh)
