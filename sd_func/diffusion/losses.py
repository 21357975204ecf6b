"""The latent-diffusion training loss (Ho et al. 2020; Salimans & Ho 2022 for v).

x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps with t uniform over the
training timesteps; the network regresses eps ("epsilon"), v = sqrt(alpha_bar) eps
- sqrt(1 - alpha_bar) x0 ("v_prediction") or x0 ("sample"), per
cfg.diffusion.prediction_type. Options:

- min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via
  Min-SNR Weighting Strategy"): each example's MSE is weighted by
  min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v and
  min(SNR, gamma) for x0, with SNR = alpha_bar / (1 - alpha_bar);
- noise offset (Guttenberg 2023, "Diffusion with Offset Noise"): eps gets a
  per-example, per-channel constant `noise_offset * offset_noise[b, c]`, which lets
  the model learn very dark and very bright images.

All functions are pure; `diffusion_loss` takes the model as `model_fn(x_t, t)`.
"""

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
    return alpha_bar / (1.0 - alpha_bar)


def target(x0, eps, alpha_bar, prediction_type: str) -> torch.Tensor:
    """The regression target for x0, eps at alpha_bar (broadcast [B,1,1,1])."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * eps - (1.0 - alpha_bar).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"cfg.diffusion.prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-example loss weight of min-SNR-gamma for the given target (1 where SNR = 0)."""
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        w = clipped / snr_t
    elif prediction_type == "v_prediction":
        w = clipped / (snr_t + 1.0)
    elif prediction_type == "sample":
        w = clipped
    else:
        raise ValueError(f"cfg.diffusion.prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")
    return torch.where(snr_t > 0, w, torch.ones_like(w))  # zero-terminal-SNR schedules


def diffusion_loss(model_fn, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                   alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                   min_snr_gamma: float = 0.0, noise_offset: float = 0.0,
                   offset_noise: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of the (weighted) per-example MSE; float32 0-d tensor.

    x0: clean latents [B,C,h,w]; eps: standard normal noise like x0; t: int timesteps [B];
    offset_noise: [B,C] standard normal, used when noise_offset > 0; weights: [B] per-example
    loss weights (DreamBooth's prior preservation, train.unet_stage.prior_weights).
    """
    if noise_offset:
        if offset_noise is None:
            raise ValueError("diffusion_loss: noise_offset > 0 needs offset_noise [B,C]")
        eps = eps + noise_offset * offset_noise[:, :, None, None].to(eps.dtype)
    alpha_bar = alphas_cumprod[t].to(torch.float32)[:, None, None, None]
    x0, eps = x0.float(), eps.float()
    x_t = alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * eps
    pred = model_fn(x_t, t).float()
    per_example = (pred - target(x0, eps, alpha_bar, prediction_type)).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma and min_snr_gamma > 0:
        per_example = per_example * min_snr_weight(snr(alpha_bar[:, 0, 0, 0]), min_snr_gamma, prediction_type)
    if weights is not None:
        per_example = per_example * weights.to(per_example.dtype)
    return per_example.mean()
