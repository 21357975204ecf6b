"""Training runs through run_train.py on real data formats (configs/tiny.py, CPU, gloo).

- a `webdataset` stream (tar shards written here), SIGKILLed after its first checkpoint
  and restarted, ends bit-identical to an uninterrupted run (the stream position is
  part of the checkpoint);
- an image folder whose metadata.jsonl names one corrupt and one missing image trains on
  1 and on 2 processes, and `skipped_samples` in metrics.jsonl adds up to the 2 samples.
"""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

import train_runs as runs
from sd_func.checkpoint import training as checkpointing
from sd_func.data import loader

ARGS = runs.args(log_every=1)
STEPS, TREES = runs.STEPS, runs.TREES
CAPTIONS = ["a red circle on a blue background", "a green square on a white background",
            "a blue triangle on a yellow background", "a white circle on a black background"]


def _run(workdir, *extra, nproc=1):
    p = runs.run(ARGS, workdir, *extra, nproc=nproc)
    return p.stdout + p.stderr


def _png(i: int, size=(40, 36)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40 * i % 256, 90, 255 - 30 * i % 256)).save(buf, format="PNG")
    return buf.getvalue()


_rows, _final_trees = runs.rows, runs.trees


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
    runs.kill_after_checkpoint(ARGS, workdir, *shards)
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
