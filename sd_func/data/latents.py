"""Precached VAE moments and text embeddings: the fast path NeMo and MLPerf train on.

A latents folder (written by `python -m sd_func.data.precache`) holds:
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
import threading

from safetensors import safe_open

from sd_func.data import loader

FORMAT = "sd_func.latents/1"
INDEX = "index.json"
EMPTY = "empty.safetensors"


def shard_name(i: int) -> str:
    return f"latents-{i:05d}.safetensors"


def read_index(path: str) -> dict:
    file = os.path.join(path, INDEX)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"data[latents]: {file} not found; write it with "
                                f"`python -m sd_func.data.precache --config=... --out={path}`")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"data[latents]: {file} has format {meta.get('format')!r}, expected {FORMAT!r}")
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
                raise ValueError(f"data[latents]: {s['file']} holds {n} examples, index.json says {s['count']}")
            self._files.append(f)
            self._captions.append(json.loads((f.metadata() or {}).get("captions", "[]")))
            self._starts.append(start)
            start += n
        self.num_examples = start
        with safe_open(os.path.join(path, EMPTY), framework="pt") as f:
            self.empty_context = f.get_tensor("context")[0]
        self._lock = threading.Lock()

    def load(self, index: int, key=None) -> dict:
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

    def __init__(self, path: str, seed: int, rank: int = 0, world: int = 1, num_workers: int = 0):
        ds = LatentsDataset(path)
        super().__init__("latents", ds, seed, rank, world, num_workers=num_workers)
        self.meta, self.empty_context = ds.meta, ds.empty_context


def make_source(cfg_data, seed: int, rank: int = 0, world: int = 1) -> LatentsSource:
    return LatentsSource(cfg_data.path, seed, rank, world, num_workers=cfg_data.get("num_workers", 0))
