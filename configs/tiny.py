"""A tiny random-init model on the synthetic shapes data: trains from nothing in seconds.

For tests and smoke runs:
  python run_train.py --config=configs/tiny.py --workdir=/tmp/tiny
Expected: well under a minute on a 2-core CPU; the loss falls over the first ~50 steps.
Eager by default: TorchInductor's C++ compile of even this tiny step takes minutes on
2 cores, far longer than the run (add --config.train.compile=True to try it).
"""

from configs import txt2img
from sd_func.models import autoencoder, text_encoder, unet


def get_config(arg=None):
    c = txt2img.get_config(arg)
    c.unet = unet.config(
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8, sample_size=16)
    c.vae = autoencoder.config(
        block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32)
    c.text_encoder = text_encoder.config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, vocab_size=1000, tokenizer="builtin:shapes")
    c.sample.update(height=32, width=32, steps=10, batch_size=4, sampler="ddim")
    c.train.update(steps=20, batch_size=8, lr=1e-3, warmup=0, ema_decay=0.9, precision="fp32", compile=False,
                   checkpoint_every=10, keep_checkpoints=2, log_every=5, sample_every=0)
    c.data.update(kind="shapes", resolution=32, center_crop=True, random_flip=False, num_workers=0)
    return c
