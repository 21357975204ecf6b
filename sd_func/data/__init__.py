"""Training data sources, chosen by config.data.kind: shapes, folder, webdataset, latents, dreambooth.

    source = data.make_source(cfg.data, seed, rank=0, world=1)
    batch = source.batch(step, global_batch)
    # {"index": LongTensor [b] of global example indices step*B + j (this rank's slice),
    #  "images": float32 [b, 3, R, R] in [-1, 1], "captions": list[str],
    #  (kind "latents": "moments" [b, 2C, h, w] and "context" [b, L, D] instead),
    #  "skipped": corrupt samples skipped while building this batch}
    position = source.state()   # JSON; source.restore(position) continues from it

Map-style kinds (shapes, folder, latents) are a pure function of (seed, step,
global index), whatever the world size; webdataset is a stream per rank whose
position is its state. With config.data.buckets (folder, webdataset; latents
precached with buckets) every global batch comes from one aspect-ratio bucket and
carries "bucket": (H, W) (sd_func.data.buckets; webdataset's per-bucket buffers).
"""

from sd_func.data import buckets, dreambooth, folder, latents, loader, shapes, webdataset
from sd_func.errors import UserError

__all__ = ["KINDS", "buckets", "dreambooth", "folder", "latents", "loader", "make_source", "shapes", "webdataset"]

KINDS = {
    "shapes": shapes.make_source,
    "folder": folder.make_source,
    "webdataset": webdataset.make_source,
    "latents": latents.make_source,
    "dreambooth": dreambooth.make_source,
}


def make_source(cfg_data, seed: int, rank: int = 0, world: int = 1):
    """The batch source of config.data for `rank` of `world` processes."""
    kind = cfg_data.kind
    if kind not in KINDS:
        raise UserError(f"config.data.kind = {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind](cfg_data, int(seed), int(rank), int(world))
