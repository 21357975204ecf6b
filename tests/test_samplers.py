"""Samplers, schedules and guidance against diffusers' schedulers and pipeline formulas.

Each sampler runs against the diffusers scheduler built from the same scheduler config,
driven by diffusers' standard loop (set_timesteps, init_noise_sigma, scale_model_input,
step) with the same closed-form dummy model and the same initial latents; stochastic
ones get the same noise injected into diffusers' step. Ours run in sigma space, the VP
schedulers (DDIM, PNDM, DDPM, DPM-Solver) in diffusers' variance-preserving latents, so
the two agree to float32 rounding, not bit for bit.
"""

import diffusers
import numpy as np
import pytest
import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg  # same as StableDiffusionPipeline's, lighter import
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm, scheduling_euler_ancestral_discrete

from sd_func import random
from sd_func.diffusion import denoiser, guidance, samplers, schedules
from sd_func.errors import UserError

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
              model_fn=model, zero_snr_clamp=False):
    """diffusers' loop (txt2img, or img2img from x0 when start is given). zero_snr_clamp:
    alphas_cumprod[-1] = 2**-24, as our samplers (and diffusers' Euler/DPM-Solver) do."""
    sch = scheduler(name, dcfg)
    if zero_snr_clamp:
        sch.alphas_cumprod[-1] = 2**-24
    sch.set_timesteps(steps)
    state = dict(i=0)
    if monkeypatch is not None:  # diffusers draws the step noise with randn_tensor: hand it ours
        fake = lambda shape, **kw: noise_fn(state["i"], shape)
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
        assert mine["sigmas"][-1] == 0 and len(mine["sigmas"]) == len(ts) + 1, name
        if hasattr(sch, "sigmas"):
            s = sch.sigmas if name != "heun" else torch.cat([sch.sigmas[:1], sch.sigmas[1:-1:2], sch.sigmas[-1:]])
            assert torch.equal(mine["sigmas"], s), name
        else:  # a VP scheduler: sigma = sqrt((1 - alpha_bar) / alpha_bar) at its timesteps
            ab = sch.alphas_cumprod[ts]
            torch.testing.assert_close(mine["sigmas"][:-1], ((1 - ab) / ab) ** 0.5, rtol=1e-6, atol=0)
        if name in ("euler", "euler_ancestral", "heun", "lms"):  # diffusers' own x_T scale
            assert samplers.init_noise_sigma(name, dcfg, steps) == float(sch.init_noise_sigma), name
        else:  # VP latents (init_noise_sigma 1) in sigma space
            assert sch.init_noise_sigma == 1.0
            assert samplers.init_noise_sigma(name, dcfg, steps) == pytest.approx(
                float((1 + mine["sigmas"][0] ** 2) ** 0.5), rel=1e-7), name


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


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m"])
def test_zero_terminal_snr_parity(name, latents, monkeypatch):
    """alpha_bar_T = 0 is an infinite sigma: every sampler clamps it to 2**-24, as diffusers'
    Euler and DPM-Solver do; DDIM and DDPM (which keep the 0) are compared with the same clamp."""
    dcfg = schedules.config(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    kw = dict(noise_fn=step_noise) if name in ("ddpm", "euler_ancestral") else {}
    ref = reference(name, dcfg, 9, latents, zero_snr_clamp=name in ("ddim", "ddpm"),
                    monkeypatch=monkeypatch if kw else None, **kw)
    torch.testing.assert_close(ours(name, dcfg, 9, latents, **kw), ref, **TOL)


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
    ref = sch.add_noise(x0, latents, main[:1])  # diffusers' VP latents
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
    x = latents * samplers.init_noise_sigma("dpmpp_2m", dcfg, 8)
    torch.testing.assert_close(samplers.sample("dpmpp_2m", guided, x, dcfg, 8), ref, **TOL)


# --- API contract ----------------------------------------------------------------------

def test_errors(latents):
    dcfg = schedules.config()
    user_errors = [
        (lambda: samplers.sample("k_euler", model, latents, dcfg, 10),
         "unknown sampler 'k_euler': expected one of ddim"),
        (lambda: samplers.sample("ddim", model, latents, dcfg, 0), "steps=0"),
        (lambda: samplers.sample("euler", model, latents, dcfg, 10, eta=0.5), "only ddim takes eta"),
        (lambda: samplers.strength_to_start(10, 1.5), "strength=1.5"),
        (lambda: samplers.strength_to_start(10, 0.05), "no step"),
        (lambda: samplers.sample("ddim", model, latents, dcfg, 4, start=4), "start=4"),
        (lambda: samplers.sample("euler", model, latents, schedules.config(prediction_type="x0"), 4),
         "prediction_type"),
        (lambda: samplers.sample("ddim", model, latents, schedules.config(timestep_spacing="uniform"), 4),
         "timestep_spacing"),
        (lambda: samplers.sample("ddpm", model, latents, schedules.config(variance_type="learned"), 4,
                                 noise_fn=step_noise), "variance_type"),
    ]
    for fn, message in user_errors:
        with pytest.raises(UserError, match=message):
            fn()
    with pytest.raises(ValueError, match="noise_fn"):  # a caller's mistake, not the user's
        samplers.sample("euler_ancestral", model, latents, dcfg, 10)


def test_denoiser_takes_diffusers_timesteps_on_the_grid():
    """On the grid the model gets the schedule's own timestep (dtype included); off it,
    schedules.sigma_to_t's fractional one. Its input is x / sqrt(sigma^2 + 1)."""
    seen = []

    def spy(x, t):
        seen.append((x, t))
        return torch.zeros_like(x)
    dcfg = schedules.config(prediction_type="v_prediction")
    sch = samplers.schedule("ddim", dcfg, 5)
    denoise_fn = denoiser.make_denoise_fn(spy, dcfg, sch["sigmas"], sch["timesteps"])
    x = torch.ones(2, 1, 1, 1)
    sigma = sch["sigmas"][2]
    x0 = denoise_fn(x, sigma)
    assert torch.equal(seen[-1][1], sch["timesteps"][2].expand(2)) and seen[-1][1].dtype == torch.int64
    torch.testing.assert_close(seen[-1][0], x / (sigma**2 + 1) ** 0.5)
    torch.testing.assert_close(x0, x / (sigma**2 + 1))  # v = 0: x0 = alpha^2 x
    denoise_fn(x, torch.tensor(1.0))
    assert seen[-1][1].dtype == torch.float32
    torch.testing.assert_close(seen[-1][1], schedules.sigma_to_t(1.0, dcfg).float().expand(2))


@pytest.mark.parametrize("prediction_type", denoiser.PREDICTION_TYPES)
def test_denoiser_conversions_invert(prediction_type):
    g = torch.Generator().manual_seed(3)
    x, out = torch.randn(3, 4, generator=g) * 5, torch.randn(3, 4, generator=g)
    sigma = torch.tensor(2.5)
    x0 = denoiser.x0_from_output(out, x, sigma, prediction_type)
    torch.testing.assert_close(denoiser.output_from_x0(x0, x, sigma, prediction_type), out, rtol=1e-5, atol=1e-5)
    eps = denoiser.eps_from_output(out, x, sigma, prediction_type)
    torch.testing.assert_close(x0 + sigma * eps, x, rtol=1e-5, atol=1e-5)


def test_step_transform_maps_the_state_between_steps(latents):
    """step_transform's output is the state the next step starts from; the callback sees it."""
    dcfg = schedules.config()
    for name in ("ddim", "plms", "dpmpp_2m", "heun"):
        seen, calls = [], []

        def transform(i, x, sigma_next, calls=calls):
            calls.append((i, float(sigma_next)))
            return x * 0 + sigma_next
        out = samplers.sample(name, model, latents, dcfg, 5, start=1, step_transform=transform, callback=seen.append)
        sigmas = samplers.schedule(name, dcfg, 5)["sigmas"]
        assert [c[0] for c in calls] == [1, 2, 3, 4] and calls[-1][1] == 0.0, name
        assert [c[1] for c in calls] == sigmas[2:].tolist(), name
        assert all(torch.equal(info["x"], torch.full_like(latents, s)) for info, (_, s) in zip(seen, calls)), name
        assert torch.equal(out, torch.zeros_like(latents)), name
        assert [sorted(info) for info in seen] == [["i", "sigma", "t", "x", "x0_hat"]] * 4, name


def test_callback_sees_every_step_with_absolute_index(latents):
    dcfg = schedules.config()
    for name in ("heun", "plms", "ddim"):
        seen = []
        samplers.sample(name, model, latents, dcfg, 8, callback=seen.append, start=3)
        assert [info["i"] for info in seen] == list(range(3, 8)), name
