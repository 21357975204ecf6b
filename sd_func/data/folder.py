"""An image folder with captions, in the Hugging Face imagefolder convention.

Captions come from `metadata.jsonl` files (one JSON object per line with
"file_name", relative to that file's folder, and "text"; "caption" is also
accepted), or, when the folder has no metadata.jsonl, from a `.txt` file with
the same name as each image (an image without one gets the empty caption, and a
warning says how many). An image that cannot be read is skipped, counted in the
batch's "skipped" and logged by name (see loader.py for how skipping stays
deterministic).
"""

import json
import logging
import os

from PIL import Image

from sd_func.data import buckets, loader, transforms
from sd_func.errors import MissingFileError, UserError

log = logging.getLogger("sd_func.data")
CAPTION_KEYS = ("text", "caption")


def _read_metadata(meta_path: str) -> list[tuple[str, str]]:
    root = os.path.dirname(meta_path)
    entries = []
    with open(meta_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{meta_path}:{lineno}: not a JSON object ({e})") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise UserError(f"{meta_path}:{lineno}: a row needs a 'file_name' field, got {line.strip()[:200]}")
            text = next((row[k] for k in CAPTION_KEYS if k in row), None)
            if text is None:
                raise UserError(f"{meta_path}:{lineno}: a row needs one of the fields {CAPTION_KEYS}")
            entries.append((os.path.join(root, row["file_name"]), str(text)))
    return entries


def _scan_images(path: str) -> list[tuple[str, str]]:
    entries, missing = [], 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if not transforms.is_image(name):
                continue
            file = os.path.join(root, name)
            txt = os.path.splitext(file)[0] + ".txt"
            if os.path.exists(txt):
                with open(txt, encoding="utf-8") as f:
                    entries.append((file, f.read().strip()))
            else:
                missing += 1
                entries.append((file, ""))
    if missing:
        log.warning("data: %d of %d images in %s have no .txt caption; they get the empty caption",
                    missing, len(entries), path)
    return entries


def list_folder(path: str) -> list[tuple[str, str]]:
    """[(image path, caption)] of an image folder, in a fixed order."""
    if not os.path.isdir(path):
        raise MissingFileError(f"data[folder]: {path!r} is not a folder (set config.data.path)")
    metas = sorted(os.path.join(r, "metadata.jsonl") for r, _, files in os.walk(path) if "metadata.jsonl" in files)
    entries = [e for m in metas for e in _read_metadata(m)] if metas else _scan_images(path)
    if not entries:
        raise UserError(f"data[folder]: no images found in {path!r}")
    return entries


class FolderDataset:
    def __init__(self, path: str, resolution: int, center_crop: bool = True, random_flip: bool = False):
        self.entries = list_folder(path)
        self.num_examples = len(self.entries)
        self.resolution, self.center_crop, self.random_flip = int(resolution), center_crop, random_flip

    def load(self, index: int, key: int, size=None):
        """Example `index` at resolution R, or at size (H, W) (its aspect-ratio bucket)."""
        file, text = self.entries[index]
        img = transforms.try_decode(file, file)
        if img is None:
            return None
        x = transforms.preprocess(img, size or self.resolution, key, self.center_crop, self.random_flip)
        return {"images": x, "captions": text}

    def bucket_of(self, table: list) -> list[int]:
        """Each image's nearest aspect-ratio bucket, from its header (an unreadable one: 0, skipped later)."""
        out = []
        for file, _ in self.entries:
            try:
                with Image.open(file) as im:
                    out.append(buckets.nearest(*im.size, table))
            except Exception:  # as transforms.try_decode: the load will skip and log it
                out.append(0)
        return out


def make_source(cfg_data, seed: int, rank: int = 0, world: int = 1) -> loader.MapSource:
    ds = FolderDataset(cfg_data.path, cfg_data.resolution, cfg_data.get("center_crop", True),
                       cfg_data.get("random_flip", False))
    table = buckets.resolve(cfg_data)
    if table is not None:
        return buckets.BucketSource("folder", ds, table, seed, rank, world, num_workers=cfg_data.get("num_workers", 0))
    return loader.MapSource("folder", ds, seed, rank, world, num_workers=cfg_data.get("num_workers", 0))
