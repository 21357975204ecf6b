"""Stable Diffusion 2.x at 768 px: OpenCLIP-H text encoder, linear projections, v-prediction.

  python run_sample.py --config=configs/sd2.py --ckpt=PATH --prompt="a photo of a cat"
"""

from configs import txt2img
from sd_func.models import text_encoder, unet


def get_config(arg=None):
    c = txt2img.get_config(arg)
    c.unet = unet.config(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                         use_linear_projection=True, sample_size=96)
    c.text_encoder = text_encoder.config(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        hidden_act="gelu", projection_dim=512, tokenizer="stabilityai/stable-diffusion-2-1/tokenizer")
    c.diffusion.prediction_type = "v_prediction"
    c.sample.height = c.sample.width = 768
    c.data.resolution = 768
    return c
