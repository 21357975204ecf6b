"""Prompt accuracy on the synthetic shapes: read color, shape and background from pixels.

For an image of "a {color} {shape} on a {background} background" (sd_func.data.shapes):
the background is the palette color nearest to the median border pixel; the
shape's color is the most common palette color among the other pixels (nearest
palette color after a 3x3 box filter, which tames a generative model's noise);
the shape is the largest connected region closer to that color than to the
background, classified by geometry: the fraction of its bounding box it fills
(circle pi/4, square 1, triangle 1/2) and the fraction of its area in the upper
half of the box (1/2 for the symmetric circle and square, 1/4 for a triangle
with its apex up). Images are first resized to 64 x 64, the scale the dataset's
sizes are given at. The palette includes the colors only fine-tunes teach
(shapes_data.NEW_COLORS: orange, purple).
"""

import numpy as np
import torch
from PIL import Image

from sd_func.data import shapes as shapes_data

SIZE = 64
PALETTE = np.array(list(shapes_data.ALL_COLORS.values()), np.float32)  # with the fine-tuning colors
NAMES = list(shapes_data.ALL_COLORS)
# (fill of bounding box, fraction of area in the upper half) of each ideal shape
PROTOTYPES = {"circle": (np.pi / 4, 0.5), "square": (1.0, 0.5), "triangle": (0.5, 0.25)}


def _box3(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _nearest(x: np.ndarray) -> np.ndarray:
    """Index of the nearest palette color of each pixel of x [..., 3]."""
    return ((x[..., None, :] - PALETTE) ** 2).sum(-1).argmin(-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (union-find over row runs)."""
    runs = []   # (row, start, stop)
    for y, row in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        runs += [(y, a, b) for a, b in zip(edges[::2], edges[1::2])]
    if not runs:
        return mask
    parent = list(range(len(runs)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev, cur, last_y = [], [], -1
    for i, (y, a, b) in enumerate(runs):
        if y != last_y:
            prev, cur, last_y = (cur if y == last_y + 1 else []), [], y
        for j in prev:
            if runs[j][1] < b and a < runs[j][2]:   # column ranges overlap
                parent[root(i)] = root(j)
        cur.append(i)
    sizes: dict[int, int] = {}
    for i, (_, a, b) in enumerate(runs):
        sizes[root(i)] = sizes.get(root(i), 0) + b - a
    best = max(sizes, key=sizes.get)
    out = np.zeros_like(mask)
    for i, (y, a, b) in enumerate(runs):
        if root(i) == best:
            out[y, a:b] = True
    return out


def _geometry(region: np.ndarray) -> tuple[float, float]:
    """(fill of the bounding box, fraction of the area in the upper half of the box)."""
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    area = float(len(ys))
    mid = (y0 + y1) / 2.0
    centers = ys + 0.5
    top = (centers < mid).sum() + 0.5 * (centers == mid).sum()
    return area / ((y1 - y0) * (x1 - x0)), top / area


def classify_shape(fill: float, top: float) -> str:
    return min(PROTOTYPES, key=lambda s: (fill - PROTOTYPES[s][0]) ** 2 + (top - PROTOTYPES[s][1]) ** 2)


def analyze(image) -> dict:
    """{"color", "shape", "background", "fill", "top"} read from one uint8 image [H, W, 3]."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"eval.shapes: expected an image [H, W, 3], got {img.shape}")
    if img.shape[:2] != (SIZE, SIZE):
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((SIZE, SIZE), Image.BOX))
    x = img.astype(np.float32)
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3),
                             x[:, :2].reshape(-1, 3), x[:, -2:].reshape(-1, 3)])
    b = int(_nearest(np.median(border, axis=0)))
    out = {"background": NAMES[b], "color": None, "shape": None, "fill": 0.0, "top": 0.0}
    smooth = _box3(x)
    labels = _nearest(smooth)
    others = labels[labels != b]
    if others.size == 0:
        return out
    f = int(np.bincount(others, minlength=len(NAMES)).argmax())
    d = PALETTE[f] - PALETTE[b]
    alpha = ((smooth - PALETTE[b]) @ d) / (d @ d)
    region = _largest_component(alpha > 0.5)
    if region.sum() < 4:
        return out
    f = int(np.bincount(labels[region], minlength=len(NAMES)).argmax()) if (labels[region] != b).any() else f
    fill, top = _geometry(region)
    out.update(color=NAMES[f], shape=classify_shape(fill, top), fill=fill, top=top)
    return out


def describe(image) -> str:
    """The prompt an image shows, e.g. "a red circle on a blue background"."""
    a = analyze(image)
    return shapes_data.caption(a["color"], a["shape"], a["background"])


def score(images, prompts) -> dict:
    """Prompt accuracy of images uint8 [N, H, W, 3] against their prompts.

    Returns {"accuracy": all three attributes right, "color", "shape", "background":
    per-attribute accuracies, "n", "predictions": list of dicts from `analyze`, "correct":
    per-image bools}.
    """
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    images = np.asarray(images)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(prompts):
        raise ValueError(f"eval.shapes.score: expected images [N, H, W, 3] uint8 and N prompts, got "
                         f"{images.shape} and {len(prompts)} prompts")
    if images.dtype != np.uint8:
        raise ValueError(f"eval.shapes.score: images must be uint8, got {images.dtype}")
    truth = [shapes_data.parse(p) for p in prompts]
    preds = [analyze(im) for im in images]
    n = max(len(prompts), 1)
    hits = {k: [p[k] == t[i] for p, t in zip(preds, truth)]
            for i, k in enumerate(("color", "shape", "background"))}
    correct = [all(h) for h in zip(*hits.values())]
    return {"accuracy": sum(correct) / n, **{k: sum(v) / n for k, v in hits.items()},
            "n": len(prompts), "predictions": preds, "correct": correct}
