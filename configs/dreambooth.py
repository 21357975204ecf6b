"""DreamBooth (Ruiz et al. 2023) with prior preservation, as diffusers' train_dreambooth.py.

  python run_train.py --config=configs/dreambooth.py --config.init_from=PATH \
      --config.data.instance_dir=photos/ --config.data.instance_prompt="a photo of sks dog" \
      --config.data.class_prompt="a photo of dog" --workdir=runs/dreambooth
  (variant configs/dreambooth.py:lora trains a LoRA instead of the whole UNet)

The first start generates config.data.num_class_images images of the class prompt with
the base model (cfg.sample's sampler, steps and guidance) into <workdir>/class_images
(or config.data.class_dir); a restart keeps those already there. config.lora.rank > 0
trains a LoRA instead of the whole UNet (the `lora` variant: rank 4, alpha 4). Each global batch is
half instance images (instance prompt) and half class images (class prompt); the loss
is mse(instance) + config.train.prior_loss_weight * mse(class). An empty class_prompt
turns prior preservation off. config.train.train_text_encoder trains the text encoder
too (full fine-tune), config.lora.train_text_encoder its LoRA.
Variant `tiny`: configs/tiny.py's random model on a folder the test makes (seconds).
"""

from configs import lora, tiny, txt2img


def _dreambooth(c, lora_rank: int = 0):
    c.data.update(kind="dreambooth", instance_dir="", instance_prompt="a photo of sks dog",
                  class_prompt="a photo of dog", class_dir="", num_class_images=100, random_flip=False)
    c.train.update(prior_loss_weight=1.0, cond_drop=0.0, train_text_encoder=False)
    c.lora = lora.lora_config(rank=lora_rank, alpha=4.0)  # rank 0: a full fine-tune
    return c


def get_config(arg=None):
    variant = arg or "full"
    if variant not in ("full", "lora", "tiny"):
        raise ValueError(f"unknown variant {variant!r}; expected 'full', 'lora' or 'tiny'")
    if variant == "tiny":
        c = _dreambooth(tiny.get_config())
        c.data.update(num_class_images=4, resolution=32)
        c.train.update(batch_size=4, steps=4, checkpoint_every=2)
        return c
    c = _dreambooth(txt2img.get_config(), lora_rank=4 if variant == "lora" else 0)
    # diffusers' example: batch 1 instance + 1 class, constant lr 5e-6 (LoRA: 1e-4), 400 steps
    c.train.update(batch_size=2, lr=1e-4 if variant == "lora" else 5e-6, lr_schedule="constant", warmup=0,
                   steps=400, weight_decay=1e-2, ema_decay=0.999, checkpoint_every=100, sample_every=0,
                   precision="bf16")
    c.sample.update(ema=False, prompts=("a photo of sks dog",))
    return c
