"""Encode a dataset once with the frozen VAE and text encoder (the latents fast path).

  python -m sd_func.data.precache --config=configs/txt2img.py --ckpt=PATH --out=DIR \
      [--num_examples=N] [--batch_size=32] [--shard_size=4096] [--dtype=float32]

reads config.data (folder, webdataset, or shapes, which needs --num_examples) once,
in its natural order, with its transforms (crop, flip: frozen at this point, as
in NeMo's and MLPerf's precached training), and writes the latents folder that
`config.data.kind = "latents"` reads (format in latents.py). Without --ckpt the
models are random-initialised from the config (for tests and smoke runs).
Corrupt samples are skipped, counted in index.json and logged.
"""

import json
import os
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd_func.data import folder, latents, loader, shapes, webdataset
from sd_func.models import autoencoder, text_encoder, tokenizer


def examples_once(cfg_data, seed: int, num_examples: int | None = None):
    """Yield (example, skipped before it) over the dataset once, in its natural order."""
    kind = cfg_data.kind
    if kind == "shapes":
        if not num_examples:
            raise ValueError("precache: the shapes data is infinite; pass --num_examples")
        ds = shapes.ShapesDataset(seed, cfg_data.resolution)
        for i in range(num_examples):
            yield ds.load(i), 0
    elif kind == "folder":
        ds = folder.FolderDataset(cfg_data.path, cfg_data.resolution, cfg_data.get("center_crop", True),
                                  cfg_data.get("random_flip", False))
        yield from _readable((ds.load(i, loader.example_key(seed, i)) for i in range(ds.num_examples)),
                             num_examples)
    elif kind == "webdataset":
        def stream():
            for shard in webdataset.expand_braces(cfg_data.path):
                def decode(offset, files, tf, where, _shard=shard):
                    k = webdataset.sample_key(seed, _shard, 0, offset)
                    return webdataset.decode_sample(files, tf, where, cfg_data.resolution, k, cfg_data)
                for _, ex in webdataset.read_shard(shard, 0, decode):
                    yield ex
        yield from _readable(stream(), num_examples)
    else:
        raise ValueError(f"precache: config.data.kind must be shapes, folder or webdataset, got {kind!r}")


def _readable(items, limit):
    skipped, n = 0, 0
    for ex in items:
        if ex is None:
            skipped += 1
            continue
        yield ex, skipped
        skipped, n = 0, n + 1
        if limit and n >= limit:
            return


@torch.no_grad()
def encode_batch(params: dict, cfg, images: torch.Tensor, captions: list[str], device=None):
    """(moments [b, 2C, h, w], context [b, L, D]) of a batch, as the trainer would compute them."""
    p_vae, p_te = params["vae"], params["text_encoder"]
    mean, logvar = autoencoder.encode(p_vae, images.to(device), cfg.vae)
    tok = tokenizer.load(cfg.text_encoder.tokenizer)
    ids = tokenizer.encode(tok, captions, tokenizer.max_length(tok, cfg.text_encoder))
    context = text_encoder.apply(p_te, ids.to(device), cfg.text_encoder, clip_skip=clip_skip(cfg))
    return torch.cat([mean, logvar], dim=1), context


def clip_skip(cfg) -> int:
    """Training conditions on the last layer unless config.train.clip_skip says otherwise."""
    return int(cfg.get("train", {}).get("clip_skip", 0) or 0)


def precache(params: dict, cfg, out: str, seed: int = 0, num_examples: int | None = None,
             batch_size: int = 32, shard_size: int = 4096, dtype=torch.float32, device=None) -> dict:
    """Encode config.data into a latents folder at `out`; returns its index.

    Written into a temporary folder and renamed, so `out` is complete or absent.
    """
    if os.path.exists(out):
        raise FileExistsError(f"precache: {out} exists; remove it or choose another --out")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".precache-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes it private; the result is an ordinary folder
    shards, pending, skipped = [], [], 0
    buf = {"moments": [], "context": [], "captions": []}

    def flush_batch():
        if pending:
            imgs = torch.stack([e["images"] for e in pending])
            caps = [e["captions"] for e in pending]
            moments, context = encode_batch(params, cfg, imgs, caps, device)
            buf["moments"].append(moments.to("cpu", dtype))
            buf["context"].append(context.to("cpu", dtype))
            buf["captions"] += caps
            pending.clear()

    def flush_shard():
        if buf["captions"]:
            name = latents.shard_name(len(shards))
            tensors = {k: torch.cat(buf[k]).contiguous() for k in ("moments", "context")}
            save_file(tensors, os.path.join(tmp, name), metadata={"captions": json.dumps(buf["captions"])})
            shards.append({"file": name, "count": len(buf["captions"])})
            for v in buf.values():
                v.clear()

    try:
        for ex, skip in examples_once(cfg.data, seed, num_examples):
            skipped += skip
            pending.append(ex)
            if len(pending) == batch_size or len(buf["captions"]) + len(pending) >= shard_size:
                flush_batch()
            if len(buf["captions"]) >= shard_size:
                flush_shard()
        flush_batch()
        flush_shard()
        if not shards:
            raise ValueError(f"precache: config.data ({cfg.data.kind}, {cfg.data.get('path', '')!r}) gave no "
                             f"readable example ({skipped} skipped)")
        with torch.no_grad():
            tok = tokenizer.load(cfg.text_encoder.tokenizer)
            ids = tokenizer.encode(tok, [""], tokenizer.max_length(tok, cfg.text_encoder))
            empty = text_encoder.apply(params["text_encoder"], ids.to(device), cfg.text_encoder,
                                       clip_skip=clip_skip(cfg))
        save_file({"context": empty.to("cpu", dtype).contiguous()}, os.path.join(tmp, latents.EMPTY))
        with safe_open(os.path.join(tmp, shards[0]["file"]), framework="pt") as f:
            moments_shape = f.get_slice("moments").get_shape()[1:]
        index = {
            "format": latents.FORMAT, "num_examples": sum(s["count"] for s in shards), "shards": shards,
            "resolution": cfg.data.resolution, "moments_shape": list(moments_shape),
            "context_shape": list(empty.shape[1:]),
            "dtype": str(dtype).replace("torch.", ""), "clip_skip": clip_skip(cfg),
            "scaling_factor": cfg.vae.get("scaling_factor", None), "skipped": skipped, "seed": seed,
            "vae": cfg.vae.to_dict(), "text_encoder": cfg.text_encoder.to_dict(), "source": cfg.data.to_dict(),
        }
        with open(os.path.join(tmp, latents.INDEX), "w") as f:
            json.dump(index, f, indent=1, default=list)
        os.replace(tmp, out)
        return index
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv):
    from absl import flags

    from sd_func import random, tree

    F = flags.FLAGS
    cfg = F.config
    device = F.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if F.ckpt:
        from sd_func import checkpoint
        tok = cfg.text_encoder.get("tokenizer", "")
        params, cfg = checkpoint.load(F.ckpt, cfg=cfg)   # the architecture comes from the checkpoint
        if not cfg.text_encoder.get("tokenizer") and tok:   # e.g. a CompVis file carries no tokenizer
            cfg.text_encoder.tokenizer = tok
    else:
        k_vae, k_te = random.split(random.key(cfg.seed), 2)
        params = {"vae": autoencoder.init(k_vae, cfg.vae), "text_encoder": text_encoder.init(k_te, cfg.text_encoder)}
    params = tree.to({k: params[k] for k in ("vae", "text_encoder")}, device=device)
    dtype = getattr(torch, F.dtype)
    index = precache(params, cfg, F.out, seed=cfg.seed, num_examples=F.num_examples or None,
                     batch_size=F.batch_size, shard_size=F.shard_size, dtype=dtype, device=device)
    print(f"precache: wrote {index['num_examples']} examples in {len(index['shards'])} shards to {F.out} "
          f"({index['skipped']} corrupt samples skipped)")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (configs/x.py[:arg])", lock_config=False)
    flags.DEFINE_string("ckpt", "", "checkpoint with the VAE and text encoder; empty = random init")
    flags.DEFINE_string("out", None, "output folder (must not exist)")
    flags.DEFINE_integer("num_examples", 0, "examples to encode (0 = the whole dataset; needed for shapes)")
    flags.DEFINE_integer("batch_size", 32, "encoder batch size")
    flags.DEFINE_integer("shard_size", 4096, "examples per safetensors shard")
    flags.DEFINE_string("dtype", "float32", "stored dtype: float32, float16 or bfloat16")
    flags.DEFINE_string("device", "", "cpu or cuda (default: cuda when available)")
    flags.mark_flags_as_required(["config", "out"])
    app.run(main)
