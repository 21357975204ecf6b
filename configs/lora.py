"""LoRA fine-tuning of a checkpoint (Hu et al. 2021; NeMo's sdlora: rank 32 on the UNet's
attention projections), the base weights frozen.

  python run_train.py --config=configs/lora.py --config.init_from=PATH \
      --config.data.path=FOLDER --workdir=runs/lora
  python run_sample.py --ckpt=PATH --lora=runs/lora/pytorch_lora_weights.safetensors --prompt=...

init_from: the base model (diffusers folder, CompVis or native file, training workdir).
config.lora: rank, alpha (the update is alpha / rank * B @ A), target (names of
sd_func.lora.TARGETS, comma-separated: attn, te_attn, te_mlp, conv (LoCon); or a regex over
params paths), train_text_encoder (adapt the text encoder's modules that target matches
too), format of the exported file (diffusers or kohya). Each checkpoint also writes
<workdir>/pytorch_lora_weights.safetensors, which diffusers' load_lora_weights reads.
Variant `configs/lora.py:tiny`: the same on configs/tiny.py's random model and the
shapes data, in seconds (tests).
"""

import ml_collections

from configs import tiny, txt2img


def lora_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(rank=32, alpha=32.0, target="attn,te_attn", train_text_encoder=False,
                                       format="diffusers"))
    c.update(overrides)
    return c


def get_config(arg=None):
    variant = arg or "default"
    if variant not in ("default", "tiny"):
        raise ValueError(f"unknown variant {variant!r}; expected 'default' or 'tiny'")
    if variant == "tiny":
        c = tiny.get_config()
        c.lora = lora_config(rank=4, alpha=4.0)
        c.train.update(lr=1e-2, weight_decay=0.0)
        return c
    c = txt2img.get_config()
    c.lora = lora_config()
    # diffusers' train_text_to_image_lora.py: AdamW 1e-4, constant; the LoRA alone is in the
    # state, so EMA is cheap but rarely used: samples and the exported file use the raw weights.
    c.train.update(lr=1e-4, lr_schedule="constant", warmup=0, steps=15_000, batch_size=8, ema_decay=0.999,
                   checkpoint_every=500, sample_every=500)
    c.sample.ema = False
    return c
