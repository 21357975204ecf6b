"""Tiny random-weight checkpoints for the deploy tests, in sd_func's native format, and
the sample settings, model and image comparison the server tests share."""

import os

import numpy as np

from configs import tiny
from sd_func import checkpoint, pipelines, random, tree
from sd_func.models import autoencoder, text_encoder, unet
from sd_func.pipelines import job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.py")
# the sample settings of the server tests, as run_sample.py flags (tiny_model uses the same)
SAMPLE = ["--config.sample.steps=3", "--config.sample.guidance_scale=1.0", "--config.sample.height=16",
          "--config.sample.width=16"]


def tiny_params(cfg, seed: int = 0) -> dict:
    """init() of configs/tiny.py's three models, norms and biases moved off 1 / 0 so that
    every parameter matters."""
    k_unet, k_vae, k_te, k_off = random.split(random.key(seed), 4)
    params = {"unet": unet.init(k_unet, cfg.unet), "vae": autoencoder.init(k_vae, cfg.vae),
              "text_encoder": text_encoder.init(k_te, cfg.text_encoder)}

    flat = tree.flatten(params)
    for i, path in enumerate(sorted(flat)):
        if path.endswith("bias") or "norm" in path:
            flat[path] = flat[path] + 0.1 * random.normal(random.fold_in(k_off, i), flat[path].shape)
    return tree.unflatten(flat)


def tiny_checkpoint(path: str, seed: int = 0, config=None, **unet_overrides) -> str:
    """A native .safetensors of configs/tiny.py's models (or config's), random weights; returns path."""
    cfg = config or tiny.get_config()
    if unet_overrides:
        cfg.unet = unet.config(**{**cfg.unet.to_dict(), **unet_overrides})
    checkpoint.save(tiny_params(cfg, seed), cfg, path)
    return path


def reference_image(params, cfg, prompt: str, seed: int, negative_prompt: str = "", **settings):
    """uint8 [H, W, 3]: the pipeline in-process for one image alone (batch of 1)."""
    return pipelines.txt2img(params, cfg, [prompt], seeds=[seed], negative_prompt=negative_prompt,
                             **settings)[0].numpy()


def tiny_model(ckpt: str):
    """(params, cfg) of ckpt with configs/tiny.py's sample section set as SAMPLE sets it."""
    cfg = tiny.get_config()
    cfg.sample.update(steps=3, guidance_scale=1.0, height=16, width=16)
    return job.load_model(ckpt, cfg, device="cpu")


def max_diff(a, b) -> int:
    """The largest difference of two uint8 images, in u8 levels."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())
