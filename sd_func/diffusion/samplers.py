"""Sampling entry point: one `sample(name, ...)` over the pure samplers of
samplers_discrete.py (DDIM, PLMS, DDPM) and samplers_sigma.py (Euler, Euler a, Heun,
LMS, DPM-Solver++ 2M), plus what pipelines need around them: the initial noise scale,
img2img's start step and forward noising (SDEdit, Meng et al. 2022).

Every sampler moves k-diffusion's sigma-space state x = x0 + sigma eps (Karras et al.
2022) with one denoiser, denoise_fn(x, sigma) -> x0_hat, built here once from the raw
model_fn(x, t) and the run's grid (denoiser.make_denoise_fn). Every name reproduces the
diffusers scheduler built from the same scheduler_config (cfg.diffusion), to float32
rounding: ddim=DDIMScheduler, plms=PNDMScheduler with skip_prk_steps,
euler=EulerDiscreteScheduler, euler_ancestral=EulerAncestralDiscreteScheduler,
heun=HeunDiscreteScheduler, lms=LMSDiscreteScheduler,
dpmpp_2m(_karras)=DPMSolverMultistepScheduler(dpmsolver++, order 2[, Karras sigmas]),
ddpm=DDPMScheduler. diffusers' `latents=` become x_T = latents * init_noise_sigma(...).
One deviation: with rescale_betas_zero_snr the last alpha_bar (0, an infinite sigma) is
clamped to 2**-24 for every sampler, as diffusers' Euler and DPM-Solver schedulers do
(diffusers' DDIM and DDPM keep the exact 0; its PNDM, Heun and LMS schedulers
do not take rescale_betas_zero_snr at all).
Randomness only enters through noise_fn(step_index, shape); build it with
noise_fn_from_keys so that each image depends only on its own key.
"""

import torch

from sd_func import random
from sd_func.diffusion import samplers_discrete, samplers_sigma, schedules
from sd_func.diffusion.denoiser import make_denoise_fn
from sd_func.errors import UserError

NAMES = ("ddim", "plms", "euler", "euler_ancestral", "heun", "lms", "dpmpp_2m", "dpmpp_2m_karras", "ddpm")
_DISCRETE = ("ddim", "plms", "ddpm")
_SIGMA_VE = ("euler", "euler_ancestral", "heun", "lms")  # diffusers' state is x itself


def check(name: str, steps: int) -> None:
    if name not in NAMES:
        raise UserError(f"unknown sampler {name!r}: expected one of {', '.join(NAMES)}")
    if int(steps) < 1:
        raise UserError(f"steps={steps}: a sampler needs at least 1 step")


def schedule(name: str, dcfg, steps: int) -> dict:
    """The grid of sampler `name` for an n-step run, as host tensors.

    timesteps [n] (diffusers' dtype: int64, float32 for euler/heun/lms) and sigmas [n+1],
    sigma of each timestep then 0. ddim and plms also get sigmas_to [n], where diffusers
    steps to (sigma at t - T//n, or at final_alpha_cumprod for t - T//n < 0); plms also
    sigmas_back [n], sigma at t + T//n (where its warm-up corrector steps from when the
    run starts one step before t; clamped at T - 1).
    """
    check(name, steps)
    if name in _DISCRETE:
        ts = schedules.timesteps(dcfg, steps, "ddim")
        s_train = schedules.train_sigmas(dcfg)
        sigmas = torch.cat([s_train[ts], s_train.new_zeros(1)])
        out = dict(timesteps=ts, sigmas=sigmas)
        if name == "ddpm":  # its posterior goes to the next grid timestep
            return out
        stride = schedules.field(dcfg, "num_train_timesteps") // int(steps)
        final = s_train.new_tensor(0.0) if schedules.field(dcfg, "set_alpha_to_one") else s_train[0]
        prev = ts - stride
        out["sigmas_to"] = torch.where(prev >= 0, s_train[prev.clamp(min=0)], final)
        if name == "plms":
            out["sigmas_back"] = s_train[(ts + stride).clamp(max=len(s_train) - 1)]
        return out
    family = "dpmsolver" if name.startswith("dpmpp") else "euler"
    karras = {"dpmpp_2m_karras": True, "euler_ancestral": False}.get(name)  # None: cfg.diffusion
    sigmas, ts = schedules.sigmas(dcfg, steps, family, karras)
    return dict(timesteps=ts, sigmas=sigmas)


def init_noise_sigma(name: str, dcfg, steps: int) -> float:
    """The factor that turns diffusers' `latents=` into our x_T.

    euler, euler_ancestral, heun, lms: diffusers' scheduler.init_noise_sigma after
    set_timesteps(steps) (max sigma for linspace/trailing spacing, sqrt(max sigma^2 + 1)
    for leading). The others keep variance-preserving latents (init_noise_sigma 1), so
    x_T = latents * sqrt(1 + sigma_max^2).
    """
    s_max = schedule(name, dcfg, steps)["sigmas"].max()
    if name in _SIGMA_VE and schedules.field(dcfg, "timestep_spacing") in ("linspace", "trailing"):
        return float(s_max)
    return float((s_max**2 + 1) ** 0.5)


def strength_to_start(steps: int, strength: float) -> int:
    """img2img's first step index: diffusers' get_timesteps, t_start = n - int(n * strength)."""
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength={strength}: expected a value in [0, 1]")
    start = max(int(steps) - min(int(int(steps) * strength), int(steps)), 0)
    if start >= steps:
        raise UserError(f"strength={strength} with steps={steps} leaves no step to run; raise either")
    return start


def add_noise(name: str, dcfg, steps: int, x0, noise, start: int = 0):
    """x0 noised to the first sigma of a run that begins at step `start`: x0 + sigma noise
    (diffusers' scheduler.add_noise at timesteps[start], in sigma space)."""
    sch = schedule(name, dcfg, steps)
    _check_start(start, len(sch["timesteps"]))
    return x0 + noise * sch["sigmas"][start].to(x0.dtype)


def _check_start(start, n):
    if not 0 <= start < n:
        raise UserError(f"start={start}: expected 0 <= start < steps={n}")


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
           callback=None, start: int = 0, step_transform=None):
    """Run sampler `name` from x (x_T, or add_noise's output when start > 0) to sigma = 0.

    model_fn(x, t) -> eps / v / x0 as cfg.diffusion.prediction_type says (t: [B] tensor).
    x is the sigma-space state x0 + sigma eps; the result, at sigma = 0, is the final
    latents to decode (diffusers' final latents: for ddim/plms with set_alpha_to_one=False
    those still hold alpha_bar_0's sliver of noise, see samplers_discrete). eta: DDIM's
    noise scale (other samplers take none);
    noise_fn(step_index, shape) for the stochastic ones (ddpm, euler_ancestral, ddim with
    eta > 0). step_transform(i, x, sigma_next) -> x: a pure map of the state after step i
    (the inpaint blend); callback(info) observes each step after it, info = {i, t, sigma,
    x, x0_hat}. start: first step index (img2img, see strength_to_start); i is always the
    absolute step index. The state is kept in float32 (half inputs are upcast).
    """
    sch = schedule(name, dcfg, steps)
    ts, sigmas = sch["timesteps"], sch["sigmas"]
    _check_start(start, len(ts))
    if eta != 0.0 and name != "ddim":
        raise UserError(f"eta={eta}: only ddim takes eta (sampler {name!r})")
    stochastic = name in ("ddpm", "euler_ancestral") or (name == "ddim" and eta > 0)
    if stochastic and noise_fn is None:
        raise ValueError(f"sampler {name!r} (eta={eta}) draws noise: pass noise_fn, e.g. noise_fn_from_keys(keys)")
    if schedules.field(dcfg, "thresholding"):
        raise UserError("cfg.diffusion.thresholding=True (dynamic thresholding) is not supported")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    denoise_fn = make_denoise_fn(model_fn, dcfg, sigmas, ts)
    nf = None if noise_fn is None else (lambda i, shape: noise_fn(i + start, shape).to(x.device, x.dtype))
    cb = None if callback is None else (
        lambda info: callback(dict(i=info["i"] + start, t=ts[info["i"] + start], sigma=info["sigma"],
                                   x=info["x"], x0_hat=info["x0_hat"])))
    tf = None if step_transform is None else (lambda i, x, sigma_next: step_transform(i + start, x, sigma_next))
    clip = schedules.field(dcfg, "clip_sample_range") if schedules.field(dcfg, "clip_sample") else None
    s = sigmas[start:]
    common = dict(callback=cb, step_transform=tf)

    if name == "ddim":
        return samplers_discrete.ddim(denoise_fn, x, s, sch["sigmas_to"][start:], eta, clip, nf, **common)
    if name == "plms":
        back = sch["sigmas_back"][start + 1] if start + 1 < len(ts) else None
        return samplers_discrete.plms(denoise_fn, x, s, schedules.field(dcfg, "prediction_type"),
                                      sch["sigmas_to"][start:], back, **common)
    if name == "ddpm":
        return samplers_discrete.ddpm(denoise_fn, x, s, schedules.field(dcfg, "variance_type"), clip, nf,
                                      noise_at_end=bool(ts[-1] > 0), **common)
    if name.startswith("dpmpp"):
        return samplers_sigma.dpmpp_2m(denoise_fn, x, s, **common)
    if name == "euler":
        return samplers_sigma.euler(denoise_fn, x, s, **common)
    if name == "euler_ancestral":
        return samplers_sigma.euler_ancestral(denoise_fn, x, s, nf, **common)
    if name == "heun":
        return samplers_sigma.heun(denoise_fn, x, s, clip, **common)
    return samplers_sigma.lms(denoise_fn, x, s, **common)
