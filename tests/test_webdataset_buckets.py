"""Aspect-ratio buckets on webdataset tar shards (per-bucket buffers, sd_func.data.webdataset).

- each step's bucket is drawn from (seed, step): every batch is one bucket at its size, with
  the images of that aspect, and the bucket sequence is the same on 1 and on 2 ranks;
- a resume from a saved state() (stream positions + buffer contents) gives the same next
  batches as an uninterrupted source (also with prefetch threads);
- the buffers stay within their bound, dropping the oldest with a counted warning.
"""

import json
import logging

import ml_collections
import pytest
from test_data import assert_same_batch, image_bytes, write_shard

from configs import tiny
from sd_func import data
from sd_func.errors import UserError
from sd_func.train import loop

# (width, height); resolution 32 with step 8 gives buckets (H, W) 40x24, 32x32, 24x40
KINDS = {"tall": (48, 80), "square": (40, 40), "wide": (80, 48)}
BUCKET_OF = {"tall": (40, 24), "square": (32, 32), "wide": (24, 40)}
NAMES = list(KINDS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root, n = tmp_path_factory.mktemp("wds_buckets"), 0
    for s in range(4):
        samples = []
        for _ in range(12):
            kind = NAMES[(n * 7 + s) % 3]
            png = image_bytes((n * 5 % 256, 40 * s, 200), size=KINDS[kind])
            samples.append((f"s{s}/{n:04d}", {"png": png, "txt": f"{kind} {n}".encode()}))
            n += 1
        write_shard(root / f"shard-{s}.tar", samples)
    return str(root / "shard-{0..3}.tar")


def _cfg(path, **kw):
    c = dict(kind="webdataset", path=path, resolution=32, center_crop=False, random_flip=True, num_workers=0,
             buckets="auto", bucket_step=8, bucket_weights="", bucket_buffer=8, bucket_estimate=256)
    c.update(kw)
    return ml_collections.ConfigDict(c)


def _check(batch, b):
    h, w = batch["bucket"]
    assert batch["images"].shape == (b, 3, h, w)
    assert {BUCKET_OF[c.split()[0]] for c in batch["captions"]} == {(h, w)}


def test_one_bucket_per_batch_same_on_two_ranks(shards):
    cfg = _cfg(shards)
    one = data.make_source(cfg, seed=5)
    assert one.buckets == [(40, 24), (32, 32), (24, 40)] and one.weights == [16.0, 16.0, 16.0]
    seq = []
    for s in range(8):
        batch = one.batch(s, 4)
        _check(batch, 4)
        seq.append(batch["bucket"])
    assert len(set(seq)) == 3
    ranks = [data.make_source(cfg, seed=5, rank=r, world=2) for r in range(2)]
    for s in range(8):
        parts = [src.batch(s, 4) for src in ranks]
        for r, part in enumerate(parts):
            _check(part, 2)
            assert part["bucket"] == seq[s] and part["index"].tolist() == [4 * s + 2 * r, 4 * s + 2 * r + 1]
    assert [data.make_source(cfg, seed=6).batch(s, 4)["bucket"] for s in range(8)] != seq  # the seed matters
    for bad in ("1,2", "a,b,c", "0,0,0"):
        with pytest.raises(UserError, match="bucket_weights"):
            data.make_source(_cfg(shards, bucket_weights=bad), seed=5)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_restores_buffers_exactly(shards, workers):
    cfg = _cfg(shards, num_workers=workers, bucket_weights="1,2,1")
    straight = data.make_source(cfg, seed=2)
    expected = [straight.batch(s, 3) for s in range(14)]   # 42 of 48 samples read at least: crosses an epoch
    straight.close()
    first = data.make_source(cfg, seed=2)
    for s in range(5):
        assert_same_batch(first.batch(s, 3), expected[s])
    state = json.loads(json.dumps(first.state()))
    first.close()
    assert sum(map(len, state["buffers"])) > 0   # the resume has buffered examples to bring back
    resumed = data.make_source(cfg, seed=2)
    resumed.restore({"kind": "webdataset", "ranks": [state]})
    for s in range(5, 14):
        assert_same_batch(resumed.batch(s, 3), expected[s])
    resumed.close()


def test_buffer_bound_drops_oldest_with_warning(shards, caplog):
    cfg = _cfg(shards, bucket_weights="0,0,1", bucket_buffer=3)   # only "wide" is drawn: the others pile up
    src = data.make_source(cfg, seed=1)
    with caplog.at_level(logging.WARNING, logger="sd_func.data"):
        for s in range(6):
            batch = src.batch(s, 2)
            assert batch["bucket"] == (24, 40)
            _check(batch, 2)
            assert max(map(len, src.buffers)) <= 3
    state = src.state()
    assert [len(b) for b in state["buffers"]][:2] == [3, 3] and "dropped 1 samples so far" in caplog.text
    assert state["dropped"] == state["streams"][0]["consumed"] - 6 * 2 - sum(map(len, state["buffers"]))
    roomy = data.make_source(_cfg(shards, bucket_weights="0,0,1", bucket_buffer=100), seed=1)
    for s in range(6):
        roomy.batch(s, 2)
    kept = roomy.state()
    assert kept["dropped"] == 0
    assert [b[-3:] for b in kept["buffers"][:2]] == state["buffers"][:2]   # the newest kept, the oldest dropped


def test_training_run_resumes_bucketed_stream(shards, tmp_path):
    cfg = tiny.get_config()
    cfg.data.update(_cfg(shards, bucket_weights="1,2,1"))
    cfg.train.update(steps=2, batch_size=4, log_every=1, checkpoint_every=2, lr=1e-4)
    loop.train(cfg, str(tmp_path / "run"))   # saves the stream positions and buffers at step 2
    cfg.train.steps = 4
    assert int(loop.train(cfg, str(tmp_path / "run"))["step"]) == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    src = data.make_source(cfg.data, cfg.seed)
    assert [(r["bucket_height"], r["bucket_width"]) for r in rows][-4:] == [src.batch(s, 4)["bucket"]
                                                                            for s in range(4)]
