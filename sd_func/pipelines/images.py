"""Pixels in and out of the pipelines: init images, masks, uint8 output, PNG files.

Conventions follow diffusers' VaeImageProcessor so that results compare one to
one: images enter the VAE in [-1, 1] as [B,3,H,W]; leave it through
`(x / 2 + 0.5).clamp(0, 1) * 255`, rounded; a mask is one channel in [0, 1],
binarised at 0.5, white (1) meaning "repaint". PNGs carry the generation
settings as text chunks (what `PIL.PngImagePlugin.PngInfo` writes), so an image
file says how it was made.
"""

import math

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import torch

from sd_func.errors import UserError


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, PIL.Image.Image):
        return torch.from_numpy(np.array(x))
    if isinstance(x, (list, tuple)):
        return torch.stack([_as_tensor(v) for v in x])
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if torch.is_tensor(x):
        return x
    raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(x).__name__}")


def image_to_tensor(image) -> torch.Tensor:
    """An RGB image (or batch) as float32 [B,3,H,W] in [-1, 1].

    Takes uint8 [H,W,3] / [B,H,W,3] (what the pipelines return), a PIL image or a
    list of them, or a float tensor [B,3,H,W] / [3,H,W] in [0, 1] (diffusers' convention).
    """
    if isinstance(image, PIL.Image.Image):
        image = image.convert("RGB")
    if isinstance(image, (list, tuple)):
        image = [v.convert("RGB") if isinstance(v, PIL.Image.Image) else v for v in image]
    x = _as_tensor(image)
    if x.dtype == torch.uint8:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise UserError(f"init image: expected uint8 [H,W,3] or [B,H,W,3], got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 255.0
    else:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise UserError(f"init image: expected a float [B,3,H,W] tensor in [0, 1], got {tuple(x.shape)}")
        x = x.float()
    return x * 2.0 - 1.0


def mask_to_tensor(mask) -> torch.Tensor:
    """A mask (or batch) as float32 [B,1,H,W] of 0 (keep) and 1 (repaint), binarised at 0.5.

    Takes a PIL image (converted to luminance), uint8 [H,W] / [B,H,W] / [H,W,1] arrays
    (0..255), or float arrays/tensors in [0, 1] of shape [H,W], [B,H,W] or [B,1,H,W].
    """
    if isinstance(mask, PIL.Image.Image):
        mask = mask.convert("L")
    if isinstance(mask, (list, tuple)):
        mask = [v.convert("L") if isinstance(v, PIL.Image.Image) else v for v in mask]
    m = _as_tensor(mask)
    m = m.float() / 255.0 if m.dtype == torch.uint8 else m.float()
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1:
        raise UserError(f"mask: expected one channel ([H,W], [B,H,W] or [B,1,H,W]), got {tuple(m.shape)}")
    return (m >= 0.5).float()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """VAE output [B,3,H,W] in [-1, 1] -> float32 [B,H,W,3] in [0, 1] (before quantisation)."""
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """VAE output [B,3,H,W] in [-1, 1] -> uint8 [B,H,W,3], rounded as diffusers does."""
    return (to_unit(images) * 255).round().to(torch.uint8)


def load_image(path: str) -> torch.Tensor:
    """An image file as uint8 [H,W,3]."""
    with PIL.Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB")))


def load_mask(path: str) -> torch.Tensor:
    """A mask file as float32 [H,W] in [0, 1] (luminance; white = repaint)."""
    with PIL.Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("L"))).float() / 255.0


def save_png(path: str, image: torch.Tensor, text: dict | None = None) -> None:
    """uint8 [H,W,3] to a PNG file, with `text` as tEXt/iTXt chunks (values str()-ed)."""
    info = PIL.PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_itxt(str(k), str(v))
    PIL.Image.fromarray(np.asarray(image.cpu())).save(path, pnginfo=info)


def read_png_text(path: str) -> dict:
    """The text chunks of a PNG file."""
    with PIL.Image.open(path) as im:
        return dict(im.text)


def grid(images: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """uint8 [N,H,W,3] tiled row-major into one uint8 [rows*H, cols*W, 3] image (black padding)."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = torch.zeros(rows * h, cols * w, c, dtype=images.dtype)
    for i in range(n):
        r, q = divmod(i, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i]
    return out
