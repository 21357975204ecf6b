"""The FID-CLIP curve of a checkpoint, as NeMo and MLPerf evaluate Stable Diffusion: what run_eval.py runs.

For each guidance scale, image i of the prompt list is generated with seed `seed + i` (the
sampler, steps and size of cfg.sample, as run_sample.py) and written to
`<outdir>/guidance_<g>/<i:05d>.png` (PNG text chunks record prompt, seed and settings). An
image already on disk is not generated again, so an interrupted run resumes; files are
written atomically, so a file on disk is a whole image. Under torchrun (or Slurm, through
sd_func.train.distributed) rank r generates the images i with i % world == r; an image
depends only on its seed, so any number of processes writes the same files. After a
barrier rank 0 computes, per guidance scale, FID against `--real` (an image folder or a
pytorch-fid .npz) and both CLIP scores, and writes `results.json` and `fid_clip.png`.

Prompts come from a text file (one per line), a COCO captions JSON (`annotations[*].caption`,
`num_prompts` of them drawn without replacement with `prompt_seed`), or an image folder
with `metadata.jsonl` (its captions, in file order).
"""

import json
import os
import time

import matplotlib
import numpy as np
import tqdm

from sd_func import fileio, pipelines
from sd_func.data import folder as data_folder
from sd_func.errors import MissingFileError, UserError
from sd_func.eval import clip_score, fid
from sd_func.pipelines import images as image_io
from sd_func.pipelines import job
from sd_func.train import distributed

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NO_CLIP = "none"


def coco_prompts(path: str, num_prompts: int, seed: int = 0) -> list[str]:
    """num_prompts captions of a COCO captions JSON (captions_val2014.json), drawn with seed."""
    data = fileio.read_json(path)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not anns or not all(isinstance(a, dict) and "caption" in a for a in anns):
        raise UserError(f"--coco_captions={path}: expected COCO's {{'annotations': [{{'caption': ...}}, ...]}}")
    if num_prompts > len(anns):
        raise UserError(f"--num_prompts={num_prompts}: {path} has only {len(anns)} captions")
    pick = np.random.default_rng(seed).choice(len(anns), size=num_prompts, replace=False)
    return [" ".join(str(anns[i]["caption"]).split()) for i in pick]


def read_prompts(prompts_file=None, coco_captions=None, num_prompts=None, metadata_folder=None,
                 prompt_seed: int = 0) -> list[str]:
    """The evaluation prompts from exactly one of the three sources."""
    given = [n for n, v in (("--prompts_file", prompts_file), ("--coco_captions", coco_captions),
                            ("--prompts_folder", metadata_folder)) if v]
    if len(given) != 1:
        raise UserError(f"give exactly one prompt source (--prompts_file, --coco_captions or --prompts_folder), "
                         f"got {given or 'none'}")
    if prompts_file:
        prompts = job.read_prompts(prompts_file=prompts_file)
    elif coco_captions:
        return coco_prompts(coco_captions, num_prompts or 30000, prompt_seed)
    else:
        if not os.path.isfile(os.path.join(metadata_folder, "metadata.jsonl")):
            raise MissingFileError(f"--prompts_folder={metadata_folder}: no metadata.jsonl there")
        prompts = [text for _, text in data_folder.list_folder(metadata_folder)]
    return prompts[:num_prompts] if num_prompts else prompts


def guidance_dir(outdir: str, g: float) -> str:
    return os.path.join(outdir, f"guidance_{g:g}")


def generate(params, cfg, prompts, guidance_scales, outdir: str, ckpt: str = "", seed: int = 0,
             progress: bool = True) -> int:
    """Write this rank's missing images for every guidance scale; returns how many it generated."""
    rank, world = distributed.rank(), distributed.world_size()
    unet_fn = pipelines.make_unet_fn(cfg.unet, cfg.sample.get("compile", False))
    todo = [(g, i) for g in guidance_scales for i in range(rank, len(prompts), world)
            if not os.path.isfile(os.path.join(guidance_dir(outdir, g), f"{i:05d}.png"))]
    bar = tqdm.tqdm(total=len(todo), desc=f"generate (rank {rank})", disable=not progress)
    batch = int(cfg.sample.get("batch_size", 4))
    for g in guidance_scales:
        idx = [i for gg, i in todo if gg == g]
        o = pipelines.resolve_options(cfg, guidance_scale=g, unet_fn=unet_fn, progress=False)
        os.makedirs(guidance_dir(outdir, g), exist_ok=True)
        for k in range(0, len(idx), batch):
            chunk = idx[k:k + batch]
            out = pipelines.txt2img(params, cfg, [prompts[i] for i in chunk], seeds=[seed + i for i in chunk],
                                    options=o)
            for i, im in zip(chunk, out):
                text = dict(prompt=prompts[i], seed=seed + i, sampler=o.sampler, steps=o.steps, guidance_scale=g,
                            checkpoint=ckpt)
                path = os.path.join(guidance_dir(outdir, g), f"{i:05d}.png")
                fileio.atomic_write(lambda tmp, im=im, text=text: image_io.save_png(tmp, im, text), path, ".png")
            bar.update(len(chunk))
    bar.close()
    return len(todo)


def evaluate_scale(folder: str, prompts, real_stats, inception, clip_model, resize: str, batch_size: int) -> dict:
    """FID, both CLIP scores and n of one guidance scale's image folder."""
    params, norm = inception
    paths = [os.path.join(folder, f"{i:05d}.png") for i in range(len(prompts))]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise MissingFileError(f"{folder}: {len(missing)} of {len(paths)} images missing (e.g. {missing[0]})")
    feats = fid.features(params, norm, fid.batches_of(paths, batch_size), resize)
    row = {"fid": fid.distance_to(feats, *real_stats[:2]), "n": len(paths)}
    if clip_model is not None:
        cos = np.concatenate([clip_score.cosines(clip_model, np.stack(fid.read_images(paths[i:i + batch_size])),
                                                 prompts[i:i + batch_size], batch_size)
                              for i in range(0, len(paths), batch_size)])
        row.update(clip_score.scores(cos))
    else:
        row.update(clip_score=None, clip_score_nemo=None)
    return row


def plot(rows: list[dict], path: str) -> None:
    """fid_clip.png: FID against CLIP score, one point per guidance scale (FID against guidance without CLIP)."""
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    has_clip = all(r["clip_score"] is not None for r in rows)
    xs = [r["clip_score"] if has_clip else r["guidance_scale"] for r in rows]
    ax.plot(xs, [r["fid"] for r in rows], "o-")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['guidance_scale']:g}", (x, r["fid"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("CLIP score (torchmetrics)" if has_clip else "guidance scale")
    ax.set_ylabel("FID")
    ax.set_title("FID-CLIP curve (labels: guidance scale)" if has_clip else "FID per guidance scale")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fileio.atomic_write(lambda tmp: fig.savefig(tmp, format="png"), path, ".png")
    plt.close(fig)


def run(cfg, ckpt: str, prompts, guidance_scales, outdir: str, real: str, clip: str | None,
        inception_path: str | None = None, resize: str = "bilinear", seed: int = 0, batch_size: int = 32,
        log=print) -> dict | None:
    """The whole evaluation (see the module docstring); returns the results on rank 0, None elsewhere."""
    guidance_scales = [float(g) for g in guidance_scales]
    if not guidance_scales:
        raise UserError("--guidance_scales: give at least one, e.g. --guidance_scales=1.5,2,3,4,5,6,7,8")
    if len(prompts) < 2:
        raise UserError(f"{len(prompts)} prompt(s): FID needs at least 2 images per guidance scale")
    if not real:
        raise UserError("--real is required: an image folder or a pytorch-fid .npz statistics file")
    if not real.endswith(".npz"):
        fid.list_images(real, "--real")
    elif not os.path.isfile(real):
        raise MissingFileError(f"--real={real}: statistics file not found")
    use_clip = clip != NO_CLIP
    clip_model = clip_score.load(clip) if use_clip else None  # a bad --clip fails before any image is made
    inception = fid.load_inception(inception_path)
    distributed.init()
    params, cfg = job.load_model(ckpt, cfg)
    t0 = time.time()
    made = generate(params, cfg, prompts, guidance_scales, outdir, ckpt, seed)
    log(f"generated {made} images in {time.time() - t0:.0f} s (rank {distributed.rank()}); "
        f"{len(prompts) * len(guidance_scales)} in all")
    distributed.barrier()
    if not distributed.is_main():
        return None
    real_stats = fid.folder_statistics(*inception, real, resize, batch_size, progress=True)
    o = pipelines.resolve_options(cfg)
    rows = []
    for g in tqdm.tqdm(guidance_scales, desc="metrics"):
        row = evaluate_scale(guidance_dir(outdir, g), prompts, real_stats, inception, clip_model, resize, batch_size)
        row.update(guidance_scale=g, sampler=o.sampler, steps=o.steps, height=o.height, width=o.width, seed=seed,
                   checkpoint=ckpt, real=real, real_n=real_stats[2], inception=inception_path or fid.default_weights(),
                   resize=resize, clip=clip if use_clip else None)
        rows.append(row)
        clip_note = (f", CLIP score {row['clip_score']:.3f} (NeMo mean cos {row['clip_score_nemo']:.4f})"
                     if use_clip else "")
        log(f"guidance {g:g}: FID {row['fid']:.3f}{clip_note}")
    result = {"results": rows, "num_prompts": len(prompts), "images": outdir}
    fileio.write_json(result, os.path.join(outdir, "results.json"))
    plot(rows, os.path.join(outdir, "fid_clip.png"))
    return result


def fid_only(real: str, fake: str, inception_path: str | None = None, resize: str = "bilinear",
             batch_size: int = 32) -> dict:
    """FID between two image folders (or .npz statistics files)."""
    if not real or not fake:
        raise UserError("--fid_only needs --real=DIR|stats.npz and --fake=DIR|stats.npz")
    for flag, src in (("--real", real), ("--fake", fake)):  # bad input fails before the weights load
        if src.endswith(".npz"):
            fid.load_stats(src)
        else:
            fid.list_images(src, flag)
    both_npz = real.endswith(".npz") and fake.endswith(".npz")
    inception = (None, None) if both_npz else fid.load_inception(inception_path)
    a = fid.folder_statistics(*inception, real, resize, batch_size, "--real", progress=True)
    b = fid.folder_statistics(*inception, fake, resize, batch_size, "--fake", progress=True)
    d = fid.distance_to(b[3], *a[:2]) if b[3] is not None else fid.frechet_distance(*b[:2], *a[:2])
    return {"fid": d, "real": real, "real_n": a[2], "fake": fake, "fake_n": b[2],
            "inception": inception_path or fid.default_weights(), "resize": resize}


def dumps(result: dict) -> str:
    return json.dumps(result, indent=1)
