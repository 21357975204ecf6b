"""Aspect-ratio buckets (config.data.buckets) on a folder of tall, square and wide images.

- the "auto" table (about resolution^2 pixels, sides multiples of the step, ratio <= 2) and
  the parser's errors;
- every global batch is one bucket, at its size; batches are a pure function of (seed,
  step): the same from a fresh source (a resume) and split the same over 2 ranks; an epoch
  visits every example once;
- latents precached with buckets: one bucket per shard, read back as bucketed batches;
- a training run (eager) logs each step's bucket; the compiled step takes one graph per
  shape with the recompile limit raised to the number of shapes (10 here, dynamo's
  default is 8).
"""

import json

import pytest
import torch
from PIL import Image

from configs import tiny
from sd_func import data, random
from sd_func.data import buckets, latents
from sd_func.errors import UserError
from sd_func.models import autoencoder, text_encoder
from sd_func.train import checks, loop, optim, step
from sd_func.train import state as train_state

# (width, height) of the images; tiny's resolution 32 with step 8 gives buckets 40x24, 32x32, 24x40
KINDS = {"tall": (48, 80), "square": (40, 40), "wide": (80, 48)}
PER_KIND, BATCH = 8, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("aspect")
    rows = []
    for k, (kind, size) in enumerate(KINDS.items()):
        for i in range(PER_KIND):
            name = f"{kind}{i}.png"
            Image.new("RGB", size, (30 * i, 80 * k, 200)).save(root / name)
            rows.append({"file_name": name, "text": f"a {kind} picture {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cfg(folder):
    cfg = tiny.get_config()
    cfg.data.update(kind="folder", path=str(folder), buckets="auto", bucket_step=8)
    return cfg


def test_auto_table_and_parse():
    assert buckets.auto(512 * 512, 64) == [(640, 384), (576, 448), (512, 512), (448, 576), (384, 640)]
    for h, w in buckets.auto(1024 * 1024, 64):
        assert h % 64 == 0 and w % 64 == 0 and max(h / w, w / h) <= 2 and 0.85 * 1024**2 < h * w <= 1024**2
    cfg = tiny.get_config()
    cfg.data.buckets = "512x768, 512x512"
    assert buckets.resolve(cfg.data) == [(512, 512), (512, 768)]  # H x W, tallest first (by W/H)
    for bad in ("512", "axb", "512x512,512x512"):
        cfg.data.buckets = bad
        with pytest.raises(UserError, match="config.data.buckets"):
            buckets.resolve(cfg.data)
    cfg.data.update(buckets="36x36", kind="folder", path=".")
    cfg.vae.block_out_channels = (32, 32, 32, 32)  # downsampling factor 8
    cfg.vae.down_block_types = cfg.vae.up_block_types = ("DownEncoderBlock2D",) * 4
    with pytest.raises(UserError, match="36x36 is not a multiple"):
        checks.validate(cfg)
    cfg.data.update(buckets="auto", bucket_step=8, kind="shapes")
    with pytest.raises(UserError, match="not 'shapes'"):
        checks.validate(cfg)


def _caption_kind(caption: str) -> str:
    return caption.split()[1]


def test_batches_one_bucket_deterministic_world_invariant(folder):
    cfg = _cfg(folder)
    src = data.make_source(cfg.data, seed=3)
    assert src.buckets == [(40, 24), (32, 32), (24, 40)] and src.counts == [PER_KIND] * 3
    want_kind = {(40, 24): "tall", (32, 32): "square", (24, 40): "wide"}
    per_epoch = 3 * PER_KIND // BATCH
    seen = []
    for s in range(2 * per_epoch):
        b = src.batch(s, BATCH)
        h, w = b["bucket"]
        assert b["images"].shape == (BATCH, 3, h, w)
        assert {_caption_kind(c) for c in b["captions"]} == {want_kind[(h, w)]}
        assert b["index"].tolist() == list(range(s * BATCH, (s + 1) * BATCH))
        seen.append(b["captions"])
        # a fresh source (a resume) and two ranks give the same batch
        again = data.make_source(cfg.data, seed=3).batch(s, BATCH)
        halves = [data.make_source(cfg.data, 3, r, 2).batch(s, BATCH) for r in range(2)]
        assert again["captions"] == b["captions"] and torch.equal(again["images"], b["images"])
        assert halves[0]["captions"] + halves[1]["captions"] == b["captions"]
        assert torch.equal(torch.cat([x["images"] for x in halves]), b["images"])
        assert all(x["bucket"] == (h, w) for x in halves)
    for e in range(2):  # each epoch visits every example once, in a new order
        epoch = [c for batch in seen[e * per_epoch:(e + 1) * per_epoch] for c in batch]
        assert len(set(epoch)) == 3 * PER_KIND
    assert seen[:per_epoch] != seen[per_epoch:]
    assert data.make_source(cfg.data, seed=4).batch(0, BATCH)["captions"] != seen[0] or \
        data.make_source(cfg.data, seed=4).batch(1, BATCH)["captions"] != seen[1]


def test_precached_buckets(folder, tmp_path):
    cfg = _cfg(folder)
    k_vae, k_te = random.split(random.key(0), 2)
    params = {"vae": autoencoder.init(k_vae, cfg.vae), "text_encoder": text_encoder.init(k_te, cfg.text_encoder)}
    out = str(tmp_path / "lat")
    index = latents.precache(params, cfg, out, batch_size=4, shard_size=6)
    assert index["buckets"] == [[40, 24], [32, 32], [24, 40]]
    assert sorted(s["count"] for s in index["shards"]) == [2, 2, 2, 6, 6, 6]
    cfg.data.update(kind="latents", path=out, buckets="")
    src = data.make_source(cfg.data, seed=3)
    images = data.make_source(_cfg(folder).data, seed=3)
    for s in range(6):
        b, ref = src.batch(s, BATCH), images.batch(s, BATCH)
        h, w = b["bucket"]
        assert b["moments"].shape == (BATCH, 8, h // 2, w // 2)  # tiny's VAE halves
        assert b["captions"] == ref["captions"]  # the same schedule as the images it came from
        mean, _ = autoencoder.encode(params["vae"], ref["images"], cfg.vae)
        torch.testing.assert_close(b["moments"][:, :4], mean, rtol=0, atol=1e-5)


def test_training_run_logs_buckets(folder, tmp_path):
    cfg = _cfg(folder)
    cfg.train.update(steps=4, batch_size=BATCH, log_every=1, checkpoint_every=0, lr=1e-4)
    state = loop.train(cfg, str(tmp_path / "run"))
    assert int(state["step"]) == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    src = data.make_source(cfg.data, cfg.seed)
    assert [(r["bucket_height"], r["bucket_width"]) for r in rows] == [src.batch(s, BATCH)["bucket"]
                                                                       for s in range(4)]


def test_compiled_step_one_graph_per_shape():
    """10 shapes > dynamo's default limit of 8: make_step(num_shapes=10) compiles each once."""
    tcfg = tiny.get_config().train
    tcfg.update(compile=True, warmup=0)
    params = {"w": torch.ones(3)}
    lay = optim.layout(params, None)
    tx = optim.from_config(tcfg, lay)
    loss_fn = lambda p, frozen, batch: ((batch["x"].mean(dim=(1, 2)) - p["w"].sum()) ** 2).mean()
    fn = step.make_step(lambda p, f, b: (loss_fn(p, f, b), {}), tx, lay, tcfg, world=1, backend="eager",
                        num_shapes=10)
    st = train_state.init_state(params, tx, lay, ema=True)
    torch._dynamo.reset()
    for k in range(10):
        st, m = fn(st, {}, {"x": torch.full((2, 4, 4 + k), 0.5)})
    assert int(st["step"]) == 10 and torch.isfinite(m["loss"])
    short = step.make_step(lambda p, f, b: (loss_fn(p, f, b), {}), tx, lay, tcfg, world=1, backend="eager")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="recompile"):
        for k in range(10):
            st, _ = short(st, {}, {"x": torch.full((2, 4, 4 + k), 0.5)})


def test_each_built_step_has_its_own_recompile_budget():
    """A process that builds many compiled steps (a notebook, this test suite) must not reach
    dynamo's per-code-object recompile limit of 8 from the graphs of steps built earlier."""
    tcfg = tiny.get_config().train
    tcfg.update(compile=True, warmup=0)
    params = {"w": torch.ones(3)}
    torch._dynamo.reset()
    for k in range(10):  # what a fresh run builds: its own layout, optimizer and loss
        lay = optim.layout(params, None)
        tx = optim.from_config(tcfg, lay)
        loss_fn = lambda p, frozen, batch, k=k: (((batch["x"] - p["w"].sum() - k) ** 2).mean(), {})
        fn = step.make_step(loss_fn, tx, lay, tcfg, world=1, backend="eager")
        st, m = fn(train_state.init_state(params, tx, lay, ema=True), {}, {"x": torch.full((2, 4), 0.5)})
        assert int(st["step"]) == 1 and torch.isfinite(m["loss"])
