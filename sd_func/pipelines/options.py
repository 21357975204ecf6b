"""Sampling options: cfg.sample merged with per-call overrides, validated once.

Every pipeline argument that has a config default (sampler, steps, guidance_scale,
guidance_rescale, eta, height, width, batch_size, dtype, compile, clip_skip) is
looked up here: an explicit argument wins, else `cfg.sample.<name>`, else the SD 1.5
default of configs/txt2img.py; height and width default, as in diffusers, to the UNet's
sample_size times the VAE's downsampling factor (512 for SD 1.5). Bad values raise one ValueError that names the field
and what is allowed, before any model runs.
"""

import ml_collections
import torch

from sd_func.diffusion import samplers

DEFAULTS = dict(sampler="dpmpp_2m", steps=25, guidance_scale=7.5, guidance_rescale=0.0, eta=0.0,
                height=None, width=None, batch_size=4, dtype="auto", compile=False, clip_skip=0)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve(cfg, **overrides) -> ml_collections.ConfigDict:
    """The validated sampling options: overrides (None = not given) over cfg.sample over DEFAULTS."""
    sample = cfg.get("sample", None) if cfg is not None else None
    o = {}
    for k, default in DEFAULTS.items():
        v = overrides.get(k)
        if v is None and sample is not None:
            v = sample.get(k, None)
        o[k] = default if v is None else v
    for k in ("height", "width"):
        if o[k] is None:
            o[k] = native_size(cfg)
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown sampling option(s) {unknown}; known: {sorted(DEFAULTS)}")
    check(o)
    return ml_collections.ConfigDict(o)


def native_size(cfg) -> int:
    """unet.sample_size * 2**(len(vae.block_out_channels) - 1): the size the model was made for."""
    try:
        return int(cfg.unet.sample_size) * 2 ** (len(cfg.vae.block_out_channels) - 1)
    except (AttributeError, KeyError, TypeError):
        return 512


def check(o: dict) -> None:
    if o["sampler"] not in samplers.NAMES:
        raise ValueError(f"unknown sampler {o['sampler']!r}: expected one of {', '.join(samplers.NAMES)}")
    if isinstance(o["steps"], bool) or int(o["steps"]) != o["steps"] or o["steps"] < 1:
        raise ValueError(f"steps={o['steps']}: expected an integer >= 1")
    for k in ("height", "width"):
        if int(o[k]) != o[k] or o[k] < 8 or o[k] % 8:
            raise ValueError(f"{k}={o[k]}: expected a positive multiple of 8")
    if int(o["batch_size"]) != o["batch_size"] or o["batch_size"] < 1:
        raise ValueError(f"batch_size={o['batch_size']}: expected an integer >= 1")
    if not 0.0 <= float(o["guidance_rescale"]) <= 1.0:
        raise ValueError(f"guidance_rescale={o['guidance_rescale']}: expected a value in [0, 1]")
    if float(o["eta"]) < 0:
        raise ValueError(f"eta={o['eta']}: expected a value >= 0")
    if float(o["eta"]) > 0 and o["sampler"] != "ddim":
        raise ValueError(f"eta={o['eta']}: only the ddim sampler takes eta (sampler is {o['sampler']!r})")
    if int(o["clip_skip"]) != o["clip_skip"] or o["clip_skip"] < 0:
        raise ValueError(f"clip_skip={o['clip_skip']}: expected an integer >= 0 (0 = last layer)")
    if not isinstance(o["compile"], (bool, str)):
        raise ValueError(f"compile={o['compile']!r}: expected true, false or a torch.compile backend name")
    if o["dtype"] != "auto" and o["dtype"] not in DTYPES and o["dtype"] not in DTYPES.values():
        raise ValueError(f"dtype={o['dtype']!r}: expected auto, {', '.join(DTYPES)}")


def torch_dtype(name, device) -> torch.dtype:
    """"auto" = float16 on CUDA, float32 elsewhere; else the named dtype (or a torch.dtype)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]
