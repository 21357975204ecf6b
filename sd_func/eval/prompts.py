"""End-of-run evaluation: sample the config's prompts, write a grid, score what was drawn.

`evaluate(params, cfg, outdir)` generates one image per prompt of cfg.sample.prompts
(seed cfg.eval.seed + i for prompt i) with the config's default sampler, steps and
guidance, writes the grid to <outdir>/<cfg.eval.grid>, and, for cfg.eval.kind =
"shapes", reads color, shape and background back from the pixels
(sd_func.eval.shapes) and returns the accuracy. The result is also written as
<outdir>/eval.json.
"""

import json
import os

from sd_func import pipelines
from sd_func.errors import UserError
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
