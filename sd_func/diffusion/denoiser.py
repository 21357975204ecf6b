"""One denoiser for every sampler: `denoise_fn(x, sigma) -> x0_hat` in the sigma space of
Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models",
k-diffusion's external.DiscreteEpsDDPMDenoiser), built from a discrete-time model that
predicts eps (Ho et al. 2020), v (Salimans & Ho 2022, "Progressive Distillation") or x0
("sample").

The sampler state is x = x0 + sigma eps. The model was trained on the variance-preserving
x_vp = alpha x0 + sigma_vp eps with alpha = 1/sqrt(sigma^2 + 1), sigma_vp = sigma alpha, so
it sees x / sqrt(sigma^2 + 1) (diffusers' scale_model_input) and the training timestep t
of sigma. t is looked up in the run's own (sigma, timestep) grid, so the model gets
exactly the timestep diffusers' scheduler gives it (int64 for DDIM/PLMS/DDPM/DPM-Solver,
float32 for Euler/Heun/LMS); a sigma off that grid falls back to schedules.sigma_to_t.

The conversions between raw outputs, x0 and eps at (x, sigma) are public because PLMS
needs them: it combines raw outputs across steps, as diffusers' PNDMScheduler does.
"""

import torch

from sd_func.diffusion import schedules
from sd_func.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"cfg.diffusion.prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")
    return prediction_type


def x0_from_output(out, x, sigma, prediction_type: str):
    """x0_hat from a raw model output at x = x0 + sigma eps (the model saw x / sqrt(sigma^2 + 1))."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":  # v = alpha eps - sigma_vp x0  =>  x0 = alpha^2 x - sigma alpha v
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    if prediction_type == "sample":
        return out
    check_prediction_type(prediction_type)


def output_from_x0(x0_hat, x, sigma, prediction_type: str):
    """The raw model output that gives x0_hat at (x, sigma): x0_from_output's inverse."""
    if prediction_type == "epsilon":
        return (x - x0_hat) / sigma
    if prediction_type == "v_prediction":  # v = alpha (eps - sigma x0)
        return ((x - x0_hat) / sigma - sigma * x0_hat) / (sigma**2 + 1) ** 0.5
    if prediction_type == "sample":
        return x0_hat
    check_prediction_type(prediction_type)


def eps_from_output(out, x, sigma, prediction_type: str):
    """eps_hat from a raw model output, read at (x, sigma)."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":  # eps = alpha v + sigma_vp x_vp = alpha (v + sigma alpha x)
        return (out + sigma * x / (sigma**2 + 1) ** 0.5) / (sigma**2 + 1) ** 0.5
    if prediction_type == "sample":
        return (x - out) / sigma
    check_prediction_type(prediction_type)


def _batched_t(t, x):
    """A 0-d timestep as the [B] tensor on x's device that a UNet takes."""
    t = torch.as_tensor(t)
    return t.to(x.device).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)


def make_denoise_fn(model_fn, dcfg, sigmas, timesteps):
    """denoise_fn(x, sigma) -> x0_hat from model_fn(x, t) -> eps / v / x0 (as
    cfg.diffusion.prediction_type says), for a run on the grid (sigmas[i], timesteps[i]).

    sigmas may carry the grid's final 0 (zip stops at the last timestep). The model's
    output is cast to x's dtype, so a half-precision model still leaves the sampler
    arithmetic in float32.
    """
    pt = check_prediction_type(schedules.field(dcfg, "prediction_type"))
    t_of = {}
    for s, t in zip(sigmas.tolist(), timesteps):
        t_of.setdefault(s, t)  # float32 sigmas as exact Python floats

    def denoise_fn(x, sigma):
        t = t_of.get(float(sigma))
        if t is None:  # not a grid point (a custom sampler): the fractional timestep of sigma
            t = schedules.sigma_to_t(float(sigma), dcfg).float()
        out = model_fn(x / ((sigma**2 + 1) ** 0.5), _batched_t(t, x)).to(x.dtype)
        return x0_from_output(out, x, sigma, pt)
    return denoise_fn
