"""A whole training run as stages: [autoencoder] -> UNet (+ text encoder) -> [evaluation].

It sits above sd_func.train and sd_func.eval (it runs both), below only the entry points.

What `run_train.py` calls. For a from-scratch latent diffusion model (configs/shapes.py)
the config has a `vae_train` section: stage 1 trains the AutoencoderKL
(train.vae_stage) and writes <workdir>/vae/init.safetensors, a native checkpoint of
the whole model (trained VAE with its latent scaling factor, freshly initialised
UNet and text encoder) that stage 2 starts from through `config.init_from`. With an
`eval` section the run ends by sampling the config's prompts with the EMA weights,
writing the grid and printing the score (sd_func.eval.prompts); with cfg.eval.before
(a fine-tune) the config.init_from model is scored the same way first, into
<workdir>/before/eval.json, so the two numbers compare. Every stage resumes
or is skipped when it is already done, so the one command can be run again after
an interruption.
"""

import os
import time

import torch

from sd_func import checkpoint, tree
from sd_func.checkpoint import training as checkpoints
from sd_func.eval import prompts as eval_prompts
from sd_func.train import checks, distributed, loop, vae_stage


def _rank() -> int:
    return distributed.launch_rank()


def autoencoder_stage(cfg, workdir: str, log=print, compile_backend: str = "inductor") -> str:
    """Train the VAE (rank 0; other ranks wait) and return the stage-2 init checkpoint path."""
    path = os.path.join(workdir, "vae", "init.safetensors")
    if os.path.isfile(path):
        return path
    if _rank() != 0:
        while not os.path.isfile(path):  # rank 0 writes it atomically (temp file + rename)
            time.sleep(2.0)
        return path
    params, cfg_init = loop.init_params(cfg)
    vae, scaling = vae_stage.run(cfg, workdir, params["vae"], log=log, compile_backend=compile_backend)
    params["vae"] = vae
    cfg_init = cfg_init.copy_and_resolve_references()
    cfg_init.vae.scaling_factor = scaling
    checkpoint.save(params, cfg_init, path, format="native")
    return path


def run(cfg, workdir: str, compile_backend: str = "inductor", log=print) -> dict:
    """All stages of cfg in workdir; returns the evaluation result ({} without cfg.eval).

    The config is validated first (train.checks.validate: a bad value is a one-line
    UserError before any model is built or data read).
    """
    checks.validate(cfg)
    workdir = os.path.abspath(workdir)
    if "vae_train" in cfg and int(cfg.vae_train.steps) > 0 and not cfg.get("init_from", ""):
        init = autoencoder_stage(cfg, workdir, log=log, compile_backend=compile_backend)
        cfg = cfg.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.init_from = init
    t0 = time.time()
    if "eval" in cfg and cfg.eval.get("before", False) and _rank() == 0:
        before = os.path.join(workdir, "before")
        if not os.path.isfile(os.path.join(before, "eval.json")):
            log("scoring the base model (config.init_from) before fine-tuning:")
            _evaluate(*checkpoint.load(cfg.init_from, ema=None), cfg, before, log)
    loop.train(cfg, workdir, compile_backend=compile_backend)
    if "eval" not in cfg or _rank() != 0:
        return {}
    result = _evaluate(*checkpoints.load_model(workdir, ema=True), cfg, workdir, log)
    log(f"training + evaluation took {time.time() - t0:.0f} s after the autoencoder stage")
    return result


def _evaluate(params: dict, stored, cfg, outdir: str, log) -> dict:
    """eval.prompts.evaluate of a model (params + its stored model config) with cfg's other sections."""
    if torch.cuda.is_available():
        params = tree.to(params, device="cuda")
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        for k in ("unet", "vae", "text_encoder", "diffusion"):
            cfg[k] = stored[k]
    return eval_prompts.evaluate(params, cfg, outdir, log=log)
