"""A sampling job from files to files: what run_sample.py runs.

The model (architecture and weights) comes from the checkpoint - a diffusers folder,
a CompVis file, a native file or a training workdir (its newest checkpoint, EMA
weights when cfg.sample.ema) - and the sampling options from the config's `sample`
section (with its command-line overrides). Prompts run in order, `num_images` each;
image k of the run uses seed `seed + k` and is written to `<outdir>/{k:05d}.png` with
its settings in PNG text chunks, then all of them tiled into `grid.png`. LoRA files
(`--lora=FILE[:SCALE]`, diffusers or kohya format) are merged into the weights in order. The UNet call
is built here once, compiled when cfg.sample.compile says so, and handed to the pipeline.
Every input problem raises a UserError (MissingFileError for a missing file) whose
one-line message names it, and the ones that need no model (flags, options, --outdir)
do so before the checkpoint loads.
"""

import os

import safetensors
import torch

from sd_func import checkpoint, tree
from sd_func.checkpoint import lora_files
from sd_func.errors import MissingFileError, UserError
from sd_func.pipelines import generate, images, options, unet_call


def load_model(ckpt: str, cfg, device=None):
    """(params on device, merged cfg): the checkpoint's model sections, cfg's others."""
    if not ckpt:
        raise UserError("--ckpt is required: a diffusers folder, CompVis file, native file or training workdir")
    if not os.path.exists(ckpt):
        raise MissingFileError(f"--ckpt={ckpt}: checkpoint not found")
    sample = cfg.get("sample", {})
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = options.torch_dtype(sample.get("dtype", "auto"), device)
    ema = None if sample.get("ema", True) else False  # None: the EMA weights when the file has them
    params, merged = checkpoint.load(ckpt, cfg=cfg, ema=ema, dtype=dtype)
    if not merged.text_encoder.get("tokenizer", "") and "text_encoder" in cfg:
        merged.text_encoder.tokenizer = cfg.text_encoder.get("tokenizer", "")
    return tree.to(params, device=device), merged


def read_prompts(prompts=(), prompts_file: str | None = None) -> list[str]:
    """--prompt values, or the non-empty lines of --prompts_file (not both)."""
    prompts = list(prompts or ())
    if prompts_file:
        if prompts:
            raise UserError("give --prompt or --prompts_file, not both")
        if not os.path.isfile(prompts_file):
            raise MissingFileError(f"--prompts_file={prompts_file}: file not found")
        with open(prompts_file, encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh if line.strip()]
        if not prompts:
            raise UserError(f"--prompts_file={prompts_file}: no prompts in the file")
    if not prompts:
        raise UserError("no prompt: pass --prompt=... (repeatable) or --prompts_file=FILE")
    return prompts


def parse_loras(specs) -> list[tuple[str, float]]:
    """--lora values "FILE" or "FILE:SCALE" -> [(file, scale)]; each file must exist."""
    out = []
    for spec in specs or ():
        path, scale = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                path = spec  # a ':' that is part of the file name
        if not os.path.isfile(path):
            raise MissingFileError(f"--lora={spec}: file not found")
        out.append((path, scale))
    return out


def read_loras(specs, params: dict) -> list[tuple[dict, float]]:
    """[(lora_params, scale)] of --lora values, each file checked against the model's params."""
    return [(lora_files.read(path, params), scale) for path, scale in parse_loras(specs)]


def read_latents(path: str, n: int, channels: int) -> torch.Tensor:
    """The tensor `latents` [n, channels, h, w] of a safetensors file."""
    if not os.path.isfile(path):
        raise MissingFileError(f"--latents={path}: file not found")
    try:
        with safetensors.safe_open(path, "pt") as fh:
            names = list(fh.keys())
            if "latents" not in names:
                raise UserError(f"--latents={path}: no tensor named 'latents' (has {names[:5]})")
            x = fh.get_tensor("latents")
    except safetensors.SafetensorError as e:
        raise UserError(f"--latents={path}: not a safetensors file ({e})") from e
    if x.ndim != 4 or x.shape[0] != n or x.shape[1] != channels:
        raise UserError(f"--latents={path}: latents have shape {tuple(x.shape)}, expected "
                         f"[{n}, {channels}, h, w] for {n} images")
    return x.float()


def run(cfg, ckpt: str, prompts, outdir: str, negative_prompt: str = "", seed: int = 0,
        num_images: int = 1, latents: str | None = None, init_image: str | None = None,
        mask: str | None = None, strength: float | None = None, progress: bool = True, loras=()) -> list[str]:
    """Generate and write the images; returns the paths written (grid.png last).

    loras: --lora values ("FILE" or "FILE:SCALE"), merged in order."""
    if num_images < 1:
        raise UserError(f"--num_images={num_images}: expected >= 1")
    if mask and not init_image:
        raise UserError("--mask needs --init_image (the image to inpaint)")
    if strength is not None and not init_image:
        raise UserError("--strength needs --init_image (img2img or inpaint)")
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UserError(f"--outdir={outdir}: exists and is not a folder")
    # Bad sampler/steps/size/compile values fail here, before the checkpoint loads.
    options.resolve(cfg)
    parse_loras(loras)
    compile = cfg.get("sample", {}).get("compile", False)
    unet_call.backend_of(compile)
    params, cfg = load_model(ckpt, cfg)
    # Resolved again: default sizes follow the checkpoint's UNet.
    o = options.resolve(cfg, progress=progress, unet_fn=unet_call.make_unet_fn(cfg.unet, compile))
    jobs = [(p, seed + k) for k, p in enumerate(p for p in prompts for _ in range(num_images))]
    kw = dict(seeds=[s for _, s in jobs], negative_prompt=negative_prompt, options=o,
              loras=read_loras(loras, params))
    if latents:
        kw["latents"] = read_latents(latents, len(jobs), cfg.vae.latent_channels)
    job_prompts = [p for p, _ in jobs]
    if init_image is None:
        out = generate.txt2img(params, cfg, job_prompts, **kw)
        mode, extra = "txt2img", {}
    else:
        image = images.load_image(_exists(init_image, "--init_image"))
        if mask is None:
            strength = 0.8 if strength is None else strength
            out = generate.img2img(params, cfg, job_prompts, image, strength=strength, **kw)
            mode = "img2img"
        else:
            m = images.load_mask(_exists(mask, "--mask"))
            if tuple(m.shape) != tuple(image.shape[:2]):
                raise UserError(f"--mask={mask} is {m.shape[0]}x{m.shape[1]} but --init_image={init_image} "
                                 f"is {image.shape[0]}x{image.shape[1]}: they must be the same size")
            strength = 1.0 if strength is None else strength
            out = generate.inpaint(params, cfg, job_prompts, image, m, strength=strength, **kw)
            mode = "inpaint"
        extra = dict(init_image=init_image, mask=mask or "", strength=strength)
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for k, (p, s) in enumerate(jobs):
        text = dict(prompt=p, negative_prompt=negative_prompt, seed=s, sampler=o.sampler, steps=o.steps,
                    guidance_scale=o.guidance_scale, guidance_rescale=o.guidance_rescale, eta=o.eta,
                    clip_skip=o.clip_skip, dtype=str(o.dtype), mode=mode, checkpoint=ckpt, **extra)
        if loras:
            text["loras"] = ",".join(loras)
        if latents:
            text["latents"] = f"{latents}[{k}]"
        paths.append(os.path.join(outdir, f"{k:05d}.png"))
        images.save_png(paths[-1], out[k], text)
    paths.append(os.path.join(outdir, "grid.png"))
    images.save_png(paths[-1], images.grid(out, cols=num_images if len(prompts) > 1 else None))
    return paths


def _exists(path: str, flag: str) -> str:
    if not os.path.isfile(path):
        raise MissingFileError(f"{flag}={path}: file not found")
    return path
