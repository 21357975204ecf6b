"""Discrete noise schedules (DDPM, Ho et al. 2020; Nichol & Dhariwal 2021).

`cfg.diffusion` uses the field names of a diffusers scheduler_config.json
(num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type,
timestep_spacing, steps_offset, ...), so a checkpoint's scheduler config is read
as it is written.
"""

import math

import ml_collections
import torch


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
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        b = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    else:
        raise ValueError(f"cfg.diffusion.beta_schedule={kind!r}: expected linear, scaled_linear or squaredcos_cap_v2")
    if dcfg.get("rescale_betas_zero_snr", False):
        b = _rescale_zero_terminal_snr(b)
    return b


def _rescale_zero_terminal_snr(b: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1."""
    sqrt_ab = torch.cumprod(1.0 - b, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def alphas_cumprod(dcfg) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), [T] float32."""
    return torch.cumprod(1.0 - betas(dcfg), dim=0)
