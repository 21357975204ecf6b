"""Aspect-ratio buckets (NovelAI 2022; SDXL, Podell et al. 2023, Sec. 2.3; NeMo's
multi-aspect data): train on images of many shapes, each batch of one shape.

`config.data.buckets` is "" (off), "auto", or "HxW,HxW,..." (pixels, e.g.
"512x768,576x576,768x512"). "auto" makes NeMo/SDXL's table: every (H, W) with both sides
multiples of `bucket_step` (64), H * W at most resolution^2 and as close to it as the
step allows, and aspect ratio at most `bucket_max_ratio` (2) either way. Each image goes to
the bucket nearest its aspect ratio (in log space) and is resized to cover it, then
cropped (transforms.preprocess).

The schedule is map-style like loader.py's: epoch e shuffles each bucket's examples with
a key of (seed, e, bucket), cuts them into full global batches (a bucket's remainder
waits for another epoch's order), and shuffles the list of batches with a key of
(seed, e). Step n is batch n mod S of epoch n // S (S batches per epoch). So a global
batch is one bucket, and every batch is a pure function of (seed, step, global batch size)
whatever the world size; ranks take their contiguous slice of it, and a resume needs no
state. The compiled step sees at most len(buckets) shapes (one graph each).
"""

import math

import torch

from sd_func import random
from sd_func.data import loader
from sd_func.errors import UserError

_ORDER_TAG = 0xB0C7
_DRAW_TAG = 0xB0C8


def auto(area: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(H, W) buckets of about `area` pixels: sides multiples of step, aspect ratio <= max_ratio."""
    if step < 1 or area < step * step:
        raise UserError(f"config.data.bucket_step={step}: must be >= 1 and fit the area {area} (resolution^2)")
    out = set()
    for w in range(step, int(math.sqrt(area * max_ratio)) + 1, step):
        h = (area // w) // step * step
        if h >= step and max(h / w, w / h) <= max_ratio + 1e-9:
            out.add((h, w))
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def resolve(cfg_data) -> list[tuple[int, int]] | None:
    """The buckets of config.data (None when off), validated against the VAE-free rules."""
    spec = cfg_data.get("buckets", "") or ""
    if not spec:
        return None
    step = int(cfg_data.get("bucket_step", 64))
    if spec == "auto":
        r = int(cfg_data.resolution)
        return auto(r * r, step, float(cfg_data.get("bucket_max_ratio", 2.0)))
    try:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        out = [tuple(int(v) for v in (i.lower().split("x") if isinstance(i, str) else i)) for i in items]
    except ValueError:
        out = []
    if not out or any(len(hw) != 2 or min(hw) < 1 for hw in out):
        raise UserError(f"config.data.buckets={spec!r}: expected '', 'auto' or 'HxW,HxW,...' (pixels)")
    if len(set(out)) != len(out):
        raise UserError(f"config.data.buckets={spec!r}: a bucket is listed twice")
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def nearest(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio (W/H) is nearest the image's, in log space."""
    a = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(a - math.log(buckets[i][1] / buckets[i][0])), i))


def draw(seed: int, step: int, weights: list[float]) -> int:
    """The bucket of global step `step` of a stream (webdataset): drawn with probabilities
    proportional to `weights` from a key of (seed, step), so every rank draws the same one."""
    k = random.fold_in(random.fold_in(loader.data_key(seed), _DRAW_TAG), int(step))
    w = torch.tensor(weights, dtype=torch.float64)
    return int(torch.multinomial(w, 1, generator=random.generator(k)))


def epoch_batches(seed: int, epoch: int, members: list[list[int]], global_batch: int) -> list[tuple[int, list]]:
    """[(bucket, [example indices])] of one epoch: full batches of one bucket each, shuffled."""
    k_epoch = random.fold_in(loader.epoch_key(seed, epoch), _ORDER_TAG)
    batches = []
    for b, ids in enumerate(members):
        perm = torch.randperm(len(ids), generator=random.generator(random.fold_in(k_epoch, b))).tolist()
        order = [ids[i] for i in perm]
        batches += [(b, order[i:i + global_batch]) for i in range(0, len(order) - global_batch + 1, global_batch)]
    perm = torch.randperm(len(batches), generator=random.generator(random.fold_in(k_epoch, len(members))))
    return [batches[i] for i in perm.tolist()]


class BucketSource(loader.MapSource):
    """A MapSource whose global batches each come from one aspect-ratio bucket.

    The dataset needs `bucket_of(buckets) -> [bucket index per example]` and
    `load(index, key, size=(H, W))`. A corrupt example is replaced by the next member of
    its batch's bucket in that epoch's order (counted in "skipped", deterministic).
    Batches also carry "bucket": (H, W) of the pixels (precached latents: of the images).
    """

    def __init__(self, kind: str, dataset, buckets: list[tuple[int, int]], seed: int, rank: int = 0,
                 world: int = 1, num_workers: int = 0):
        super().__init__(kind, dataset, seed, rank, world, num_workers=num_workers)
        self.buckets = list(buckets)
        of = dataset.bucket_of(self.buckets)
        self.members = [[i for i, b in enumerate(of) if b == k] for k in range(len(self.buckets))]
        self.counts = [len(m) for m in self.members]
        self._epochs: dict[tuple, list] = {}

    def _epoch(self, epoch: int, global_batch: int) -> list:
        with self._lock:
            key = (epoch, global_batch)
            if key not in self._epochs:
                if len(self._epochs) >= 2:
                    self._epochs.pop(min(self._epochs))
                self._epochs[key] = epoch_batches(self.seed, epoch, self.members, global_batch)
            return self._epochs[key]

    def plan(self, step: int, global_batch: int) -> tuple[int, list]:
        """(bucket, the global batch's example indices) of `step`."""
        n = len(self._epoch(0, global_batch))
        if n == 0:
            raise UserError(f"data[{self.kind}]: no bucket holds a whole global batch of {global_batch} "
                            f"(examples per bucket {dict(zip(map(name, self.buckets), self.counts))})")
        epoch, i = divmod(int(step), n)
        return self._epoch(epoch, global_batch)[i]

    def _load(self, job) -> tuple[dict, int]:
        bucket, pos, order, g = job
        k, size = loader.example_key(self.seed, g), self.buckets[bucket]
        for tries in range(len(order)):
            ex = self.dataset.load(order[(pos + tries) % len(order)], k, size)
            if ex is not None:
                return ex, tries
        raise RuntimeError(f"data[{self.kind}]: every example of bucket {name(size)} is unreadable")

    def _build(self, step: int, global_batch: int) -> dict:
        bucket, ids = self.plan(step, global_batch)
        indices = loader.rank_indices(step, global_batch, self.rank, self.world)
        mine = range(indices.start - step * global_batch, indices.stop - step * global_batch)
        order = self.members[bucket]
        where = {e: j for j, e in enumerate(order)}
        jobs = [(bucket, where[ids[j]], order, g) for j, g in zip(mine, indices)]
        results = list(self._pool.map(self._load, jobs)) if self._pool is not None else [self._load(j) for j in jobs]
        out = loader.collate([r[0] for r in results], indices, sum(r[1] for r in results))
        out["bucket"] = self.buckets[bucket]
        return out


def name(hw) -> str:
    return f"{hw[0]}x{hw[1]}"
