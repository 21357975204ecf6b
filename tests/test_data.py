"""Data sources: determinism across world sizes, corrupt samples, stream resume, precache."""

import io
import json
import logging
import os
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from configs import tiny
from sd_func import data, random
from sd_func.data import latents, loader, shapes, transforms, webdataset
from sd_func.errors import UserError
from sd_func.models import autoencoder, text_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_cfg(**kw):
    c = dict(kind="shapes", path="", resolution=16, center_crop=True, random_flip=False, num_workers=0)
    c.update(kw)
    return ml_collections.ConfigDict(c)


def assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        else:
            assert a[k] == b[k], k


def concat(batches):
    out = {}
    for k in batches[0]:
        v = [b[k] for b in batches]
        if isinstance(v[0], torch.Tensor):
            out[k] = torch.cat(v)
        else:
            out[k] = sum(v) if k == "skipped" else [x for part in v for x in part]
    return out


def image_bytes(color, size=(20, 12), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------- shapes

def test_shapes_deterministic_and_world_split():
    cfg = data_cfg(resolution=32)
    a = data.make_source(cfg, seed=3).batch(5, 8)
    b = data.make_source(cfg, seed=3).batch(5, 8)
    assert_same_batch(a, b)
    assert a["images"].shape == (8, 3, 32, 32) and a["images"].dtype == torch.float32
    assert a["index"].tolist() == list(range(40, 48)) and a["skipped"] == 0
    assert a["images"].min() >= -1 and a["images"].max() <= 1
    halves = [data.make_source(cfg, 3, rank=r, world=2).batch(5, 8) for r in range(2)]
    assert_same_batch(concat(halves), a)
    c = data.make_source(cfg, seed=4).batch(5, 8)
    assert not torch.equal(a["images"], c["images"])
    threaded = data.make_source(data_cfg(resolution=32, num_workers=2), seed=3)
    for step in (5, 6, 5):   # prefetch of step 6 is used, then a jump back
        assert_same_batch(threaded.batch(step, 8), data.make_source(cfg, 3).batch(step, 8))
    threaded.close()
    gathered = {"ranks": [h.state() for h in (data.make_source(cfg, 3, r, 2) for r in range(2))]}
    data.make_source(cfg, 3).restore(json.loads(json.dumps(gathered)))   # map-style: any world resumes
    with pytest.raises(ValueError, match="cannot restore"):
        data.make_source(cfg, 3).restore({"ranks": [{"kind": "folder"}]})
    with pytest.raises(ValueError, match="divisible"):
        data.make_source(cfg, 3, rank=0, world=3).batch(0, 8)


def test_shapes_captions_palette_geometry():
    assert len(shapes.prompts()) == 90 == len(set(shapes.prompts()))
    seen = set()
    for i in range(1200):
        a = shapes.attributes(0, i)
        assert a["color"] != a["background"]
        assert 12 <= a["half_size"] <= 22
        assert all(abs(c - 32) <= 8 for c in a["center"])
        seen.add(shapes.caption(a["color"], a["shape"], a["background"]))
    assert seen == set(shapes.prompts())
    for i in range(12):
        img, text = shapes.example(0, i)
        color, shape, bg = shapes.parse(text)
        a = shapes.attributes(0, i)
        cx, cy = (int(v) for v in a["center"])
        assert tuple(img[0, 0]) == shapes.COLORS[bg] and tuple(img[-1, -1]) == shapes.COLORS[bg]
        assert tuple(img[cy + 3, cx]) == shapes.COLORS[color]   # below the center: inside all three shapes
        fg, bgc = np.array(shapes.COLORS[color]), np.array(shapes.COLORS[bg])
        t = ((img - bgc) @ (fg - bgc)) / ((fg - bgc) @ (fg - bgc))   # every pixel a blend of the two colors
        assert np.abs(img - (bgc + t[..., None] * (fg - bgc))).max() <= 1.0
        area = t.sum()
        h = a["half_size"]
        expected = {"circle": np.pi * h * h, "square": 4 * h * h, "triangle": 2 * h * h}[shape]
        assert abs(area - expected) / expected < 0.02, (shape, area, expected)
    big, _ = shapes.example(0, 0, resolution=128)
    assert big.shape == (128, 128, 3)
    with pytest.raises(ValueError, match="not 'a"):
        shapes.parse("a violet circle on a red background")  # purple and orange: shapes.NEW_COLORS


# ---------------------------------------------------------------- folder

@pytest.fixture
def image_folder(tmp_path):
    rows = []
    for i in range(7):
        name = f"img{i}.png"
        (tmp_path / name).write_bytes(image_bytes((30 * i, 10, 200), size=(24 + 4 * i, 16)))
        rows.append({"file_name": name, "text": f"caption {i}"})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows.insert(3, {"file_name": "broken.png", "text": "broken"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_folder_corrupt_skipped_counted_and_deterministic(image_folder, caplog):
    cfg = data_cfg(kind="folder", path=str(image_folder), resolution=8, random_flip=True)
    src = data.make_source(cfg, seed=0)
    assert src.num_examples == 8
    with caplog.at_level(logging.WARNING, logger="sd_func.data"):
        batches = [src.batch(s, 4) for s in range(2)]   # global indices 0..7: exactly epoch 0
    epoch = concat(batches)
    assert epoch["skipped"] == 1
    assert "broken.png" in caplog.text
    caps = epoch["captions"]
    assert "broken" not in caps and set(caps) == {f"caption {i}" for i in range(7)}
    assert len(caps) == 8   # the corrupt slot was filled by the next example of the permutation
    assert epoch["images"].shape == (8, 3, 8, 8)
    # same batches in 2 processes, and with worker threads
    for step in range(3):
        whole = data.make_source(cfg, 0).batch(step, 4)
        assert_same_batch(concat([data.make_source(cfg, 0, r, 2).batch(step, 4) for r in range(2)]), whole)
        threaded = data.make_source(data_cfg(kind="folder", path=str(image_folder), resolution=8,
                                             random_flip=True, num_workers=2), 0)
        assert_same_batch(threaded.batch(step, 4), whole)
        threaded.close()
    # another epoch is another order
    order = lambda s: data.make_source(cfg, 0).batch(s, 8)["captions"]
    assert order(0) != order(1)


def test_folder_txt_captions(tmp_path):
    for i in range(3):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / f"{i}.jpg").write_bytes(image_bytes((200, 100, 50 * i), fmt="JPEG"))
        (tmp_path / "sub" / f"{i}.txt").write_text(f"a photo {i}\n")
    src = data.make_source(data_cfg(kind="folder", path=str(tmp_path), resolution=8), seed=1)
    b = src.batch(0, 3)
    assert sorted(b["captions"]) == ["a photo 0", "a photo 1", "a photo 2"] and b["skipped"] == 0


def test_transforms_resize_crop_flip():
    x = np.zeros((10, 20, 3), np.uint8)
    x[:, :10] = 255   # left half white
    img = Image.fromarray(x)
    keys = [loader.example_key(0, i) for i in range(32)]
    centered = transforms.preprocess(img, 6, keys[0], center_crop=True, random_flip=False)
    assert centered.shape == (3, 6, 6)
    assert centered[:, :, 0].min() == 1 and centered[:, :, -1].max() == -1   # white left, black right
    flips = [transforms.preprocess(img, 6, k, center_crop=True, random_flip=True) for k in keys]
    flipped = [bool(torch.equal(f, centered.flip(-1))) for f in flips]
    assert 4 < sum(flipped) < 28 and all(torch.equal(f, centered) for f, fl in zip(flips, flipped) if not fl)
    crops = {tuple(transforms.preprocess(img, 6, k, center_crop=False)[0, 0].tolist()) for k in keys}
    assert len(crops) > 3   # random crops land at different offsets


# ---------------------------------------------------------------- webdataset

def write_shard(path, samples):
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


@pytest.fixture
def shards(tmp_path):
    n = 0
    for s in range(4):
        samples = []
        for j in range(5):
            key = f"s{s}/{n:04d}"
            if (s, j) == (1, 2):
                samples.append((key, {"jpg": b"\xff\xd8\xff\xe0 corrupt jpeg", "txt": b"broken"}))
            elif j % 2:
                files = {"png": image_bytes((n * 9 % 256, 0, 0)), "json": json.dumps({"caption": f"c{n}"}).encode()}
                samples.append((key, files))
            else:
                samples.append((key, {"jpg": image_bytes((0, n * 9 % 256, 0), fmt="JPEG"), "txt": f"c{n}".encode()}))
            n += 1
        write_shard(tmp_path / f"shard-{s:06d}.tar", samples)
    return str(tmp_path / "shard-{000000..000003}.tar")


def test_expand_braces():
    assert webdataset.expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert webdataset.expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]
    assert webdataset.expand_braces("plain.tar") == ["plain.tar"]


def test_webdataset_corrupt_epoch_and_world_split(shards, caplog):
    cfg = data_cfg(kind="webdataset", path=shards, resolution=8)
    src = data.make_source(cfg, seed=0)
    with caplog.at_level(logging.WARNING, logger="sd_func.data"):
        b = concat([src.batch(s, 4) for s in range(5)])   # 19 readable samples + 1 of the next epoch
    assert b["skipped"] == 1 and "s1/0007" in caplog.text
    assert set(b["captions"]) == {f"c{i}" for i in range(20) if i != 7}
    assert b["index"].tolist() == list(range(20)) and b["images"].shape == (20, 3, 8, 8)
    ranks = [data.make_source(cfg, 0, rank=r, world=2).batch(0, 6) for r in range(2)]
    assert ranks[0]["index"].tolist() == [0, 1, 2] and ranks[1]["index"].tolist() == [3, 4, 5]
    shard_of = lambda c: int(c[1:]) // 5
    assert {shard_of(c) for c in ranks[0]["captions"]} <= {0, 2}
    assert {shard_of(c) for c in ranks[1]["captions"]} <= {1, 3}


def test_webdataset_truncated_and_non_tar_shards(tmp_path, caplog):
    samples = [(f"k{i}", {"png": image_bytes((i, 0, 0), size=(64, 64)), "txt": b"t"}) for i in range(4)]
    write_shard(tmp_path / "a.tar", samples)
    raw = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(raw[:5 * 1024 + 100])   # (header + 1 data block) per member: cut in sample 2
    (tmp_path / "b.tar").write_bytes(b"not a tar file at all" * 40)
    decode = lambda offset, files, tf, where: webdataset.decode_sample(files, tf, where, 8, 0, data_cfg())
    with caplog.at_level(logging.WARNING, logger="sd_func.data"):
        got = [ex is not None for _, ex in webdataset.read_shard(str(tmp_path / "a.tar"), 0, decode)]
        assert got == [True, True, False]
        (tmp_path / "c.tar").write_bytes(raw[:6 * 1024 + 100])   # cut in a header: tarfile stops quietly
        got = [ex is not None for _, ex in webdataset.read_shard(str(tmp_path / "c.tar"), 0, decode)]
        assert got == [True, True, False]
        assert [ex is not None for _, ex in webdataset.read_shard(str(tmp_path / "c.tar"), 2, decode)] == [False]
        assert [ex for _, ex in webdataset.read_shard(str(tmp_path / "b.tar"), 0, decode)] == [None]
    assert "b.tar" in caplog.text and "a.tar" in caplog.text
    src = data.make_source(data_cfg(kind="webdataset", path=str(tmp_path / "{a,b}.tar"), resolution=8), 0)
    b = concat([src.batch(s, 2) for s in range(3)])
    assert b["skipped"] >= 2 and len(b["captions"]) == 6


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_state_restore(shards, workers):
    cfg = data_cfg(kind="webdataset", path=shards, resolution=8, random_flip=True, num_workers=workers)
    straight = data.make_source(cfg, seed=1)
    expected = [straight.batch(s, 3) for s in range(9)]   # 27 > 19: crosses an epoch
    straight.close()
    first = data.make_source(cfg, seed=1)
    for s in range(4):
        assert_same_batch(first.batch(s, 3), expected[s])
    state = json.loads(json.dumps(first.state()))
    first.close()
    resumed = data.make_source(cfg, seed=1)
    resumed.restore({"kind": "webdataset", "ranks": [state]})
    for s in range(4, 9):
        assert_same_batch(resumed.batch(s, 3), expected[s])
    with pytest.raises(ValueError, match="step order"):
        resumed.batch(3, 3)
    resumed.close()


# ---------------------------------------------------------------- latents

def test_precache_round_trip(tmp_path):
    cfg = tiny.get_config()
    cfg.data.resolution = 16
    k_vae, k_te = random.split(random.key(0), 2)
    params = {"vae": autoencoder.init(k_vae, cfg.vae), "text_encoder": text_encoder.init(k_te, cfg.text_encoder)}
    out = str(tmp_path / "latents")
    index = latents.precache(params, cfg, out, seed=2, num_examples=10, batch_size=4, shard_size=6)
    assert index["num_examples"] == 10 and [s["count"] for s in index["shards"]] == [6, 4]
    cfg.data.update(kind="latents", path=out)
    src = data.make_source(cfg.data, seed=5)
    # read back equals direct encoding of the same examples (up to float32 rounding: the
    # precache encodes in batches of 4, and a conv's kernel choice may depend on the batch)
    examples = [shapes.ShapesDataset(2, 16).load(i) for i in range(10)]
    images = torch.stack([e["images"] for e in examples])
    moments, context = latents.encode_batch(params, cfg, images, [e["captions"] for e in examples])
    rows = [src.dataset.load(i) for i in range(10)]
    torch.testing.assert_close(torch.stack([r["moments"] for r in rows]), moments, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack([r["context"] for r in rows]), context, rtol=0, atol=1e-5)
    assert [r["captions"] for r in rows] == [e["captions"] for e in examples]
    assert moments.shape == (10, 2 * cfg.vae.latent_channels, 8, 8)
    assert src.empty_context.shape == context.shape[1:]
    # batches visit the epoch's permutation, the same in 1 or 2 processes
    epoch = concat([src.batch(s, 5) for s in range(2)])
    perm = loader.epoch_permutation(5, 0, 10).tolist()
    assert epoch["skipped"] == 0 and epoch["index"].tolist() == list(range(10))
    torch.testing.assert_close(epoch["moments"], moments[perm], rtol=0, atol=1e-5)
    halves = concat([data.make_source(cfg.data, 5, r, 2).batch(1, 6) for r in range(2)])
    assert_same_batch(halves, data.make_source(cfg.data, 5).batch(1, 6))
    with pytest.raises(UserError, match="exists"):
        latents.precache(params, cfg, out, num_examples=1)


def test_precache_command_line(tmp_path):
    """python -m sd_func.data.precache writes a folder the trainer reads; bad input is one line."""
    out = str(tmp_path / "lat")
    cmd = [sys.executable, "-m", "sd_func.data.precache", "--config=configs/tiny.py", f"--out={out}",
           "--num_examples=3", "--batch_size=2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert latents.read_index(out)["num_examples"] == 3
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"precache: error: {out}: exists; remove it or choose another output folder (--out)"]
