"""The built-in main job: a text-to-image latent diffusion model, from scratch, on a CPU.

  python run_train.py --config=configs/shapes.py --workdir=runs/shapes
  python run_sample.py --config=configs/shapes.py --ckpt=runs/shapes \
      --prompt="a red circle on a blue background" --outdir=out/shapes

Data: the synthetic shapes set (64x64, "a {color} {shape} on a {color} background",
90 prompts). Stage 1 trains a small AutoencoderKL (64x64x3 -> 16x16x4) and sets the
latent scaling factor from its latents; stage 2 trains a small UNet on those
latents together with a 2-layer CLIP text encoder (the shipped "builtin:shapes"
tokenizer), with 10% conditioning dropout for classifier-free guidance. The run
ends by sampling all 90 prompts into <workdir>/samples.png and printing the
prompt accuracy read back from the pixels by sd_func.eval.shapes.

Variants: `configs/shapes.py` (the full run; see README for its time and score on
a 2-core CPU) and `configs/shapes.py:smoke` (the same code path in seconds, for CI).
"""

import ml_collections

from configs import txt2img
from sd_func.data import shapes
from sd_func.models import autoencoder, text_encoder, unet


def get_config(arg=None):
    variant = arg or "full"
    if variant not in ("full", "smoke"):
        raise ValueError(f"unknown variant {variant!r}; expected 'full' or 'smoke'")
    smoke = variant == "smoke"
    c = txt2img.get_config()
    c.seed = 0
    c.data.update(kind="shapes", resolution=64, center_crop=True, random_flip=False, num_workers=1)

    c.vae = autoencoder.config(
        block_out_channels=(8, 16, 32), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=64, scaling_factor=1.0)  # scaling_factor is set by the VAE stage
    c.vae_train = ml_collections.ConfigDict(dict(
        steps=600, batch_size=16, lr=2e-3, lr_schedule="constant", warmup=50, kl_weight=1e-4,
        adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=0.0, weight_decay_exclude="", grad_clip=1.0,
        precision="fp32", compile=False, checkpoint_every=200, log_every=100))

    c.text_encoder = text_encoder.config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, vocab_size=1000, projection_dim=64, tokenizer="builtin:shapes")
    c.unet = unet.config(
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, cross_attention_dim=64, norm_num_groups=8, sample_size=16)

    c.train.update(
        steps=2300, batch_size=32, lr=2e-3, lr_schedule="cosine", warmup=100, weight_decay=0.0,
        ema_decay=0.995, cond_drop=0.1, min_snr_gamma=5.0, precision="fp32", compile=False,
        train_text_encoder=True,
        checkpoint_every=250, keep_checkpoints=2, log_every=50, sample_every=0)
    c.sample.update(height=64, width=64, sampler="euler_ancestral", steps=50, guidance_scale=3.0,
                    batch_size=30, dtype="float32", prompts=tuple(shapes.prompts()))
    # fid_images: FID of that many generated images against as many dataset images (0: none).
    c.eval = ml_collections.ConfigDict(dict(kind="shapes", seed=1000, grid="samples.png", fid_images=1000,
                                            fid_batch_size=50))

    if smoke:
        c.vae_train.update(steps=4, batch_size=4, compile=False, checkpoint_every=2, log_every=2)
        c.train.update(steps=4, batch_size=4, compile=False, warmup=1, checkpoint_every=2, log_every=2)
        c.sample.update(steps=3, batch_size=6, prompts=tuple(shapes.prompts()[:6]))
        c.eval.fid_images = 8
    return c
