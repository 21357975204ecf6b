"""Model parameterizations: eps (Ho et al. 2020), v (Salimans & Ho 2022, "Progressive
Distillation") and x0 ("sample") predictions, turned into the denoisers samplers use.

A raw `model_fn(x, t) -> out` is what the UNet computes: x the model input, t the
discrete (int64) or fractional (float32) training timestep, broadcast to the batch.
`make_denoise_fn` wraps it once, for one of two state spaces:

- "vp" (variance preserving; DDIM, PLMS, DDPM, DPM-Solver++): x_t = alpha x0 + sigma eps
  with alpha^2 + sigma^2 = 1. denoise_fn(x, t, alpha, sigma) -> (x0_hat, eps_hat).
- "ve" (k-diffusion's sigma space, Karras et al. 2022): x = x0 + sigma eps, the model
  sees x / sqrt(sigma^2 + 1). denoise_fn(x, sigma, t) -> x0_hat.
- "output": denoise_fn(x, t) -> the raw output, for PLMS, which (as diffusers does)
  combines raw outputs across steps before converting them with vp_x0_eps.

The formulas and their order of operations are diffusers' (DDIMScheduler.step,
EulerDiscreteScheduler.step, ...), so results agree with it to the last bit.
"""

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"cfg.diffusion.prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")
    return prediction_type


def vp_x0_eps(out, x, alpha, sigma, prediction_type: str):
    """(x0_hat, eps_hat) from a model output at x = alpha x0 + sigma eps."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":  # v = alpha eps - sigma x0
        return alpha * x - sigma * out, alpha * out + sigma * x
    if prediction_type == "sample":
        return out, (x - alpha * out) / sigma
    _check(prediction_type)


def ve_x0(out, x, sigma, prediction_type: str):
    """x0_hat from a model output at x = x0 + sigma eps (model input x / sqrt(sigma^2 + 1))."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":  # alpha = 1/sqrt(s^2+1): x0 = alpha^2 x - s alpha v
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    if prediction_type == "sample":
        return out
    _check(prediction_type)


def _batched_t(t, x):
    """A 0-d timestep as the [B] tensor on x's device that a UNet takes."""
    t = torch.as_tensor(t)
    return t.to(x.device).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)


def make_denoise_fn(model_fn, dcfg, space: str):
    """Wrap model_fn(x, t) for the samplers of one state space ("vp", "ve" or "output").

    The model output is cast to x's dtype (float32 latents), so a half-precision model
    still runs the sampler arithmetic in float32.
    """
    pt = _check(dcfg.get("prediction_type", "epsilon"))
    if space == "vp":
        def denoise_fn(x, t, alpha, sigma):
            out = model_fn(x, _batched_t(t, x)).to(x.dtype)
            return vp_x0_eps(out, x, alpha, sigma, pt)
    elif space == "ve":
        def denoise_fn(x, sigma, t):
            out = model_fn(x / ((sigma**2 + 1) ** 0.5), _batched_t(t, x)).to(x.dtype)
            return ve_x0(out, x, sigma, pt)
    elif space == "output":  # the raw output, for samplers that combine outputs first (PLMS)
        def denoise_fn(x, t):
            return model_fn(x, _batched_t(t, x)).to(x.dtype)
    else:
        raise ValueError(f"space={space!r}: expected 'vp', 've' or 'output'")
    return denoise_fn
