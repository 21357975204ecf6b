"""Pipelines against diffusers' on the same tiny random weights: img2img
(StableDiffusionImg2ImgPipeline), 4-channel inpaint (StableDiffusionInpaintPipeline's
blend path), plus seed batch-invariance, dtypes, a compiled UNet call held by the
caller, the shared Options, bad options and inputs, and the image helpers. End-to-end
txt2img parity on float outputs for every sampler is in test_txt2img_parity.py; through
run_sample.py (and 9-channel inpaint) in test_run_sample.py. Both build their
checkpoints with `tiny_sd_folder` from here.
"""

import dataclasses
import os
import shutil

import diffusers
import numpy as np
import pytest
import torch
import transformers

from sd_func import checkpoint, pipelines, random
from sd_func.errors import UserError
from sd_func.models import tokenizer
from sd_func.pipelines import images

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, clip_sample=False,
                 set_alpha_to_one=False)
SCHEDULERS = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
              "euler": diffusers.EulerDiscreteScheduler}
MAX_MEAN_ERR_U8 = 0.1  # DESIGN.md: end to end within 0.1 u8 level on average


# SD 2.x's shape (configs/sd2.py) in small: linear projections, heads of a fixed width
# (16 channels: (2, 4) heads), fp32 attention logits, an OpenCLIP-style gelu text encoder
# and v-prediction.
SD2_UNET = dict(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD2_HEAD_DIM = 16


def tiny_sd_folder(path, in_channels=4, seed=0, sd2=False):
    """Save a tiny random-weight SD pipeline (32x32 images, 16x16 latents) as a diffusers
    folder; returns the diffusers pipeline (StableDiffusionPipeline or, for a 9-channel
    UNet, StableDiffusionInpaintPipeline). sd2: SD 2.x's architecture and v-prediction."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**{
        **dict(in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8, sample_size=16),
        **(SD2_UNET if sd2 else {})})
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        hidden_act="gelu" if sd2 else "quick_gelu"))
    with torch.no_grad():  # norms and biases off 1 / 0, so that every parameter matters
        for m in (unet, vae, te):
            for name, p in m.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    cls = diffusers.StableDiffusionPipeline if in_channels == 4 else diffusers.StableDiffusionInpaintPipeline
    scheduler = diffusers.DDIMScheduler(**{**SCHEDULER, "prediction_type": "v_prediction" if sd2 else "epsilon"})
    pipe = cls(vae=vae, text_encoder=te, tokenizer=tokenizer.load("builtin:shapes"), unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(path)
    # transformers 5 saves tokenizer.json only; real SD folders also carry vocab.json + merges.txt.
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tokenizer.BUILTIN_DIR, "shapes", f), os.path.join(path, "tokenizer", f))
    return pipe


def with_scheduler(pipe, sampler, cls=None):
    """A diffusers pipeline of class cls (default: pipe's) on pipe's weights, with sampler's scheduler."""
    comps = dict(pipe.components, scheduler=SCHEDULERS[sampler].from_config(pipe.scheduler.config))
    out = (cls or type(pipe))(**comps)
    out.set_progress_bar_config(disable=True)
    return out


def u8_err(ours, ref):
    """(mean, max) abs difference in u8 levels of two float [B,H,W,3] images in [0, 1]."""
    d = (torch.as_tensor(ours).float() - torch.as_tensor(ref).float()).abs() * 255
    return d.mean().item(), d.max().item()


@pytest.fixture(scope="module")
def sd4(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd4"))
    pipe = tiny_sd_folder(path)
    params, cfg = checkpoint.load(path)
    return pipe, params, cfg


@pytest.fixture(scope="module")
def image_and_mask():
    g = torch.Generator().manual_seed(7)
    image = (torch.rand(32, 32, 3, generator=g) * 255).round().to(torch.uint8)
    mask = torch.zeros(32, 32)
    mask[8:24, 4:20] = 1.0
    return image, mask


def _unit(image_u8):
    return image_u8.permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_img2img_parity(sd4, image_and_mask, sampler):
    pipe, params, cfg = sd4
    image, _ = image_and_mask
    seed, strength = 3, 0.6
    keys = pipelines.image_keys(seed)
    ours = pipelines.img2img(params, cfg, "a red circle", image, strength=strength, seeds=[seed], steps=5,
                             sampler=sampler, guidance_scale=7.5, output_type="float")
    # diffusers draws the VAE sample and then the noise from one generator: hand it our
    # init latents (the posterior sample from keys["vae"] fold 0) and our noise generator.
    with torch.no_grad():
        post = pipe.vae.encode(_unit(image) * 2 - 1).latent_dist
        z0 = post.sample(random.generator(random.fold_in(keys["vae"], 0))) * pipe.vae.config.scaling_factor
    ref = with_scheduler(pipe, sampler, diffusers.StableDiffusionImg2ImgPipeline)(
        "a red circle", image=z0, strength=strength, num_inference_steps=5, guidance_scale=7.5,
        generator=random.generator(keys["noise"]), output_type="np").images
    mean, mx = u8_err(ours, ref)
    print(f"img2img {sampler}: mean abs err {mean:.2e} u8 levels, max {mx:.2e}")
    assert ours.shape == (1, 32, 32, 3) and ref.std() > 0.05
    assert mean < MAX_MEAN_ERR_U8 and mx < 1.0


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_inpaint_4channel_blend_parity(sd4, image_and_mask, sampler):
    pipe, params, cfg = sd4
    image, mask = image_and_mask
    seed = 4
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    ours = pipelines.inpaint(params, cfg, "a blue square", image, mask, seeds=[seed], latents=lat, steps=5,
                             sampler=sampler, output_type="float")
    # diffusers' first generator draw is the init image's VAE sample: ours is keys["vae"] fold 0.
    gen = random.generator(random.fold_in(pipelines.image_keys(seed)["vae"], 0))
    ref = with_scheduler(pipe, sampler, diffusers.StableDiffusionInpaintPipeline)(
        "a blue square", image=_unit(image), mask_image=mask[None, None], latents=lat, num_inference_steps=5,
        generator=gen, output_type="np").images
    mean, mx = u8_err(ours, ref)
    print(f"inpaint (4-channel blend) {sampler}: mean abs err {mean:.2e} u8 levels, max {mx:.2e}")
    assert ref.std() > 0.05 and mean < MAX_MEAN_ERR_U8 and mx < 1.0


def test_inpaint_4channel_keeps_known_region(sd4, image_and_mask):
    """The final latents equal the init image's latents outside the mask (on the latent grid)."""
    _, params, cfg = sd4
    image, mask = image_and_mask
    z = pipelines.inpaint(params, cfg, "a red circle", image, mask, seeds=[1], steps=3, sampler="euler",
                          output_type="latent")
    keys = pipelines.image_keys(1)
    z0 = pipelines.encode_images(params["vae"], cfg, images.image_to_tensor(image),
                                 [random.fold_in(keys["vae"], 0)])
    keep = torch.nn.functional.interpolate(mask[None, None], size=(16, 16)) < 0.5
    keep = keep.expand_as(z)
    torch.testing.assert_close(z[keep], z0[keep], rtol=0, atol=1e-6)
    assert (z[~keep] - z0[~keep]).abs().mean() > 0.1


def test_seed_batch_invariance(sd4):
    """The same seed gives the same image whatever the batch size or its place in the batch,
    ancestral step noise included."""
    _, params, cfg = sd4
    kw = dict(steps=4, sampler="euler_ancestral", guidance_scale=5.0)
    batch = pipelines.txt2img(params, cfg, ["a red circle", "a blue square", "a green triangle"],
                              seeds=[10, 11, 12], batch_size=3, **kw)
    alone = pipelines.txt2img(params, cfg, "a blue square", seeds=[11], batch_size=1, **kw)
    chunks = pipelines.txt2img(params, cfg, ["a blue square", "a red circle"], seeds=[11, 10], batch_size=1, **kw)
    assert batch.dtype == torch.uint8 and batch.shape == (3, 32, 32, 3)
    d = (batch[1].int() - alone[0].int()).abs()
    print(f"batch 3 vs batch 1: max diff {d.max().item()} u8 levels, mean {d.float().mean().item():.2e}")
    assert d.max() <= 1 and d.float().mean() < 0.01
    assert (chunks[0].int() - alone[0].int()).abs().max() <= 1
    assert (chunks[1].int() - batch[0].int()).abs().max() <= 1
    assert (batch[0].int() - batch[1].int()).abs().float().mean() > 1  # different seeds differ


def test_default_seeds_and_initial_noise(sd4):
    """seeds default to cfg.seed + i; initial noise is random.normal(image_keys(seed)["noise"])."""
    _, params, cfg = sd4
    a = pipelines.txt2img(params, cfg, ["a red circle", "a red circle"], steps=2, sampler="ddim",
                          output_type="latent")
    noise = random.normal(pipelines.image_keys(int(cfg.get("seed", 0)) + 1)["noise"], (1, 4, 16, 16))
    b = pipelines.txt2img(params, cfg, "a red circle", latents=noise, steps=2, sampler="ddim", output_type="latent")
    torch.testing.assert_close(a[1:], b, rtol=0, atol=1e-4)  # batch 2 vs 1: kernel rounding only


def test_bfloat16_close_to_float32(sd4):
    _, params, cfg = sd4
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    kw = dict(latents=lat, steps=3, sampler="dpmpp_2m", output_type="float")
    f32 = pipelines.txt2img(params, cfg, "a red circle", dtype="float32", **kw)
    bf16 = pipelines.txt2img(params, cfg, "a red circle", dtype="bfloat16", **kw)
    mean, _ = u8_err(f32, bf16)
    print(f"bfloat16 vs float32: mean abs diff {mean:.3f} u8 levels")
    assert 0 < mean < 4.0


def _compiled_vs_eager(sd4, compile):
    _, params, cfg = sd4
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    kw = dict(latents=lat, steps=2, sampler="ddim", output_type="latent")
    eager = pipelines.txt2img(params, cfg, "a red circle", **kw)
    torch._dynamo.reset()
    unet_fn = pipelines.make_unet_fn(cfg.unet, compile)  # the caller builds and holds it
    with torch._dynamo.config.patch(suppress_errors=False):
        compiled = pipelines.txt2img(params, cfg, "a red circle", unet_fn=unet_fn, **kw)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    return unet_fn


def test_compile_traces_one_graph(sd4):
    """compile="eager": TorchDynamo traces the whole UNet call as one graph (fullgraph=True:
    a graph break would raise) without the cost of code generation."""
    _compiled_vs_eager(sd4, "eager")


def test_pipelines_hold_no_compiled_unet():
    """No module-level cache: each make_unet_fn call is its own compiled function."""
    from sd_func.pipelines import unet_call
    cfg_unet = checkpoint.files.ml_collections.ConfigDict(dict(a=1))
    assert not any(isinstance(v, dict) for k, v in vars(unet_call).items() if not k.startswith("__"))
    assert pipelines.make_unet_fn(cfg_unet, "eager") is not pipelines.make_unet_fn(cfg_unet, "eager")
    with pytest.raises(UserError, match="compile=3"):
        pipelines.make_unet_fn(cfg_unet, 3)


@pytest.mark.slow
def test_compile_inductor_matches_eager(sd4):
    """cfg.sample.compile=True: TorchInductor (~30 s of CPU for this tiny UNet)."""
    _compiled_vs_eager(sd4, True)


@pytest.mark.parametrize("override, message", [
    (dict(sampler="dpm_fast"), "unknown sampler 'dpm_fast': expected one of ddim, plms, euler"),
    (dict(steps=0), "steps=0"),
    (dict(height=36), "height=36: expected a positive multiple of 8"),
    (dict(width=0), "width=0"),
    (dict(eta=0.5, sampler="euler"), "only the ddim sampler takes eta"),
    (dict(dtype="int8"), "dtype='int8'"),
])
def test_bad_options(sd4, override, message):
    _, params, cfg = sd4
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        pipelines.txt2img(params, cfg, "a red circle", **override)


def test_unknown_option_is_an_error_naming_it(sd4, image_and_mask):
    _, params, cfg = sd4
    image, _ = image_and_mask
    with pytest.raises(TypeError, match="unknown pipeline option.*stepz"):
        pipelines.txt2img(params, cfg, "a red circle", stepz=3)
    with pytest.raises(TypeError, match="compile.*make_unet_fn"):
        pipelines.txt2img(params, cfg, "a red circle", compile=True)
    with pytest.raises(UserError, match="img2img: height come from the init image"):
        pipelines.img2img(params, cfg, "a red circle", image, height=64)


def test_options_object_is_shared(sd4, image_and_mask):
    """One Options for the three pipelines; keywords override it; it is immutable."""
    _, params, cfg = sd4
    image, mask = image_and_mask
    o = pipelines.resolve_options(cfg, sampler="euler", steps=2, guidance_scale=3.0, output_type="latent")
    assert isinstance(o, pipelines.Options) and o.height == o.width == 32 and o.batch_size == 4  # native size, default
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.steps = 3
    a = pipelines.txt2img(params, cfg, "a red circle", seeds=[1], options=o)
    b = pipelines.txt2img(params, cfg, "a red circle", seeds=[1], sampler="euler", steps=2, guidance_scale=3.0,
                          output_type="latent")
    assert torch.equal(a, b) and a.shape == (1, 4, 16, 16)
    c = pipelines.txt2img(params, cfg, "a red circle", seeds=[1], options=o, steps=3)
    assert not torch.equal(a, c)
    assert pipelines.img2img(params, cfg, "x", image, strength=0.5, seeds=[1], options=o).shape == (1, 4, 16, 16)
    assert pipelines.inpaint(params, cfg, "x", image, mask, seeds=[1], options=o).shape == (1, 4, 16, 16)
    seen = []
    pipelines.txt2img(params, cfg, "x", seeds=[1], options=o, callback=seen.append)
    assert [info["i"] for info in seen] == [0, 1] and sorted(seen[0]) == ["i", "sigma", "t", "x", "x0_hat"]


def test_bad_inputs(sd4, image_and_mask):
    _, params, cfg = sd4
    image, mask = image_and_mask
    with pytest.raises(UserError, match=r"latents: expected shape \[N,4,h,w\]"):
        pipelines.txt2img(params, cfg, "x", latents=torch.zeros(1, 3, 16, 16), steps=1)
    with pytest.raises(UserError, match="latents hold 2 images for 3"):
        pipelines.txt2img(params, cfg, "x", seeds=[1, 2, 3], latents=torch.zeros(2, 4, 16, 16), steps=1)
    with pytest.raises(UserError, match="mask is 16x16 but the init image is 32x32"):
        pipelines.inpaint(params, cfg, "x", image, mask[:16, :16], steps=1)
    with pytest.raises(UserError, match="2 prompts for 3 images"):
        pipelines.txt2img(params, cfg, ["a", "b"], seeds=[1, 2, 3], steps=1)
    with pytest.raises(UserError, match="strength=0.1 with steps=5 leaves no step"):
        pipelines.img2img(params, cfg, "x", image, strength=0.1, steps=5)


def test_image_helpers(tmp_path):
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert images.to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]
    m = images.mask_to_tensor(np.array([[0, 127, 128, 255]], dtype=np.uint8))
    assert m.shape == (1, 1, 1, 4) and m.flatten().tolist() == [0, 0, 1, 1]
    u8 = torch.arange(2 * 4 * 5 * 3, dtype=torch.uint8).reshape(2, 4, 5, 3)
    torch.testing.assert_close(images.image_to_tensor(u8), u8.permute(0, 3, 1, 2).float() / 255 * 2 - 1)
    g = images.grid(torch.full((3, 4, 5, 3), 7, dtype=torch.uint8))
    assert g.shape == (8, 10, 3) and g[:4].eq(7).all() and g[4:, 5:].eq(0).all()
    images.save_png(str(tmp_path / "a.png"), u8[0], {"prompt": "a red circle", "seed": 3})
    assert images.read_png_text(str(tmp_path / "a.png")) == {"prompt": "a red circle", "seed": "3"}
    assert images.load_image(str(tmp_path / "a.png")).equal(u8[0])
