"""Discrete noise schedules (DDPM, Ho et al. 2020; Nichol & Dhariwal 2021) and
the inference grids built on them: timestep spacings ("Common Diffusion Noise
Schedules and Sample Steps are Flawed", Lin et al. 2023, Table 2), sigma
schedules sigma = sqrt((1 - alpha_bar) / alpha_bar) and Karras et al. 2022's
rho = 7 sigmas (EDM, eq. 5), timestep <-> sigma conversion.

`cfg.diffusion` uses the field names of a diffusers scheduler_config.json
(num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type,
timestep_spacing, steps_offset, ...), so a checkpoint's scheduler config is read
as it is written. Grids are computed with the same numpy/torch operations as the
diffusers schedulers, so timesteps and sigmas agree with them bit for bit;
numpy is used here (host-side, a few hundred numbers), never in the sampling loop.
"""

import math

import ml_collections
import numpy as np
import torch

from sd_func.errors import UserError

SPACINGS = ("leading", "trailing", "linspace")
# Timestep grid families: how each diffusers scheduler rounds its grid.
#   "ddim": DDIM, DDPM, PNDM (int64);  "euler": Euler, Euler a, Heun, LMS (float32,
#   linspace unrounded);  "dpmsolver": DPMSolverMultistep (int64, an n+1 point grid).
FAMILIES = ("ddim", "euler", "dpmsolver")


def config(**overrides) -> ml_collections.ConfigDict:
    """Stable Diffusion 1.x's training schedule (scaled_linear, eps prediction)."""
    c = ml_collections.ConfigDict(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon",
        timestep_spacing="leading", steps_offset=1, clip_sample=False,
        set_alpha_to_one=False, rescale_betas_zero_snr=False,
    ))
    c.update(overrides)
    return c


def betas(dcfg) -> torch.Tensor:
    """Per-step betas [T], float32, as diffusers computes them."""
    n, b0, b1 = dcfg.num_train_timesteps, dcfg.beta_start, dcfg.beta_end
    kind = dcfg.beta_schedule
    if kind == "linear":
        b = torch.linspace(b0, b1, n, dtype=torch.float32)
    elif kind == "scaled_linear":
        b = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        b = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    else:
        raise UserError(f"cfg.diffusion.beta_schedule={kind!r}: expected linear, scaled_linear or squaredcos_cap_v2")
    if dcfg.get("rescale_betas_zero_snr", False):
        b = _rescale_zero_terminal_snr(b)
    return b


def _rescale_zero_terminal_snr(b: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1."""
    sqrt_ab = torch.cumprod(1.0 - b, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))  # this grouping rounds as diffusers does
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def alphas_cumprod(dcfg) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), [T] float32."""
    return torch.cumprod(1.0 - betas(dcfg), dim=0)


def field(dcfg, name):
    """A cfg.diffusion field, or schedules.config()'s default when the key is absent."""
    return dcfg[name] if name in dcfg or name not in _DEFAULTS else _DEFAULTS[name]


_DEFAULTS = dict(config().to_dict(), use_karras_sigmas=False,
                 clip_sample_range=1.0, thresholding=False, variance_type="fixed_small",
                 interpolation_type="linear", final_sigmas_type="zero")


def timesteps(dcfg, steps: int, family: str = "ddim") -> torch.Tensor:
    """The descending inference timesteps of `steps` steps, as diffusers' set_timesteps.

    family: "ddim" (DDIM/DDPM/PNDM, int64), "euler" (Euler/Heun/LMS, float32) or
    "dpmsolver" (DPMSolverMultistep, int64). cfg.diffusion.timestep_spacing:
    leading (t = i * T//n + steps_offset), trailing (round(T - i * T/n) - 1) or
    linspace (linspace(0, T-1, n)).
    """
    T, n = int(field(dcfg, "num_train_timesteps")), int(steps)
    spacing, offset = field(dcfg, "timestep_spacing"), int(field(dcfg, "steps_offset"))
    if n < 1 or n > T:
        raise UserError(f"steps={n}: expected 1 <= steps <= cfg.diffusion.num_train_timesteps={T}")
    if spacing not in SPACINGS:
        raise UserError(f"cfg.diffusion.timestep_spacing={spacing!r}: expected one of {SPACINGS}")
    if family not in FAMILIES:
        raise ValueError(f"timestep family {family!r}: expected one of {FAMILIES}")
    if family == "dpmsolver":  # an n+1 point grid whose t=0 end is dropped (lambda_min_clipped=-inf)
        if spacing == "linspace":
            t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].copy().astype(np.int64) + offset
        else:
            t = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
        return torch.from_numpy(t)
    dtype = np.float32 if family == "euler" else np.int64
    if spacing == "linspace":
        if family == "euler":
            t = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        else:
            t = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        t = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(dtype) + dtype(offset)
    else:
        t = np.round(np.arange(T, 0, -T / n)).astype(dtype) - dtype(1)
    return torch.from_numpy(t)


def train_sigmas(dcfg) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1, float32.

    With rescale_betas_zero_snr the last alpha_bar is 0 (infinite sigma); like
    diffusers' sigma-space schedulers it is clamped to 2**-24 here.
    """
    ab = alphas_cumprod(dcfg)
    if field(dcfg, "rescale_betas_zero_snr"):
        ab[-1] = 2**-24
    return ((1 - ab) / ab) ** 0.5


def t_to_sigma(t, dcfg) -> torch.Tensor:
    """sigma at (possibly fractional) timesteps, by linear interpolation in t, float32."""
    s = train_sigmas(dcfg).numpy()
    return torch.from_numpy(np.interp(np.asarray(t), np.arange(len(s)), s).astype(np.float32))


def sigma_to_t(sigma, dcfg) -> torch.Tensor:
    """Fractional timesteps of sigmas, by linear interpolation in log sigma, float64.

    The inverse of t_to_sigma up to the interpolation rule (diffusers' _sigma_to_t).
    """
    return torch.from_numpy(_sigma_to_t(np.asarray(sigma, dtype=np.float64),
                                        np.log(train_sigmas(dcfg).numpy())))


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, float64."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.from_numpy((hi + ramp * (lo - hi)) ** rho)


def sigmas(dcfg, steps: int, family: str = "euler", karras=None):
    """(sigmas [n+1] float32 ending in 0, timesteps [n]) for a sigma-space sampler.

    family "euler": Euler/Heun/LMS grids (sigma interpolated at the float timesteps);
    "dpmsolver": DPMSolverMultistep's. karras=None reads cfg.diffusion.use_karras_sigmas;
    Karras grids take their timesteps from sigma_to_t (rounded for dpmsolver unless
    the schedule is squaredcos_cap_v2, as diffusers does).
    """
    if karras is None:
        karras = bool(field(dcfg, "use_karras_sigmas"))
    if field(dcfg, "interpolation_type") != "linear":
        raise UserError(f"cfg.diffusion.interpolation_type={dcfg.interpolation_type!r}: only 'linear' is supported")
    if field(dcfg, "final_sigmas_type") != "zero":
        raise UserError(f"cfg.diffusion.final_sigmas_type={dcfg.final_sigmas_type!r}: only 'zero' is supported")
    ts = timesteps(dcfg, steps, family).numpy()
    s_train = train_sigmas(dcfg).numpy()
    log_s = np.log(s_train)
    if not karras:
        s = np.interp(ts, np.arange(len(s_train)), s_train)
    else:
        if family == "dpmsolver":
            lo, hi = s_train[0].item(), s_train[-1].item()
        else:
            s_grid = np.interp(ts, np.arange(len(s_train)), s_train)
            lo, hi = s_grid[-1].item(), s_grid[0].item()
        s = karras_sigmas(lo, hi, steps).numpy()
        ts = np.array([_sigma_to_t(np.asarray(v), log_s) for v in s])
        if family == "dpmsolver":
            if field(dcfg, "beta_schedule") != "squaredcos_cap_v2":
                ts = ts.round()
            ts = ts.astype(np.int64)
        else:
            ts = ts.astype(np.float32)
    s = np.concatenate([s, [0.0]]).astype(np.float32)
    return torch.from_numpy(s), torch.from_numpy(np.ascontiguousarray(ts))
