"""Image decoding and the training transforms of Stable Diffusion fine-tuning.

As diffusers' train_text_to_image.py: resize the smallest side to the
resolution (bilinear, antialiased), crop center or at random, flip horizontally
at random, scale to [-1, 1]. The randomness of crop and flip comes from one key
per global example index (sd_func.random), so it never depends on the batch,
the world size or a resume.
"""

import io
import logging
import math
import os

import numpy as np
import torch
from PIL import Image

from sd_func import random

log = logging.getLogger("sd_func.data")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def decode(source) -> Image.Image:
    """An RGB PIL image from a path or bytes, fully decoded (raises on a corrupt file)."""
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(fp) as img:
        img.load()
        return img.convert("RGB")


def try_decode(source, name: str):
    """`decode`, or None with a warning naming the file when it cannot be read."""
    try:
        return decode(source)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        log.warning("data: skipping unreadable image %s (%s: %s)", name, type(e).__name__, e)
        return None


def preprocess(img: Image.Image, resolution, key: int, center_crop: bool = True,
               random_flip: bool = False) -> torch.Tensor:
    """Resize to cover, crop, flip: float32 [3, H, W] in [-1, 1].

    resolution: R (a square R x R: the smallest side resized to R) or (H, W), an
    aspect-ratio bucket (the image scaled until it covers H x W, then cropped to it)."""
    th, tw = map(int, resolution) if isinstance(resolution, (tuple, list)) else (int(resolution),) * 2
    w, h = img.size
    scale = max(th / h, tw / w)
    size = (max(tw, round(w * scale)), max(th, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, Image.BILINEAR, reducing_gap=None)
    w, h = size
    u = random.uniform(key, (3,)).tolist()
    if center_crop:
        top, left = round((h - th) / 2.0), round((w - tw) / 2.0)
    else:
        top, left = min(math.floor(u[0] * (h - th + 1)), h - th), min(math.floor(u[1] * (w - tw + 1)), w - tw)
    x = np.array(img.crop((left, top, left + tw, top + th)), dtype=np.uint8)
    if random_flip and u[2] < 0.5:
        x = x[:, ::-1]
    return to_tensor(x)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0


def is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS
