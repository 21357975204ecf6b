"""Sampling entry point: one `sample(name, ...)` over the pure samplers of
samplers_discrete.py (DDIM, PLMS, DDPM) and samplers_sigma.py (Euler, Euler a,
Heun, LMS, DPM-Solver++ 2M), plus what pipelines need around them: the initial
noise scale, img2img's start step and forward noising (SDEdit, Meng et al. 2022).

Every name reproduces the diffusers scheduler built from the same
scheduler_config (cfg.diffusion): ddim=DDIMScheduler, plms=PNDMScheduler with
skip_prk_steps, euler=EulerDiscreteScheduler, euler_ancestral=
EulerAncestralDiscreteScheduler, heun=HeunDiscreteScheduler, lms=LMSDiscreteScheduler,
dpmpp_2m(_karras)=DPMSolverMultistepScheduler(dpmsolver++, order 2[, Karras sigmas]),
ddpm=DDPMScheduler. `x` is in the same space as diffusers' `latents` for that
scheduler, so user latents become x_T = latents * init_noise_sigma(...).
Randomness only enters through noise_fn(step_index, shape); build it with
noise_fn_from_keys so that each image depends only on its own key.
"""

import torch

from sd_func import random
from sd_func.diffusion import samplers_discrete, samplers_sigma, schedules
from sd_func.diffusion.denoiser import make_denoise_fn

NAMES = ("ddim", "plms", "euler", "euler_ancestral", "heun", "lms", "dpmpp_2m", "dpmpp_2m_karras", "ddpm")
_DISCRETE = ("ddim", "plms", "ddpm")
_SIGMA_VE = ("euler", "euler_ancestral", "heun", "lms")


def _check(name: str, steps: int):
    if name not in NAMES:
        raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(NAMES)}")
    if int(steps) < 1:
        raise ValueError(f"steps={steps}: a sampler needs at least 1 step")


def schedule(name: str, dcfg, steps: int) -> dict:
    """Everything sampler `name` needs for an n-step run, as tensors (host side).

    Discrete samplers: timesteps, alpha_bar (at t), alpha_bar_prev (at the step's target:
    t - T//n for ddim/plms, the next timestep for ddpm), alphas_cumprod, final_alpha_bar,
    stride. Sigma samplers: timesteps, sigmas ([n+1], ending in 0).
    """
    _check(name, steps)
    if name in _DISCRETE:
        ts = schedules.timesteps(dcfg, steps, "ddim")
        ac = schedules.alphas_cumprod(dcfg)
        stride = schedules.field(dcfg, "num_train_timesteps") // int(steps)
        if name == "ddpm":
            prev, final = torch.cat([ts[1:], ts.new_tensor([-1])]), torch.tensor(1.0)
        else:
            prev = ts - stride
            final = torch.tensor(1.0) if schedules.field(dcfg, "set_alpha_to_one") else ac[0]
        ab_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
        return dict(timesteps=ts, alpha_bar=ac[ts], alpha_bar_prev=ab_prev, alphas_cumprod=ac,
                    final_alpha_bar=final, stride=stride)
    family = "dpmsolver" if name.startswith("dpmpp") else "euler"
    karras = {"dpmpp_2m_karras": True, "euler_ancestral": False}.get(name)  # None: cfg.diffusion
    sigmas, ts = schedules.sigmas(dcfg, steps, family, karras)
    return dict(timesteps=ts, sigmas=sigmas)


def init_noise_sigma(name: str, dcfg, steps: int) -> float:
    """The std of x_T: diffusers' scheduler.init_noise_sigma after set_timesteps(steps).

    1 for the variance-preserving samplers (ddim, plms, ddpm, dpmpp_2m*); for Euler/Heun/LMS
    max sigma (linspace, trailing) or sqrt(max sigma^2 + 1) (leading).
    """
    if name not in _SIGMA_VE:
        _check(name, steps)
        return 1.0
    s_max = schedule(name, dcfg, steps)["sigmas"].max()
    if schedules.field(dcfg, "timestep_spacing") in ("linspace", "trailing"):
        return float(s_max)
    return float((s_max**2 + 1) ** 0.5)


def strength_to_start(steps: int, strength: float) -> int:
    """img2img's first step index: diffusers' get_timesteps, t_start = n - int(n * strength)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength}: expected a value in [0, 1]")
    start = max(int(steps) - min(int(int(steps) * strength), int(steps)), 0)
    if start >= steps:
        raise ValueError(f"strength={strength} with steps={steps} leaves no step to run; raise either")
    return start


def add_noise(name: str, dcfg, steps: int, x0, noise, start: int = 0):
    """x0 noised to the first timestep/sigma of a run that begins at step `start`
    (scheduler.add_noise at timesteps[start]), in the sampler's own state space."""
    sch = schedule(name, dcfg, steps)
    _check_start(start, len(sch["timesteps"]))
    if name in _DISCRETE:
        ab = sch["alpha_bar"][start].to(x0.dtype)
        return ab**0.5 * x0 + (1 - ab) ** 0.5 * noise
    sigma = sch["sigmas"][start].to(x0.dtype)
    if name in _SIGMA_VE:
        return x0 + noise * sigma
    alpha, sigma_vp = samplers_sigma._alpha_sigma(sigma)
    return alpha * x0 + sigma_vp * noise


def _check_start(start, n):
    if not 0 <= start < n:
        raise ValueError(f"start={start}: expected 0 <= start < steps={n}")


def noise_fn_from_keys(keys, dtype=torch.float32, device=None):
    """noise_fn(i, shape) whose row b is random.normal(fold_in(keys[b], i), shape[1:]):
    a step's noise for an image depends only on that image's key and the step index."""
    keys = list(keys)

    def noise_fn(i, shape):
        if shape[0] != len(keys):
            raise ValueError(f"noise_fn: batch {shape[0]} != {len(keys)} keys")
        return random.normal_per_key([random.fold_in(k, i) for k in keys], shape[1:], dtype, device)
    return noise_fn


def sample(name: str, model_fn, x, dcfg, steps: int, eta: float = 0.0, noise_fn=None,
           callback=None, start: int = 0):
    """Run sampler `name` from x (x_T, or add_noise's output when start > 0) to x_0.

    model_fn(x, t) -> eps / v / x0 as cfg.diffusion.prediction_type says (t: [B] tensor);
    eta: DDIM's noise scale (other samplers take none); noise_fn(step_index, shape) for the
    stochastic ones (ddpm, euler_ancestral, ddim with eta > 0); callback(info) after each
    step with info = {i, t, x, x0_hat[, sigma]}; start: first step index (img2img, see
    strength_to_start). The state is kept in float32 (half inputs are upcast).
    """
    sch = schedule(name, dcfg, steps)
    n = len(sch["timesteps"])
    _check_start(start, n)
    if eta != 0.0 and name != "ddim":
        raise ValueError(f"eta={eta}: only ddim takes eta (sampler {name!r})")
    stochastic = name in ("ddpm", "euler_ancestral") or (name == "ddim" and eta > 0)
    if stochastic and noise_fn is None:
        raise ValueError(f"sampler {name!r} (eta={eta}) draws noise: pass noise_fn, e.g. noise_fn_from_keys(keys)")
    if schedules.field(dcfg, "thresholding"):
        raise ValueError("cfg.diffusion.thresholding=True (dynamic thresholding) is not supported")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    nf = None if noise_fn is None else (lambda i, shape: noise_fn(i + start, shape).to(x.device, x.dtype))
    cb = None if callback is None else (lambda info: callback({**info, "i": info["i"] + start}))
    clip = schedules.field(dcfg, "clip_sample_range") if schedules.field(dcfg, "clip_sample") else None
    ts = sch["timesteps"][start:]

    if name == "ddim" or name == "ddpm":
        denoise_fn = make_denoise_fn(model_fn, dcfg, "vp")
        ab, ab_prev = sch["alpha_bar"][start:], sch["alpha_bar_prev"][start:]
        if name == "ddim":
            return samplers_discrete.ddim(denoise_fn, x, ts, ab, ab_prev, eta, clip, nf, cb)
        return samplers_discrete.ddpm(denoise_fn, x, ts, ab, ab_prev, schedules.field(dcfg, "variance_type"),
                                      clip, nf, cb)
    if name == "plms":
        return samplers_discrete.plms(make_denoise_fn(model_fn, dcfg, "output"), x, ts, sch["stride"],
                                      sch["alphas_cumprod"], sch["final_alpha_bar"],
                                      schedules.field(dcfg, "prediction_type"), cb)
    sigmas = sch["sigmas"][start:]
    if name.startswith("dpmpp"):
        return samplers_sigma.dpmpp_2m(make_denoise_fn(model_fn, dcfg, "vp"), x, sigmas, ts, cb)
    denoise_fn = make_denoise_fn(model_fn, dcfg, "ve")
    if name == "euler":
        return samplers_sigma.euler(denoise_fn, x, sigmas, ts, cb)
    if name == "euler_ancestral":
        return samplers_sigma.euler_ancestral(denoise_fn, x, sigmas, ts, nf, cb)
    if name == "heun":
        return samplers_sigma.heun(denoise_fn, x, sigmas, ts, clip, cb)
    return samplers_sigma.lms(denoise_fn, x, sigmas, ts, callback=cb)
