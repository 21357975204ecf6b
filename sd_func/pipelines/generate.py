"""txt2img, img2img and inpaint: latent diffusion (Rombach et al. 2022) as a composition of
the pure pieces - tokenizer, text encoder, classifier-free guidance, a sampler, the VAE.

Each pipeline follows the diffusers pipeline of the same name step for step
(StableDiffusionPipeline, StableDiffusionImg2ImgPipeline - SDEdit, Meng et al. 2022 -
and StableDiffusionInpaintPipeline), so the same weights and the same initial latents
give the same images. What differs is randomness: image i depends only on seeds[i].
Its key is split into `image_keys(seed)`: "noise" draws the initial latents, "vae"
the VAE posterior samples (fold_in 0: the init image, 1: the masked image) and "steps"
the noise of stochastic samplers (fold_in step index). Images are processed in chunks
of `batch_size`; a chunk's rows never mix, so batch size and position do not change an
image (up to the float rounding of batched kernels).

The three share one `options.Options` (sampler, steps, guidance, sizes, dtype, output
type, callback, the UNet call, step noise): pass `options=` (from options.resolve) or
the same names as keywords, which win over cfg.sample.
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sd_func import lora, random, tree
from sd_func.diffusion import guidance, samplers
from sd_func.errors import UserError
from sd_func.models import autoencoder, text_encoder, tokenizer
from sd_func.pipelines import images as imgs
from sd_func.pipelines.options import OUTPUT_TYPES, resolve, torch_dtype
from sd_func.pipelines.unet_call import make_unet_fn


def image_keys(seed: int) -> dict:
    """The keys an image with this seed draws from (see the module docstring)."""
    k_noise, k_vae, k_steps = random.split(random.key(seed), 3)
    return {"noise": k_noise, "vae": k_vae, "steps": k_steps}


def vae_scale_factor(cfg) -> int:
    return 2 ** (len(cfg.vae.block_out_channels) - 1)


def device_of(params):
    return params["unet"]["conv_in"]["weight"].device


# ----------------------------------------------------------------------------- pieces


def encode_prompts(params_te, cfg, prompts, clip_skip=0) -> torch.Tensor:
    """Prompts -> text encoder hidden states [B, 77, D] (diffusers' encode_prompt, clip_skip
    counted as diffusers does: 1 = the penultimate layer)."""
    tok = tokenizer.load(cfg.text_encoder.tokenizer)
    ids = tokenizer.encode(tok, list(prompts), max_length=tokenizer.max_length(tok, cfg.text_encoder))
    device = params_te["text_model"]["final_layer_norm"]["weight"].device
    return text_encoder.apply(params_te, ids.to(device), cfg.text_encoder, clip_skip=int(clip_skip) or None)


def encode_images(params_vae, cfg, images: torch.Tensor, keys) -> torch.Tensor:
    """images [B,3,H,W] in [-1,1] -> scaled latents: a posterior sample (noise row b from
    keys[b]) times scaling_factor, as diffusers' _encode_vae_image does."""
    w = params_vae["encoder"]["conv_in"]["weight"]
    mean, logvar = autoencoder.encode(params_vae, images.to(w.device, w.dtype), cfg.vae)
    noise = random.normal_per_key(keys, mean.shape[1:], device=mean.device)
    z = autoencoder.sample_latent(mean.float(), logvar.float(), noise)
    return z * cfg.vae.scaling_factor


def decode_latents(params, cfg, latents: torch.Tensor, output_type: str = "uint8", dtype=None):
    """Scaled latents [B,C,h,w] -> images: uint8 [B,H,W,3] or float [B,H,W,3] in [0, 1]."""
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"output_type={output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")
    if output_type == "latent":
        return latents
    p = params["vae"] if dtype is None else tree.cast(params["vae"], dtype)
    x = autoencoder.decode(p, latents.to(device_of(params)) / cfg.vae.scaling_factor, cfg.vae)
    return imgs.to_uint8(x) if output_type == "uint8" else imgs.to_unit(x)


def inpaint_blend(mask, z0, noise):
    """The step_transform of a 4-channel UNet's inpaint (diffusers' legacy blend): after each
    step the known region (mask 0) is the image latents z0 noised to the state's new sigma
    with the initial noise, z0 + sigma_next noise; exactly z0 after the last step."""
    def blend(i, x, sigma_next):
        return (1 - mask) * (z0 + sigma_next * noise) + mask * x
    return blend


# ----------------------------------------------------------------------------- batching


def _batch(prompts, seeds, negative_prompt, n_latents, cfg):
    """(prompts, seeds, negatives) as equal-length lists; one prompt broadcasts."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if seeds is not None:
        seeds = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
    n = max(len(prompts), len(seeds or ()), n_latents or 0)
    if seeds is None:
        seeds = [int(cfg.get("seed", 0)) + i for i in range(n)]
    if not prompts:
        raise UserError("no prompt: pass at least one prompt (it may be \"\")")
    if len(prompts) == 1:
        prompts = prompts * n
    negs = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
    for name, v in (("prompts", prompts), ("seeds", seeds), ("negative prompts", negs)):
        if len(v) != n:
            raise UserError(f"{len(v)} {name} for {n} images: give one per image (or one prompt for all)")
    if n_latents is not None and n_latents != n:
        raise UserError(f"latents hold {n_latents} images for {n} prompts/seeds")
    return prompts, seeds, negs


def _rows(x, idx):
    """Rows idx of x, or x's single row broadcast (an init image or mask shared by all images)."""
    if x.shape[0] == 1:
        return x.expand(len(idx), *x.shape[1:])
    return x[idx]


def _latent_size(cfg, o, latents, image=None):
    """(h, w) of the latent grid, from latents, the init image or height/width."""
    f = vae_scale_factor(cfg)
    c = cfg.vae.latent_channels
    if latents is not None:
        if latents.ndim != 4 or latents.shape[1] != c:
            raise UserError(f"latents: expected shape [N,{c},h,w], got {tuple(latents.shape)}")
        h, w = latents.shape[2] * f, latents.shape[3] * f
        if image is not None and tuple(image.shape[-2:]) != (h, w):
            raise UserError(f"latents {tuple(latents.shape)} make {h}x{w} images but the init image "
                            f"is {image.shape[-2]}x{image.shape[-1]}")
    elif image is not None:
        h, w = image.shape[-2:]
    else:
        h, w = o.height, o.width
    for k, v in (("height", h), ("width", w)):
        if v % 8 or v % f:
            raise UserError(f"{k}={v}: expected a multiple of 8 (and of the VAE's factor {f})")
    return h // f, w // f


# ----------------------------------------------------------------------------- the run


@torch.no_grad()
def _run(params, cfg, prompts, seeds, negative_prompt, latents, o, mode, init_image=None, mask=None,
         strength=1.0, loras=()):
    device = device_of(params)
    params = lora.merge(params, loras or ())
    p = {k: tree.cast(v, torch_dtype(o.dtype, device)) for k, v in params.items()}
    image = None if init_image is None else imgs.image_to_tensor(init_image)
    m = None
    if mask is not None:
        m = imgs.mask_to_tensor(mask)
        if tuple(m.shape[-2:]) != tuple(image.shape[-2:]):
            raise UserError(f"mask is {m.shape[-2]}x{m.shape[-1]} but the init image is "
                            f"{image.shape[-2]}x{image.shape[-1]}: they must be the same size")
    if latents is not None:
        latents = torch.as_tensor(latents).float()
    h, w = _latent_size(cfg, o, latents, image)
    prompts, seeds, negs = _batch(prompts, seeds, negative_prompt,
                                  None if latents is None else latents.shape[0], cfg)
    for name, x in (("init image", image), ("mask", m)):
        if x is not None and x.shape[0] not in (1, len(seeds)):
            raise UserError(f"{x.shape[0]} {name}s for {len(seeds)} images: give one, or one per image")
    start = 0 if mode == "txt2img" or (mode == "inpaint" and strength == 1.0) else \
        samplers.strength_to_start(o.steps, strength)
    call = o.unet_fn or make_unet_fn(cfg.unet)
    chunks = [list(range(i, min(i + o.batch_size, len(seeds)))) for i in range(0, len(seeds), o.batch_size)]
    bar = tqdm(total=len(chunks) * (o.steps - start), desc=mode, disable=not o.progress, leave=False)
    out = []
    for idx in chunks:
        keys = [image_keys(seeds[i]) for i in idx]
        noise = latents[idx].to(device) if latents is not None else \
            random.normal_per_key([k["noise"] for k in keys], (cfg.vae.latent_channels, h, w), device=device)
        job = dict(mode=mode, start=start, strength=strength, keys=keys, noise=noise,
                   image=None if image is None else _rows(image, idx).to(device),
                   mask=None if m is None else _rows(m, idx).to(device))
        z = _sample_chunk(p, cfg, o, [prompts[i] for i in idx], [negs[i] for i in idx], job, call, bar)
        out.append(decode_latents(p, cfg, z, o.output_type))
    bar.close()
    return torch.cat(out)


def _sample_chunk(p, cfg, o, prompts, negs, job, call, bar):
    """Final scaled latents of one chunk: conditioning, x_T, the sampler loop."""
    cond = encode_prompts(p["text_encoder"], cfg, prompts, o.clip_skip)
    uncond = encode_prompts(p["text_encoder"], cfg, negs, o.clip_skip) if o.guidance_scale > 1 else cond
    name, dcfg, steps, start = o.sampler, cfg.diffusion, o.steps, job["start"]
    noise, keys, mode = job["noise"], job["keys"], job["mode"]
    in_ch = cfg.unet.in_channels

    extra = None  # what a 9-channel inpainting UNet sees beside x: [mask, masked-image latents]
    blend = None  # a 4-channel inpaint's per-step blend of the known region
    z0 = None
    if mode == "inpaint":
        if in_ch not in (4, 4 + 1 + cfg.vae.latent_channels):
            raise UserError(f"inpaint: the UNet has {in_ch} input channels; expected 4 (blend) "
                            f"or {5 + cfg.vae.latent_channels} (an inpainting model)")
        mask = F.interpolate(job["mask"], size=noise.shape[-2:])
        if in_ch == 4:
            z0 = encode_images(p["vae"], cfg, job["image"], [random.fold_in(k["vae"], 0) for k in keys])
            blend = inpaint_blend(mask, z0, noise)
        else:
            masked = job["image"] * (job["mask"] < 0.5)
            extra = torch.cat([mask, encode_images(p["vae"], cfg, masked,
                                                   [random.fold_in(k["vae"], 1) for k in keys])], dim=1)
    elif in_ch != cfg.vae.latent_channels:
        raise UserError(f"{mode}: the UNet has {in_ch} input channels (an inpainting model?); "
                        f"use inpaint, or a {cfg.vae.latent_channels}-channel model")

    # x_T: pure noise at the sampler's initial scale, or the init image noised to step `start`.
    if mode == "txt2img" or (mode == "inpaint" and job["strength"] == 1.0):
        x = noise * samplers.init_noise_sigma(name, dcfg, steps)
    else:
        if z0 is None:
            z0 = encode_images(p["vae"], cfg, job["image"], [random.fold_in(k["vae"], 0) for k in keys])
        x = samplers.add_noise(name, dcfg, steps, z0, noise, start)

    def model_fn(x_in, t, context):
        if extra is not None:
            x_in = torch.cat([x_in, extra.repeat(x_in.shape[0] // extra.shape[0], 1, 1, 1).to(x_in.dtype)], 1)
        return call(p["unet"], x_in, t, context)

    guided = guidance.classifier_free(model_fn, cond, uncond, o.guidance_scale, o.guidance_rescale)
    noise_fn = o.noise_fn or samplers.noise_fn_from_keys([k["steps"] for k in keys], device=x.device)

    def on_step(info):
        bar.update(1)
        if o.callback is not None:
            o.callback(info)

    return samplers.sample(name, guided, x, dcfg, steps, eta=o.eta, noise_fn=noise_fn, callback=on_step,
                           start=start, step_transform=blend)


# ----------------------------------------------------------------------------- public


def txt2img(params, cfg, prompts, seeds=None, *, negative_prompt="", latents=None, options=None, loras=(),
            **overrides):
    """Text to image. Returns uint8 [B,H,W,3] (output_type "float": [B,H,W,3] in [0, 1] before
    quantisation; "latent": the final scaled latents [B,C,h,w]).

    prompts: a string or a list (one prompt broadcasts to all seeds). seeds: one int per
    image (default cfg.seed + i). latents [N,C,h,w]: the initial noise (as diffusers'
    `latents=`, scaled by the sampler's init_noise_sigma); height and width then follow it.
    options: an options.Options; overrides: any of its fields by name (sampler, steps,
    guidance_scale, ..., output_type, callback, unet_fn, noise_fn), over options or, without
    it, over cfg.sample (see options.py).
    """
    o = resolve(cfg, options, **overrides)
    return _run(params, cfg, prompts, seeds, negative_prompt, latents, o, "txt2img", loras=loras)


def img2img(params, cfg, prompts, init_image, strength=0.8, seeds=None, *, negative_prompt="", latents=None,
            options=None, loras=(), **overrides):
    """SDEdit: init_image (uint8 [H,W,3] / [B,H,W,3], PIL, or float [B,3,H,W] in [0, 1]) encoded,
    noised to the step that `strength` selects (diffusers: the last int(steps * strength)
    steps run), then denoised. latents, if given, is the noise added to the image.
    The output has the init image's size (height and width are not options here).
    Options as txt2img's."""
    o = resolve(cfg, options, **_sized_by_image(overrides, "img2img"))
    return _run(params, cfg, prompts, seeds, negative_prompt, latents, o, "img2img", init_image=init_image,
                strength=strength, loras=loras)


def inpaint(params, cfg, prompts, init_image, mask, strength=1.0, seeds=None, *, negative_prompt="",
            latents=None, options=None, loras=(), **overrides):
    """Repaint where mask >= 0.5 (white), keep the rest. A 9-channel inpainting UNet sees
    [x, mask, masked-image latents] at every step (StableDiffusionInpaintPipeline); a
    4-channel UNet gets the known region blended back after each step (inpaint_blend, a
    step_transform of the sampler; diffusers also blends the predictor point of Heun's and
    PLMS's two-evaluation steps, we blend whole steps only).
    mask: PIL, uint8 [H,W] (0..255) or float [H,W] / [B,H,W] / [B,1,H,W] in [0, 1], the
    init image's size. strength < 1 starts from the noised image instead of pure noise.
    Options as txt2img's."""
    o = resolve(cfg, options, **_sized_by_image(overrides, "inpaint"))
    return _run(params, cfg, prompts, seeds, negative_prompt, latents, o, "inpaint", init_image=init_image,
                mask=mask, strength=strength, loras=loras)


def _sized_by_image(overrides, mode):
    given = [k for k in ("height", "width") if overrides.get(k) is not None]
    if given:
        raise UserError(f"{mode}: {' and '.join(given)} come from the init image; do not pass them")
    return overrides
