"""Sampling options: one frozen `Options` that txt2img, img2img and inpaint share, resolved
and validated once.

`resolve(cfg, **overrides)` looks every option up once: an explicit argument (None = not
given) wins, else `cfg.sample.<name>` for the options a config carries (CONFIG_DEFAULTS:
sampler, steps, guidance_scale, guidance_rescale, eta, height, width, batch_size, dtype,
clip_skip), else the SD 1.5 default of configs/txt2img.py; height and width default, as
in diffusers, to the UNet's sample_size times the VAE's downsampling factor (512 for SD
1.5). The per-call options (CALL_DEFAULTS: output_type, progress, callback, unet_fn,
noise_fn) have no config field. A bad value raises one UserError naming the option and
what is allowed, before any model runs; an unknown option is a TypeError naming it.
cfg.sample.compile is not a pipeline option: whoever holds the pipeline builds the UNet
call (unet_call.make_unet_fn) and passes it as unet_fn.
"""

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import torch

from sd_func.diffusion import samplers
from sd_func.errors import UserError

CONFIG_DEFAULTS = dict(sampler="dpmpp_2m", steps=25, guidance_scale=7.5, guidance_rescale=0.0, eta=0.0,
                       height=None, width=None, batch_size=4, dtype="auto", clip_skip=0)
CALL_DEFAULTS = dict(output_type="uint8", progress=False, callback=None, unet_fn=None, noise_fn=None)
OUTPUT_TYPES = ("uint8", "float", "latent")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Options:
    """What a pipeline call does, beside its prompts and images.

    output_type: "uint8" [B,H,W,3], "float" [B,H,W,3] in [0, 1] before quantisation, or
    "latent" (the final scaled latents). callback(info) observes each sampler step
    (info = {i, t, sigma, x, x0_hat}); progress shows a tqdm bar. unet_fn(params, x, t,
    context): the UNet call to use (default: eager unet.apply; see unet_call).
    noise_fn(i, shape): the step noise of stochastic samplers, called once per chunk of
    batch_size images (default: per-image keys, see generate.image_keys).
    """
    sampler: str
    steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    height: int
    width: int
    batch_size: int
    dtype: Any  # "auto", a DTYPES name, or a torch.dtype
    clip_skip: int
    output_type: str = "uint8"
    progress: bool = False
    callback: Callable | None = None
    unet_fn: Callable | None = None
    noise_fn: Callable | None = None


def resolve(cfg, base: Options | None = None, **overrides) -> Options:
    """Validated Options: overrides (None = not given) over base (if given) over cfg.sample
    over the defaults."""
    known = {f.name for f in dataclasses.fields(Options)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        hint = (" (compile: build the call with pipelines.make_unet_fn(cfg.unet, compile) and pass "
                "unet_fn=)") if "compile" in unknown else ""
        raise TypeError(f"unknown pipeline option(s) {', '.join(unknown)}{hint}; known: {', '.join(sorted(known))}")
    if base is not None:
        o = {k: getattr(base, k) for k in known}
    else:
        sample = cfg.get("sample", None) if cfg is not None else None
        o = dict(CALL_DEFAULTS)
        for k, default in CONFIG_DEFAULTS.items():
            v = sample.get(k, None) if sample is not None else None
            o[k] = default if v is None else v
    o.update({k: v for k, v in overrides.items() if v is not None})
    for k in ("height", "width"):
        if o[k] is None:
            o[k] = native_size(cfg)
    check(o)
    o.update({k: int(o[k]) for k in ("steps", "height", "width", "batch_size", "clip_skip")})
    o.update({k: float(o[k]) for k in ("guidance_scale", "guidance_rescale", "eta")})
    return Options(**o)


def native_size(cfg) -> int:
    """unet.sample_size * 2**(len(vae.block_out_channels) - 1): the size the model was made for."""
    try:
        return int(cfg.unet.sample_size) * 2 ** (len(cfg.vae.block_out_channels) - 1)
    except (AttributeError, KeyError, TypeError):
        return 512


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real)


def _is_int(v) -> bool:
    return _is_number(v) and int(v) == v


def check(o: dict) -> None:
    """UserError naming the first bad option value."""
    if o["sampler"] not in samplers.NAMES:
        raise UserError(f"unknown sampler {o['sampler']!r}: expected one of {', '.join(samplers.NAMES)}")
    if not _is_int(o["steps"]) or o["steps"] < 1:
        raise UserError(f"steps={o['steps']}: expected an integer >= 1")
    for k in ("height", "width"):
        if not _is_int(o[k]) or o[k] < 8 or o[k] % 8:
            raise UserError(f"{k}={o[k]}: expected a positive multiple of 8")
    if not _is_int(o["batch_size"]) or o["batch_size"] < 1:
        raise UserError(f"batch_size={o['batch_size']}: expected an integer >= 1")
    for k in ("guidance_scale", "guidance_rescale", "eta"):
        if not _is_number(o[k]):
            raise UserError(f"{k}={o[k]!r}: expected a number")
    if not 0.0 <= float(o["guidance_rescale"]) <= 1.0:
        raise UserError(f"guidance_rescale={o['guidance_rescale']}: expected a value in [0, 1]")
    if float(o["eta"]) < 0:
        raise UserError(f"eta={o['eta']}: expected a value >= 0")
    if float(o["eta"]) > 0 and o["sampler"] != "ddim":
        raise UserError(f"eta={o['eta']}: only the ddim sampler takes eta (sampler is {o['sampler']!r})")
    if not _is_int(o["clip_skip"]) or o["clip_skip"] < 0:
        raise UserError(f"clip_skip={o['clip_skip']}: expected an integer >= 0 (0 = last layer)")
    if o["dtype"] != "auto" and o["dtype"] not in DTYPES and o["dtype"] not in DTYPES.values():
        raise UserError(f"dtype={o['dtype']!r}: expected auto, {', '.join(DTYPES)}")
    if o["output_type"] not in OUTPUT_TYPES:
        raise UserError(f"output_type={o['output_type']!r}: expected one of {', '.join(OUTPUT_TYPES)}")
    for k in ("callback", "unet_fn", "noise_fn"):
        if o[k] is not None and not callable(o[k]):
            raise TypeError(f"{k}: expected a function, got {type(o[k]).__name__}")


def torch_dtype(name, device) -> torch.dtype:
    """"auto" = float16 on CUDA, float32 elsewhere; else the named dtype (or a torch.dtype)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]
