"""End-to-end txt2img against diffusers' StableDiffusionPipeline on the same tiny random
weights, from the same initial latents, on FLOAT images before rounding (ours
output_type="float", diffusers' output_type="np"): every sampler, classifier-free
guidance with a negative prompt, for an SD 1.x-shaped and an SD 2.x-shaped model
(v-prediction, gelu text encoder, linear projections, fixed head width).

Euler a gets diffusers' own step noise: diffusers' EulerAncestralDiscreteScheduler.step
draws randn_tensor(model_output.shape, generator=generator) once per step, and with
latents given the generator is used for nothing else, so the same draws from a generator
of the same seed are handed to our pipeline as noise_fn(i, shape).
Run with -s to see the measured errors.
"""

import diffusers
import pytest
import torch
from test_pipelines import SD2_HEAD_DIM, SD2_UNET, tiny_sd_folder, u8_err
from test_samplers import DIFFUSERS

from sd_func import checkpoint, pipelines
from sd_func.models import unet

SAMPLERS = ("ddim", "plms", "euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_karras", "euler_ancestral")
PROMPTS = ["a red circle on a blue background", "a green square"]
NEGATIVE = "a dark corner"
STEPS, GUIDANCE, NOISE_SEED = 6, 6.0, 11
MAX_MEAN_ERR_U8 = 1e-3  # mean abs difference, in u8 levels (1e-3 / 255 on [0, 1])


def _load(path, sd2):
    params, cfg = checkpoint.load(path)
    if sd2:  # describe the UNet as configs/sd2.py does, by head width; same heads as the folder's
        head_dim_cfg = unet.config(**{**cfg.unet.to_dict(), "attention_head_dim": 8, "head_dim": SD2_HEAD_DIM})
        assert unet.to_diffusers_config(head_dim_cfg)["attention_head_dim"] == list(SD2_UNET["attention_head_dim"])
        cfg.unet = head_dim_cfg
        assert cfg.diffusion.prediction_type == "v_prediction" and cfg.text_encoder.hidden_act == "gelu"
    return params, cfg


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request, tmp_path_factory):
    """(name, diffusers pipeline, our params, our cfg): one build per model for the module."""
    sd2 = request.param == "sd2"
    path = str(tmp_path_factory.mktemp(request.param))
    pipe = tiny_sd_folder(path, seed=3, sd2=sd2)
    return (request.param, pipe, *_load(path, sd2))


@pytest.fixture(scope="module")
def latents():
    return torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(5))


def diffusers_images(pipe, sampler, latents):
    cls, extra = DIFFUSERS[sampler]
    ref = diffusers.StableDiffusionPipeline(**dict(
        pipe.components, scheduler=getattr(diffusers, cls).from_config({**pipe.scheduler.config, **extra})))
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return ref(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), latents=latents, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(NOISE_SEED),
                   output_type="np").images


def diffusers_step_noise(shape):
    """noise_fn(i, shape): draw i of a generator seeded as diffusers' was, in the same order."""
    g = torch.Generator().manual_seed(NOISE_SEED)
    draws = [torch.randn(shape, generator=g) for _ in range(STEPS)]
    return lambda i, shape_i: draws[i]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_txt2img_float_output_matches_diffusers(model, latents, sampler):
    name, pipe, params, cfg = model
    noise_fn = diffusers_step_noise(latents.shape) if sampler == "euler_ancestral" else None
    ours = pipelines.txt2img(params, cfg, PROMPTS, negative_prompt=NEGATIVE, latents=latents, steps=STEPS,
                             sampler=sampler, guidance_scale=GUIDANCE, output_type="float", noise_fn=noise_fn,
                             batch_size=len(PROMPTS))
    ref = diffusers_images(pipe, sampler, latents)
    mean, mx = u8_err(ours, ref)
    print(f"txt2img {name} {sampler}: mean abs diff {mean:.2e} u8 levels, max {mx:.2e}")
    assert ours.shape == ref.shape == (2, 32, 32, 3) and ref.std() > 0.05
    assert mean <= MAX_MEAN_ERR_U8, (mean, mx)
