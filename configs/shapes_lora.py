"""Teach the trained shapes model a color its data never had, by a LoRA: orange.

  python run_train.py --config=configs/shapes.py --workdir=runs/shapes          # the base (main job)
  python run_train.py --config=configs/shapes_lora.py --config.init_from=runs/shapes \
      --workdir=runs/shapes_lora
  python run_sample.py --config=configs/shapes.py --ckpt=runs/shapes \
      --lora=runs/shapes_lora/pytorch_lora_weights.safetensors \
      --prompt="an orange circle on a white background" --outdir=out/orange

The base model never saw the word (its data's colors are sd_func.data.shapes.COLORS; the
tokenizer knows the word, the text encoder's embedding of it never trained). The
fine-tune sees NUM_EXAMPLES = 48 drawn examples "a orange {shape} on a {color}
background" (data.shapes with colors=(color,)), with a rank-8 LoRA on the UNet's and the
text encoder's attention projections, the base frozen. Before training the base model
draws the 18 prompts of the color twice each (seeds eval.seed + i) and the analyzer
(sd_func.eval.shapes, whose palette has the new colors) scores them into
<workdir>/before/; after training the LoRA'd model does the same into
<workdir>/eval.json. Measured rates and time: README (Fine-tuning).

Variants: `:purple` (the same for purple, which this model cannot learn this way: its
VAE, trained on six colors, reconstructs purple as green or blue, so no UNet can draw it;
see data/shapes.py NEW_COLORS), `:smoke` (the path in seconds).
"""

from configs import lora, shapes
from sd_func.data import shapes as shapes_data

NUM_EXAMPLES = 48


def get_config(arg=None):
    variant = arg or "orange"
    if variant not in ("orange", "purple", "smoke"):
        raise ValueError(f"unknown variant {variant!r}; expected 'orange', 'purple' or 'smoke'")
    new = ("purple",) if variant == "purple" else ("orange",)
    c = shapes.get_config("smoke" if variant == "smoke" else None)
    c.init_from = "runs/shapes"
    c.lora = lora.lora_config(rank=8, alpha=8.0, target="attn,te_attn", train_text_encoder=True)
    c.data.update(colors=new, num_examples=NUM_EXAMPLES)
    c.train.update(steps=300, batch_size=16, lr=2e-3, lr_schedule="constant", warmup=20, ema_decay=0.9,
                   train_text_encoder=False, checkpoint_every=100, keep_checkpoints=1, log_every=25)
    c.sample.update(prompts=tuple(shapes_data.prompts(colors=new)) * 2, batch_size=36)
    c.eval.update(before=True)
    if variant == "smoke":
        c.train.update(steps=4, batch_size=4, warmup=1, checkpoint_every=2, log_every=2)
        c.sample.update(steps=3, batch_size=6, prompts=tuple(shapes_data.prompts(colors=new)[:6]))
    return c
