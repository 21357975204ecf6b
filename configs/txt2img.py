"""Stable Diffusion 1.5: the architecture, sampling defaults and NeMo's training recipe.

Sample (weights from a diffusers folder or CompVis file; the architecture is read
from the checkpoint, these fields give the defaults):
  python run_sample.py --config=configs/txt2img.py --ckpt=PATH --prompt="a photo of a cat"
Train (an image folder with metadata.jsonl, 512 px, AdamW, warmup then hold, EMA):
  torchrun --nproc_per_node=8 run_train.py --config=configs/txt2img.py \
      --config.data.path=/data/laion --workdir=runs/sd15
"""

import ml_collections

from sd_func.diffusion import schedules
from sd_func.models import autoencoder, text_encoder, unet


def sample_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        sampler="dpmpp_2m", steps=25, guidance_scale=7.5, guidance_rescale=0.0, eta=0.0,
        height=512, width=512, batch_size=4,
        dtype="auto",  # auto = float16 on CUDA, float32 on CPU; or float32|float16|bfloat16
        compile=False, clip_skip=0, ema=True,
        prompts=("a red circle on a blue background",),  # validation prompts during training
    ))
    c.update(overrides)
    return c


def train_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        steps=100_000, batch_size=256, lr=1e-4, lr_schedule="constant", warmup=10_000,
        adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=1e-2,
        weight_decay_exclude=r".*(bias|norm.*)$", grad_clip=1.0,
        ema_decay=0.9999, cond_drop=0.1, min_snr_gamma=0.0, noise_offset=0.0,
        precision="bf16", compile=True, train_text_encoder=False,
        checkpoint_every=1000, keep_checkpoints=3, log_every=50, sample_every=5000,
        loss_scale_init=2.0**16, loss_scale_window=1000,
        grad_accum=1,           # micro-batches per step: global batch = micro x grad_accum x processes
        remat="none",           # activation checkpointing: none | attention | resnets | all (eager step)
        shard_optimizer=False,  # ZeRO-1: AdamW moments and EMA sharded over the processes
    ))
    c.update(overrides)
    return c


def data_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        kind="folder", path="", resolution=512, center_crop=True, random_flip=True,
        num_workers=2,
        buckets="",             # aspect-ratio buckets: "" (off), "auto", or "HxW,HxW,..." (sd_func.data.buckets)
        bucket_step=64, bucket_max_ratio=2.0,  # the "auto" table: sides multiple of step, aspect <= ratio
        bucket_weights="", bucket_buffer=32, bucket_estimate=256,  # webdataset: step buckets' draw, buffers
    ))
    c.update(overrides)
    return c


def get_config(arg=None):
    if arg:
        raise ValueError(f"unknown variant {arg!r}: this config has no variants")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""  # a checkpoint (diffusers folder, CompVis or native file) to fine-tune from
    c.unet = unet.config()
    c.vae = autoencoder.config()
    c.text_encoder = text_encoder.config(tokenizer="openai/clip-vit-large-patch14")
    c.diffusion = schedules.config()
    c.sample = sample_config()
    c.train = train_config()
    c.data = data_config()
    return c
