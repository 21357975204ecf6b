"""DreamBooth's class images (Ruiz et al. 2023, prior preservation), generated once by the base model.

`prepare(cfg, workdir, main)` runs before a DreamBooth run builds its data source
(config.data.kind = "dreambooth" with a class prompt): class image i is
txt2img(class prompt, seed CLASS_SEED + i) of config.init_from with the cfg.sample
settings, written as <class_dir>/{i:05d}.png (default class_dir: <workdir>/class_images),
atomically. Images already there are kept, so an interrupted run, a resume or a second
run with the same folder generates only the missing ones, and an image never depends
on which others were generated with it (pipelines: one seed per image).
"""

import os

import torch

from sd_func import checkpoint, fileio, pipelines, tree
from sd_func.errors import UserError
from sd_func.train import distributed

CLASS_SEED = 0x0C1A55
CLASS_DIR = "class_images"


def class_dir(cfg, workdir: str) -> str:
    return cfg.data.get("class_dir", "") or os.path.join(workdir, CLASS_DIR)


def missing(folder: str, n: int) -> list[int]:
    return [i for i in range(n) if not os.path.isfile(os.path.join(folder, f"{i:05d}.png"))]


def generate_class_images(cfg, folder: str) -> int:
    """Write the missing class images into folder; returns how many were generated."""
    todo = missing(folder, int(cfg.data.num_class_images))
    if not todo:
        return 0
    if not cfg.get("init_from", ""):
        raise UserError("config.data.class_prompt (DreamBooth prior preservation) needs config.init_from: "
                        "the base model generates the class images")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params, mcfg = checkpoint.load(cfg.init_from, cfg=cfg, ema=None)
    params = tree.to(params, device=device)
    prompt, bs = str(cfg.data.class_prompt), int(cfg.sample.batch_size)
    os.makedirs(folder, exist_ok=True)
    for start in range(0, len(todo), bs):
        chunk = todo[start:start + bs]
        with torch.no_grad():
            out = pipelines.txt2img(params, mcfg, prompt, seeds=[CLASS_SEED + i for i in chunk], progress=False)
        for i, image in zip(chunk, out.cpu()):
            text = {"prompt": prompt, "seed": CLASS_SEED + i}
            fileio.atomic_write(lambda tmp, image=image, text=text: pipelines.images.save_png(tmp, image, text),
                                os.path.join(folder, f"{i:05d}.png"), suffix=".png")
    return len(todo)


def prepare(cfg, workdir: str, main: bool):
    """cfg with config.data.class_dir set, after rank 0 generated the missing class images."""
    if cfg.data.kind != "dreambooth" or not cfg.data.get("class_prompt", ""):
        return cfg
    if int(cfg.train.batch_size) % 2:
        raise UserError(f"config.train.batch_size={cfg.train.batch_size}: DreamBooth with prior preservation "
                        "needs an even batch (half instance, half class images)")
    folder = class_dir(cfg, workdir)
    if main:
        n = generate_class_images(cfg, folder)
        if n:
            print(f"sd_func train: generated {n} class images in {folder}")
    distributed.barrier()
    cfg = cfg.copy_and_resolve_references()
    cfg.data.class_dir = folder
    return cfg
