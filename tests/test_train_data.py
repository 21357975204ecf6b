"""Training runs through run_train.py on real data formats (configs/tiny.py, CPU, gloo).

- a `webdataset` stream (tar shards written here), SIGKILLed after its first checkpoint
  and restarted, ends bit-identical to an uninterrupted run (the stream position is
  part of the checkpoint);
- an image folder whose metadata.jsonl names one corrupt and one missing image trains on
  1 and on 2 processes, and `skipped_samples` in metrics.jsonl adds up to the 2 samples.
"""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from PIL import Image

from sd_func import tree
from sd_func.checkpoint import training as checkpointing
from sd_func.data import loader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
ARGS = ["--config=configs/tiny.py", "--config.train.compile=False", f"--config.train.steps={STEPS}",
        "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2",
        "--config.train.log_every=1", "--config.train.batch_size=4", "--config.train.lr=1e-4"]
TREES = ("params", "ema", "opt", "state", "frozen")
CAPTIONS = ["a red circle on a blue background", "a green square on a white background",
            "a blue triangle on a yellow background", "a white circle on a black background"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    env.pop("SD_FUNC_TRACEBACK", None)
    return env


def _cmd(workdir, *extra, nproc=1):
    launch = [sys.executable, "run_train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "run_train.py"]
    return [*launch, *ARGS, *extra, f"--workdir={workdir}"]


def _run(workdir, *extra, nproc=1):
    p = subprocess.run(_cmd(workdir, *extra, nproc=nproc), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600, check=False)
    assert p.returncode == 0, f"run_train.py failed ({p.returncode}):\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def _png(i: int, size=(40, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40 * i % 256, 90, 255 - 30 * i % 256)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _final_trees(workdir):
    ckpt = os.path.join(workdir, "checkpoints", str(STEPS))
    return {n: tree.flatten(checkpointing.load_tree(ckpt, n)) for n in TREES}


# ---------------------------------------------------------------- webdataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards of 5 samples: 4 steps x batch 4 read past the end, into the stream's 2nd epoch."""
    folder = tmp_path_factory.mktemp("shards")
    n = 0
    for s in range(3):
        with tarfile.open(folder / f"part-{s:04d}.tar", "w") as tf:
            for _ in range(5):
                for ext, payload in (("png", _png(n)), ("txt", CAPTIONS[n % 4].encode())):
                    info = tarfile.TarInfo(f"{n:05d}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
                n += 1
    return ["--config.data.kind=webdataset", f"--config.data.path={folder}/part-{{0000..0002}}.tar",
            "--config.data.num_workers=1"]


def test_webdataset_kill_and_resume_is_identical(shards, tmp_path):
    reference = str(tmp_path / "reference")
    _run(reference, *shards)
    workdir = str(tmp_path / "killed")
    first = os.path.join(workdir, "checkpoints", "1")
    proc = subprocess.Popen(_cmd(workdir, *shards), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
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
    done = checkpointing.steps(workdir)
    assert done and done[-1] < STEPS, done
    meta = checkpointing.read_meta(checkpointing.latest(workdir))
    assert meta["data"]["ranks"][0]["kind"] == "webdataset"  # a stream position, restored below
    log = _run(workdir, *shards)
    assert f"sd_func train: resumed from step {done[-1]} " in log
    assert f"sd_func train: ran {STEPS - done[-1]} steps" in log
    want, got = _final_trees(reference), _final_trees(workdir)
    for name in TREES:
        assert list(got[name]) == list(want[name]), name
        bad = [k for k in want[name] if not torch.equal(got[name][k], want[name][k])]
        assert not bad, f"{name}: {bad[:5]}"
    assert [r["loss"] for r in _rows(workdir)] == [r["loss"] for r in _rows(reference)]


# ---------------------------------------------------------------- image folder with bad entries


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """8 metadata rows, one epoch of 2 steps x 4: one corrupt and one missing image.

    A corrupt example is replaced by the next one of the epoch's permutation (data/loader.py),
    so two bad entries in a row would count the second twice; they sit at permutation
    positions 0 and 3 of the run's seed (configs/tiny.py: 0), each skipped exactly once.
    """
    folder = tmp_path_factory.mktemp("images")
    perm = loader.epoch_permutation(0, 0, 8).tolist()
    corrupt, missing = perm[0], perm[3]
    rows = []
    for i in range(8):
        name = f"img{i}.png"
        if i == corrupt:
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        elif i != missing:
            (folder / name).write_bytes(_png(i))
        rows.append({"file_name": name, "text": CAPTIONS[i % 4]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not (folder / f"img{missing}.png").exists()
    return ["--config.data.kind=folder", f"--config.data.path={folder}", "--config.data.num_workers=0",
            "--config.train.steps=2"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_corrupt_and_missing_images_are_counted(bad_folder, tmp_path, nproc):
    workdir = str(tmp_path / f"n{nproc}")
    log = _run(workdir, *bad_folder, nproc=nproc)
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    assert sum(r["skipped_samples"] for r in rows) == 2, rows
    assert "unreadable data sample(s) skipped" in log
