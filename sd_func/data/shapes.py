"""The built-in synthetic dataset: one filled shape on a plain background.

Each example is a pure function of (seed, index): a background color, a
different shape color, a shape kind (circle, axis-aligned square, or isosceles
triangle with its apex up and base equal to its height), a half-size of 12 to
22 px and a center jittered up to 8 px each way (sizes at 64 px, scaled with the
resolution), drawn with numpy, anti-aliased (exact coverage along x, 8 samples
per pixel along y). The caption is
"a {color} {shape} on a {background} background": 6 * 5 * 3 = 90 prompts, which
`sd_func.eval.shapes` reads back from pixels. NEW_COLORS are never in the default data:
a fine-tune teaches them (configs/shapes_lora.py: `colors=("orange",)` draws only orange
shapes, on the usual backgrounds, from a finite set of `num_examples` examples).
"""

import re

import numpy as np

from sd_func import random
from sd_func.data import loader, transforms
from sd_func.errors import UserError

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
# Words the main job's data never shows, for fine-tunes to teach. The main job's VAE
# reconstructs orange (between its red and yellow) as orange in 15 of 18 shape/background
# cases, purple in none (it comes back green or blue): a UNet fine-tune can teach orange.
NEW_COLORS = {"orange": (230, 120, 40), "purple": (140, 50, 190)}
ALL_COLORS = {**COLORS, **NEW_COLORS}
SHAPES = ("circle", "square", "triangle")
HALF_SIZE = (12.0, 22.0)   # at 64 px
JITTER = 8.0               # at 64 px
_PROMPT_RE = re.compile(r"\s*an? (\w+) (\w+) on an? (\w+) background\s*\.?\s*")


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def parse(prompt: str) -> tuple[str, str, str]:
    """(color, shape, background) of a shapes prompt; ValueError if it is not one."""
    m = _PROMPT_RE.fullmatch(prompt.lower())
    if not m or m[1] not in ALL_COLORS or m[2] not in SHAPES or m[3] not in ALL_COLORS:
        raise UserError(f"shapes: {prompt!r} is not 'a {{color}} {{shape}} on a {{color}} background' "
                         f"with colors {list(ALL_COLORS)} and shapes {list(SHAPES)}")
    return m[1], m[2], m[3]


def prompts(colors=None) -> list[str]:
    """All 90 captions (color != background), in a fixed order; or those with shape colors `colors`."""
    return [caption(c, s, b) for b in COLORS for c in (colors or COLORS) if c != b for s in SHAPES]


def attributes(seed: int, index: int, resolution: int = 64, colors=None) -> dict:
    """What example `index` of `seed` shows: color, shape, background, half_size, center (x, y).
    colors: the shape colors to draw from (default COLORS, minus the background)."""
    u = random.uniform(random.fold_in(loader.data_key(seed), index), (6,)).tolist()
    names = list(COLORS)
    background = names[min(int(u[0] * 6), 5)]
    others = [c for c in (colors or names) if c != background]
    scale = resolution / 64.0
    half_size = (HALF_SIZE[0] + (HALF_SIZE[1] - HALF_SIZE[0]) * u[3]) * scale
    center = (resolution / 2 + (2 * u[4] - 1) * JITTER * scale,
              resolution / 2 + (2 * u[5] - 1) * JITTER * scale)
    return dict(color=others[min(int(u[1] * len(others)), len(others) - 1)], shape=SHAPES[min(int(u[2] * 3), 2)],
                background=background, half_size=half_size, center=center)


def coverage(shape: str, half_size: float, center, resolution: int, supersample: int = 8) -> np.ndarray:
    """Fraction of each pixel covered by the shape: float32 [R, R] in [0, 1].

    Every shape is, row by row, one interval [cx - w(y), cx + w(y)]; each pixel's
    overlap with it is exact in x and averaged over `supersample` rows in y.
    """
    s, h = supersample, float(half_size)
    y = (np.arange(resolution * s, dtype=np.float32) + 0.5) / s - center[1]
    rows = np.abs(y) <= h
    if shape == "circle":
        w = np.sqrt(np.clip(h * h - y * y, 0, None))
    elif shape == "square":
        w = np.full_like(y, h)
    elif shape == "triangle":   # apex (0, -h), base from (-h, h) to (h, h): half-width grows by 1/2 per px
        w = (y + h) / 2
    else:
        raise UserError(f"shapes: unknown shape {shape!r}; expected one of {SHAPES}")
    w = np.where(rows, w, 0)[:, None]
    x = np.arange(resolution, dtype=np.float32)[None, :]
    overlap = np.minimum(x + 1, center[0] + w) - np.maximum(x, center[0] - w)
    return np.clip(overlap, 0, 1).reshape(resolution, s, resolution).mean(axis=1)


def draw(color: str, shape: str, background: str, half_size: float, center, resolution: int = 64) -> np.ndarray:
    """One image: uint8 [R, R, 3]."""
    a = coverage(shape, half_size, center, resolution)[..., None]
    fg, bg = np.array(ALL_COLORS[color], np.float32), np.array(ALL_COLORS[background], np.float32)
    return np.rint(bg * (1 - a) + fg * a).astype(np.uint8)


def example(seed: int, index: int, resolution: int = 64, colors=None) -> tuple[np.ndarray, str]:
    """(uint8 image [R, R, 3], caption) of example `index` (shape colors from `colors`, default COLORS)."""
    a = attributes(seed, index, resolution, colors)
    return draw(resolution=resolution, **a), caption(a["color"], a["shape"], a["background"])


class ShapesDataset:
    """Index-addressed: example i is `example(seed, i)`; infinite, or the first num_examples."""

    def __init__(self, seed: int, resolution: int = 64, colors=None, num_examples: int | None = None):
        self.seed, self.resolution = int(seed), int(resolution)
        self.colors = tuple(colors) if colors else None
        unknown = [c for c in self.colors or () if c not in ALL_COLORS]
        if unknown:
            raise UserError(f"config.data.colors: unknown colors {unknown}; expected some of {list(ALL_COLORS)}")
        self.num_examples = int(num_examples) if num_examples else None

    def load(self, index: int, key=None) -> dict:
        image, text = example(self.seed, index, self.resolution, self.colors)
        return {"images": transforms.to_tensor(image), "captions": text}


def make_source(cfg_data, seed: int, rank: int = 0, world: int = 1) -> loader.MapSource:
    """config.data.colors (shape colors, default all of COLORS) and num_examples (a finite set
    in shuffled epochs; default infinite) are optional."""
    ds = ShapesDataset(seed, cfg_data.resolution, cfg_data.get("colors", None), cfg_data.get("num_examples", None))
    return loader.MapSource("shapes", ds, seed, rank, world, num_workers=cfg_data.get("num_workers", 0),
                            shuffle=ds.num_examples is not None)
