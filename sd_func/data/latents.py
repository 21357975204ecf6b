"""Precached VAE moments and text embeddings: the fast path NeMo and MLPerf train on.

Both sides of the format live here: `precache(params, cfg, out)` encodes config.data
once with the frozen VAE and text encoder and writes the folder (the command line is
`python -m sd_func.data.precache`); `LatentsSource` reads it for training. Crop and
flip are frozen at precache time, as in NeMo's and MLPerf's precached training;
corrupt samples are skipped, counted in index.json and logged.

A latents folder holds:
  index.json                   {"format": "sd_func.latents/1", "num_examples", "shards":
                                [{"file", "count"}], "resolution", "moments_shape",
                                "context_shape", "dtype", "clip_skip", "vae", "text_encoder",
                                "source", "skipped"}
  latents-00000.safetensors    "moments" [n, 2C, h, w] (VAE mean and logvar on channels, the
                                layout of diffusers' DiagonalGaussianDistribution) and
                                "context" [n, L, D] (text encoder output); metadata
                                "captions" (a JSON list)
  empty.safetensors            "context" [1, L, D]: the empty prompt, for conditioning dropout
The trainer samples z = mean + exp(logvar / 2) * noise itself, with per-example keys.
Batches are map-style (loader.py): a pure function of (seed, step).
"""

import bisect
import json
import os
import shutil
import tempfile
import threading

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd_func import checkpoint, random, tree
from sd_func.data import buckets, folder, loader, shapes, webdataset
from sd_func.errors import MissingFileError, UserError
from sd_func.models import autoencoder, text_encoder, tokenizer

FORMAT = "sd_func.latents/1"
INDEX = "index.json"
EMPTY = "empty.safetensors"


def shard_name(i: int) -> str:
    return f"latents-{i:05d}.safetensors"


def read_index(path: str) -> dict:
    file = os.path.join(path, INDEX)
    if not os.path.isfile(file):
        raise MissingFileError(f"data[latents]: {file} not found; write it with "
                                f"`python -m sd_func.data.precache --config=... --out={path}`")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise UserError(f"data[latents]: {file} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class LatentsDataset:
    def __init__(self, path: str):
        self.path, self.meta = path, read_index(path)
        self._files, self._captions, self._starts = [], [], []
        start = 0
        for s in self.meta["shards"]:
            f = safe_open(os.path.join(path, s["file"]), framework="pt")
            n = f.get_slice("moments").get_shape()[0]
            if n != s["count"]:
                raise UserError(f"data[latents]: {s['file']} holds {n} examples, index.json says {s['count']}")
            self._files.append(f)
            self._captions.append(json.loads((f.metadata() or {}).get("captions", "[]")))
            self._starts.append(start)
            start += n
        self.num_examples = start
        with safe_open(os.path.join(path, EMPTY), framework="pt") as f:
            self.empty_context = f.get_tensor("context")[0]
        self._lock = threading.Lock()

    def bucket_of(self, table: list) -> list[int]:
        """Each example's bucket: its shard's (precache wrote one bucket per shard)."""
        where = {tuple(hw): i for i, hw in enumerate(table)}
        return [where[tuple(s["bucket"])] for s in self.meta["shards"] for _ in range(s["count"])]

    def load(self, index: int, key=None, size=None) -> dict:
        s = bisect.bisect_right(self._starts, index) - 1
        row, f = index - self._starts[s], self._files[s]
        with self._lock:
            moments = f.get_slice("moments")[row:row + 1][0]
            context = f.get_slice("context")[row:row + 1][0]
        caps = self._captions[s]
        return {"moments": moments.float(), "context": context.float(),
                "captions": caps[row] if row < len(caps) else ""}


class LatentsSource(loader.MapSource):
    """MapSource over a latents folder; `empty_context` [L, D] is the empty prompt's embedding."""

    def __init__(self, path: str, seed: int, rank: int = 0, world: int = 1, num_workers: int = 0, ds=None):
        ds = ds or LatentsDataset(path)
        super().__init__("latents", ds, seed, rank, world, num_workers=num_workers)
        self.meta, self.empty_context = ds.meta, ds.empty_context


def make_source(cfg_data, seed: int, rank: int = 0, world: int = 1):
    """A LatentsSource, or a buckets.BucketSource when the folder was precached with buckets."""
    ds = LatentsDataset(cfg_data.path)
    if "buckets" not in ds.meta:
        return LatentsSource(cfg_data.path, seed, rank, world, num_workers=cfg_data.get("num_workers", 0), ds=ds)
    table = [tuple(hw) for hw in ds.meta["buckets"]]
    src = buckets.BucketSource("latents", ds, table, seed, rank, world, num_workers=cfg_data.get("num_workers", 0))
    src.meta, src.empty_context = ds.meta, ds.empty_context
    return src


# ----------------------------------------------------------------------------- writing


def examples_once(cfg_data, seed: int, num_examples: int | None = None):
    """Yield (example, skipped before it) over the dataset once, in its natural order."""
    kind = cfg_data.kind
    if kind == "shapes":
        if not num_examples:
            raise UserError("precache: the shapes data is infinite; pass --num_examples")
        ds = shapes.ShapesDataset(seed, cfg_data.resolution)
        for i in range(num_examples):
            yield ds.load(i), 0
    elif kind == "folder":
        ds = folder.FolderDataset(cfg_data.path, cfg_data.resolution, cfg_data.get("center_crop", True),
                                  cfg_data.get("random_flip", False))
        table = buckets.resolve(cfg_data)  # aspect-ratio buckets: each image at its bucket's size
        of = ds.bucket_of(table) if table else [None] * ds.num_examples

        def load(i):
            ex = ds.load(i, loader.example_key(seed, i), table[of[i]] if table else None)
            return ex if ex is None or not table else dict(ex, bucket=of[i])

        yield from _readable((load(i) for i in range(ds.num_examples)), num_examples)
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
        raise UserError(f"precache: config.data.kind must be shapes, folder or webdataset, got {kind!r}")


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
        raise UserError(f"{out}: exists; remove it or choose another output folder (--out)")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".precache-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes it private; the result is an ordinary folder
    shards, skipped = [], 0
    table = buckets.resolve(cfg.data) if cfg.data.kind == "folder" else None
    groups: dict = {}  # bucket (None without buckets) -> its pending examples and shard buffer

    def flush_batch(g):
        pending, buf = g["pending"], g["buf"]
        if pending:
            imgs = torch.stack([e["images"] for e in pending])
            caps = [e["captions"] for e in pending]
            moments, context = encode_batch(params, cfg, imgs, caps, device)
            buf["moments"].append(moments.to("cpu", dtype))
            buf["context"].append(context.to("cpu", dtype))
            buf["captions"] += caps
            pending.clear()

    def flush_shard(bucket, g):
        buf = g["buf"]
        if buf["captions"]:
            name = shard_name(len(shards))
            tensors = {k: torch.cat(buf[k]).contiguous() for k in ("moments", "context")}
            save_file(tensors, os.path.join(tmp, name), metadata={"captions": json.dumps(buf["captions"])})
            shards.append({"file": name, "count": len(buf["captions"]),
                           **({"bucket": list(table[bucket])} if table else {})})
            for v in buf.values():
                v.clear()

    try:
        for ex, skip in examples_once(cfg.data, seed, num_examples):
            skipped += skip
            bucket = ex.pop("bucket", None)
            g = groups.setdefault(bucket, {"pending": [], "buf": {"moments": [], "context": [], "captions": []}})
            g["pending"].append(ex)
            if len(g["pending"]) == batch_size or len(g["buf"]["captions"]) + len(g["pending"]) >= shard_size:
                flush_batch(g)
            if len(g["buf"]["captions"]) >= shard_size:
                flush_shard(bucket, g)
        for bucket, g in sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
            flush_batch(g)
            flush_shard(bucket, g)
        if not shards:
            raise UserError(f"precache: config.data ({cfg.data.kind}, {cfg.data.get('path', '')!r}) gave no "
                             f"readable example ({skipped} skipped)")
        with torch.no_grad():
            tok = tokenizer.load(cfg.text_encoder.tokenizer)
            ids = tokenizer.encode(tok, [""], tokenizer.max_length(tok, cfg.text_encoder))
            empty = text_encoder.apply(params["text_encoder"], ids.to(device), cfg.text_encoder,
                                       clip_skip=clip_skip(cfg))
        save_file({"context": empty.to("cpu", dtype).contiguous()}, os.path.join(tmp, EMPTY))
        with safe_open(os.path.join(tmp, shards[0]["file"]), framework="pt") as f:
            moments_shape = f.get_slice("moments").get_shape()[1:]
        index = {
            "format": FORMAT, "num_examples": sum(s["count"] for s in shards), "shards": shards,
            "resolution": cfg.data.resolution, "moments_shape": list(moments_shape),
            **({"buckets": [list(hw) for hw in table]} if table else {}),
            "context_shape": list(empty.shape[1:]),
            "dtype": str(dtype).replace("torch.", ""), "clip_skip": clip_skip(cfg),
            "scaling_factor": cfg.vae.get("scaling_factor", None), "skipped": skipped, "seed": seed,
            "vae": cfg.vae.to_dict(), "text_encoder": cfg.text_encoder.to_dict(), "source": cfg.data.to_dict(),
        }
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump(index, f, indent=1, default=list)
        os.replace(tmp, out)
        return index
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_encoders(cfg, ckpt: str = "", device=None) -> tuple[dict, object]:
    """({"vae", "text_encoder"} on device, cfg): from a checkpoint (its architecture wins; a
    tokenizer named in cfg fills in for a CompVis file's missing one), or random from cfg.seed."""
    if ckpt:
        tok = cfg.text_encoder.get("tokenizer", "")
        params, cfg = checkpoint.load(ckpt, cfg=cfg)
        if not cfg.text_encoder.get("tokenizer") and tok:
            cfg.text_encoder.tokenizer = tok
    else:
        k_vae, k_te = random.split(random.key(cfg.seed), 2)
        params = {"vae": autoencoder.init(k_vae, cfg.vae), "text_encoder": text_encoder.init(k_te, cfg.text_encoder)}
    return tree.to({k: params[k] for k in ("vae", "text_encoder")}, device=device), cfg
