"""Samplers, schedules and guidance against diffusers' schedulers and pipeline formulas.

Each sampler runs against the diffusers scheduler built from the same scheduler config,
driven by diffusers' standard loop (set_timesteps, init_noise_sigma, scale_model_input,
step) with the same closed-form dummy model and the same initial latents; stochastic
ones get the same noise injected into diffusers' step.
"""

import diffusers
import numpy as np
import pytest
import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg  # same as StableDiffusionPipeline's, lighter import
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm, scheduling_euler_ancestral_discrete

from sd_func import random
from sd_func.diffusion import denoiser, guidance, samplers, schedules

DIFFUSERS = {
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", dict(skip_prk_steps=True)),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "ddpm": ("DDPMScheduler", {}),
}
DETERMINISTIC = ("ddim", "plms", "euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_karras")
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 rounding of O(10) values


def model(x, t):
    """Closed-form stand-in for a UNet: non-linear in x, depends on t (0-d or [B])."""
    t = torch.as_tensor(t).to(device=x.device, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.sin(x) * 0.3 + x * (t / 1000) * 0.2 - 0.05 * torch.cos(t / 300)


def scheduler(name, dcfg, **over):
    cls, extra = DIFFUSERS[name]
    return getattr(diffusers, cls).from_config({**dcfg.to_dict(), **extra, **over})


def reference(name, dcfg, steps, latents, noise_fn=None, eta=0.0, monkeypatch=None, start=None, x0=None,
              model_fn=model):
    """diffusers' loop (txt2img, or img2img from x0 when start is given)."""
    sch = scheduler(name, dcfg)
    sch.set_timesteps(steps)
    state = dict(i=0)
    if monkeypatch is not None:  # diffusers draws the step noise with randn_tensor: hand it ours
        fake = lambda shape, **kw: noise_fn(state["i"], shape)  # noqa: E731
        for mod in (scheduling_ddpm, scheduling_euler_ancestral_discrete):
            monkeypatch.setattr(mod, "randn_tensor", fake)
    timesteps = sch.timesteps
    if start is None:
        x = latents * sch.init_noise_sigma
        first = 0
    else:
        timesteps = timesteps[start * sch.order:]
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(start * sch.order)
        x = sch.add_noise(x0, latents, timesteps[:1].repeat(x0.shape[0]))
        first = start
    for k, t in enumerate(timesteps):
        state["i"] = first + k
        out = model_fn(sch.scale_model_input(x, t), t)
        kw = dict(eta=eta, variance_noise=noise_fn(first + k, x.shape)) if eta > 0 else {}
        x = sch.step(out, t, x, **kw).prev_sample
    return x


def ours(name, dcfg, steps, latents, **kw):
    return samplers.sample(name, model, latents * samplers.init_noise_sigma(name, dcfg, steps), dcfg, steps, **kw)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def step_noise(i, shape):
    return random.normal(random.fold_in(random.key(7), i), shape)


# --- schedules -------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", schedules.SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 25, 50])
def test_grids_match_diffusers(spacing, steps):
    dcfg = schedules.config(timestep_spacing=spacing)
    for name in samplers.NAMES:
        sch = scheduler(name, dcfg)
        sch.set_timesteps(steps)
        mine = samplers.schedule(name, dcfg, steps)
        ts = sch.timesteps
        if name == "plms":  # diffusers repeats the second timestep for the warm-up corrector
            ts = torch.cat([ts[:1], ts[2:]]) if steps > 1 else ts
        if name == "heun":  # ... and Heun interleaves the corrector's timesteps
            ts = ts[::2]
        assert torch.equal(mine["timesteps"], ts) and mine["timesteps"].dtype == ts.dtype, name
        if "sigmas" in mine:
            s = sch.sigmas if name != "heun" else torch.cat([sch.sigmas[:1], sch.sigmas[1:-1:2], sch.sigmas[-1:]])
            assert torch.equal(mine["sigmas"], s), name
        assert samplers.init_noise_sigma(name, dcfg, steps) == float(sch.init_noise_sigma), name


def test_rescale_zero_snr_betas_match_diffusers():
    dcfg = schedules.config(rescale_betas_zero_snr=True)
    ref = scheduling_ddim.rescale_zero_terminal_snr(
        torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2)
    assert torch.equal(schedules.betas(dcfg), ref)
    assert schedules.alphas_cumprod(dcfg)[-1] == 0


def test_sigma_timestep_conversion():
    dcfg = schedules.config()
    s = schedules.train_sigmas(dcfg)
    assert torch.equal(schedules.t_to_sigma(np.arange(1000), dcfg), s)
    t = torch.tensor([0.0, 1.0, 3.0, 500.0, 998.0, 999.0])
    back = schedules.sigma_to_t(schedules.t_to_sigma(t, dcfg).double(), dcfg)
    assert torch.allclose(back, t.double(), atol=1e-3)
    t = torch.tensor([0.5, 3.25, 998.75])  # in between, linear-in-t vs linear-in-log-sigma interpolation
    back = schedules.sigma_to_t(schedules.t_to_sigma(t, dcfg).double(), dcfg)
    assert torch.allclose(back, t.double(), atol=0.05)
    k = schedules.karras_sigmas(0.03, 14.6, 10)
    assert k[0].item() == pytest.approx(14.6) and k[-1].item() == pytest.approx(0.03)
    assert bool((k[1:] < k[:-1]).all())


# --- deterministic samplers ------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", schedules.SPACINGS)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_parity(name, spacing, prediction_type, latents):
    dcfg = schedules.config(timestep_spacing=spacing, prediction_type=prediction_type)
    ref = reference(name, dcfg, 9, latents)
    torch.testing.assert_close(ours(name, dcfg, 9, latents), ref, **TOL)


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "lms", "dpmpp_2m"])
def test_sample_prediction_parity(name, latents):
    dcfg = schedules.config(prediction_type="sample")
    torch.testing.assert_close(ours(name, dcfg, 9, latents), reference(name, dcfg, 9, latents), **TOL)


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("steps", [1, 2])
def test_few_steps_parity(name, steps, latents):
    dcfg = schedules.config()
    torch.testing.assert_close(ours(name, dcfg, steps, latents), reference(name, dcfg, steps, latents), **TOL)


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpmpp_2m"])
def test_karras_from_config_parity(name, latents):
    dcfg = schedules.config(use_karras_sigmas=True, timestep_spacing="trailing")
    torch.testing.assert_close(ours(name, dcfg, 9, latents), reference(name, dcfg, 9, latents), **TOL)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_zero_terminal_snr_parity(name, latents):
    dcfg = schedules.config(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    torch.testing.assert_close(ours(name, dcfg, 9, latents), reference(name, dcfg, 9, latents), **TOL)


def test_clip_sample_parity(latents):
    dcfg = schedules.config(clip_sample=True, clip_sample_range=0.5)
    for name in ("ddim", "heun"):
        torch.testing.assert_close(ours(name, dcfg, 9, latents), reference(name, dcfg, 9, latents), **TOL)


# --- stochastic samplers, same noise ---------------------------------------------------

@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_eta_parity(eta, spacing, latents):
    dcfg = schedules.config(timestep_spacing=spacing)
    ref = reference("ddim", dcfg, 9, latents, noise_fn=step_noise, eta=eta)
    mine = ours("ddim", dcfg, 9, latents, eta=eta, noise_fn=step_noise)
    torch.testing.assert_close(mine, ref, **TOL)
    assert not torch.allclose(mine, ours("ddim", dcfg, 9, latents))  # the noise does enter


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_ancestral_parity(spacing, prediction_type, latents, monkeypatch):
    dcfg = schedules.config(timestep_spacing=spacing, prediction_type=prediction_type)
    ref = reference("euler_ancestral", dcfg, 9, latents, noise_fn=step_noise, monkeypatch=monkeypatch)
    torch.testing.assert_close(ours("euler_ancestral", dcfg, 9, latents, noise_fn=step_noise), ref, **TOL)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_parity(variance_type, prediction_type, latents, monkeypatch):
    dcfg = schedules.config(prediction_type=prediction_type, variance_type=variance_type,
                            timestep_spacing="trailing")
    ref = reference("ddpm", dcfg, 9, latents, noise_fn=step_noise, monkeypatch=monkeypatch)
    torch.testing.assert_close(ours("ddpm", dcfg, 9, latents, noise_fn=step_noise), ref, **TOL)


def test_noise_depends_only_on_the_image_key(latents):
    """An image's result is the same alone or in a batch: one key per image."""
    dcfg = schedules.config()
    keys = [random.key(1), random.key(2)]
    both = ours("euler_ancestral", dcfg, 6, latents, noise_fn=samplers.noise_fn_from_keys(keys))
    alone = ours("euler_ancestral", dcfg, 6, latents[1:], noise_fn=samplers.noise_fn_from_keys(keys[1:]))
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=0)
    assert not torch.allclose(both[0], both[1])


# --- img2img ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras"])
def test_img2img_parity(name, latents):
    """strength -> start step, add_noise at it, run the rest: diffusers' img2img recipe."""
    dcfg = schedules.config()
    steps, x0 = 10, torch.tanh(latents.flip(0))
    start = samplers.strength_to_start(steps, 0.75)
    assert start == 3  # n - int(n * strength)
    ref = reference(name, dcfg, steps, latents, start=start, x0=x0)
    x = samplers.add_noise(name, dcfg, steps, x0, latents, start)
    torch.testing.assert_close(samplers.sample(name, model, x, dcfg, steps, start=start), ref, **TOL)


def test_img2img_plms_and_lms_follow_the_sliced_schedule(latents):
    """PLMS and LMS restart their multistep history at `start` (diffusers' PNDM slices its
    duplicated list off by one, and LMS sizes its first step by the absolute index); check
    them against diffusers' step math run on the sliced schedule."""
    dcfg, steps, start, x0 = schedules.config(), 10, 4, torch.tanh(latents)
    x = samplers.add_noise("plms", dcfg, steps, x0, latents, start)
    sch = scheduler("plms", dcfg)
    sch.set_timesteps(steps)
    main = samplers.schedule("plms", dcfg, steps)["timesteps"][start:]
    sch.timesteps = torch.cat([main[:2], main[1:]])
    ref = x.clone()
    for t in sch.timesteps:
        ref = sch.step(model(ref, t), t, ref).prev_sample
    torch.testing.assert_close(samplers.sample("plms", model, x, dcfg, steps, start=start), ref, **TOL)

    x = samplers.add_noise("lms", dcfg, steps, x0, latents, start)
    sch = scheduler("lms", dcfg)
    sch.set_timesteps(steps)
    sch.sigmas, sch.timesteps = sch.sigmas[start:], sch.timesteps[start:]
    ref = x.clone()
    for t in sch.timesteps:
        ref = sch.step(model(sch.scale_model_input(ref, t), t), t, ref).prev_sample
    torch.testing.assert_close(samplers.sample("lms", model, x, dcfg, steps, start=start), ref, **TOL)


# --- guidance --------------------------------------------------------------------------

def cond_model(calls):
    def fn(x, t, context):
        calls.append((x.shape[0], context.clone()))
        return model(x, t) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) * torch.cos(x)
    return fn


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_guidance_matches_diffusers_formula(guidance_rescale, latents):
    cond, uncond = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    calls = []
    guided = guidance.classifier_free(cond_model(calls), cond, uncond, 7.5, guidance_rescale)
    t = torch.tensor([500, 500])
    got = guided(latents, t)
    assert len(calls) == 1 and calls[0][0] == 4 and torch.equal(calls[0][1][:2], uncond)  # one call, uncond first
    out_uncond, out_cond = cond_model([])(latents, t, uncond), cond_model([])(latents, t, cond)
    ref = out_uncond + 7.5 * (out_cond - out_uncond)
    if guidance_rescale > 0:
        ref = rescale_noise_cfg(ref, out_cond, guidance_rescale=guidance_rescale)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_guidance_scale_one_runs_only_the_conditional_branch(latents):
    calls = []
    guided = guidance.classifier_free(cond_model(calls), torch.ones(2, 5, 3), torch.zeros(2, 5, 3), 1.0)
    guided(latents, torch.tensor(10))
    assert len(calls) == 1 and calls[0][0] == 2 and bool((calls[0][1] == 1).all())


def test_guided_sampling_matches_diffusers_loop(latents):
    """A whole guided run: our sampler on the guided model_fn vs diffusers' CFG + rescale loop."""
    dcfg = schedules.config(prediction_type="v_prediction")
    cond, uncond = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    inner = cond_model([])

    def diffusers_cfg(x, t):  # as StableDiffusionPipeline.__call__'s denoising loop
        out = inner(torch.cat([x] * 2), t, torch.cat([uncond, cond]))
        out_uncond, out_text = out.chunk(2)
        out = out_uncond + 5.0 * (out_text - out_uncond)
        return rescale_noise_cfg(out, out_text, guidance_rescale=0.5)
    ref = reference("dpmpp_2m", dcfg, 8, latents, model_fn=diffusers_cfg)
    guided = guidance.classifier_free(inner, cond, uncond, 5.0, 0.5)
    torch.testing.assert_close(samplers.sample("dpmpp_2m", guided, latents, dcfg, 8), ref, **TOL)


# --- API contract ----------------------------------------------------------------------

def test_errors(latents):
    dcfg = schedules.config()
    with pytest.raises(ValueError, match="ddim, plms, euler"):
        samplers.sample("k_euler", model, latents, dcfg, 10)
    with pytest.raises(ValueError, match="steps"):
        samplers.sample("ddim", model, latents, dcfg, 0)
    with pytest.raises(ValueError, match="noise_fn"):
        samplers.sample("euler_ancestral", model, latents, dcfg, 10)
    with pytest.raises(ValueError, match="only ddim takes eta"):
        samplers.sample("euler", model, latents, dcfg, 10, eta=0.5)
    with pytest.raises(ValueError, match="strength"):
        samplers.strength_to_start(10, 1.5)
    with pytest.raises(ValueError, match="no step"):
        samplers.strength_to_start(10, 0.05)
    with pytest.raises(ValueError, match="prediction_type"):
        samplers.sample("euler", model, latents, schedules.config(prediction_type="x0"), 4)
    with pytest.raises(ValueError, match="timestep_spacing"):
        samplers.sample("ddim", model, latents, schedules.config(timestep_spacing="uniform"), 4)
    with pytest.raises(ValueError, match="space"):
        denoiser.make_denoise_fn(model, dcfg, "edm")


def test_callback_sees_every_step_with_absolute_index(latents):
    dcfg = schedules.config()
    for name in ("heun", "plms", "ddim"):
        seen = []
        samplers.sample(name, model, latents, dcfg, 8, callback=lambda info: seen.append(info["i"]), start=3)
        assert seen == list(range(3, 8)), name
