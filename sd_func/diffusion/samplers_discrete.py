"""Timestep-space samplers on the variance-preserving state x_t = alpha x0 + sigma eps:
DDIM (Song et al. 2021), PLMS (Liu et al. 2022, "Pseudo Numerical Methods for
Diffusion Models") and ancestral DDPM (Ho et al. 2020).

Each is a small pure function of (denoise_fn, x, schedule arrays, noise_fn,
callback); the schedule arrays (timesteps, alpha_bar at t and at the step's
target) come from samplers.schedule, so a sampler has no hidden step counter.
denoise_fn is denoiser.make_denoise_fn(model_fn, dcfg, "vp"):
(x, t, alpha, sigma) -> (x0_hat, eps_hat). The arithmetic follows diffusers'
DDIMScheduler / PNDMScheduler / DDPMScheduler step by step (same operations, same
order), which is what makes them agree to float32 rounding.
"""

import torch

from sd_func.diffusion.denoiser import vp_x0_eps


def _report(callback, i, t, x, x0_hat):
    if callback is not None:
        callback(dict(i=i, t=t, x=x, x0_hat=x0_hat))


def ddim(denoise_fn, x, timesteps, alpha_bar, alpha_bar_prev, eta=0.0, clip=None,
         noise_fn=None, callback=None):
    """DDIM, Song et al. 2021 eq. 12; eta = 0 deterministic, eta = 1 DDPM-like."""
    for i, t in enumerate(timesteps):
        ab, ab_prev = alpha_bar[i], alpha_bar_prev[i]
        # 1. x0 and eps predicted at t.
        x0_hat, eps_hat = denoise_fn(x, t, ab**0.5, (1 - ab) ** 0.5)
        if clip is not None:
            x0_hat = x0_hat.clamp(-clip, clip)
        # 2. sigma_t(eta) = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)   (eq. 16)
        std = eta * (((1 - ab_prev) / (1 - ab)) * (1 - ab / ab_prev)) ** 0.5
        # 3. x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma_t^2) eps + sigma_t z
        x = ab_prev**0.5 * x0_hat + (1 - ab_prev - std**2) ** 0.5 * eps_hat
        if eta > 0:
            x = x + std * noise_fn(i, x.shape)
        _report(callback, i, t, x, x0_hat)
    return x


def plms(output_fn, x, timesteps, stride, alphas_cumprod, final_alpha_bar, prediction_type,
         callback=None):
    """PLMS (PNDM's linear multistep half) with diffusers' skip_prk_steps warm-up.

    output_fn(x, t) is the raw model output (make_denoise_fn(..., "output")): like
    diffusers, the multistep combination is taken over raw outputs and converted to
    eps at the current point (identical for eps prediction; for v prediction it is
    diffusers' approximation, kept for parity). Step k transfers t -> t - stride with
    eq. 11's phi; the first step is a Heun-like predictor/corrector, later ones use
    Adams-Bashforth of order up to 4 (eq. 12). A predictor output is not kept in the
    history, as in diffusers.
    """
    def ab(t):
        return alphas_cumprod[t] if t >= 0 else final_alpha_bar

    def transfer(x, t, t_prev, out):  # phi(x_t, eps, t, t_prev), eq. 11
        a, a_prev = ab(t), ab(t_prev)
        _, eps = _to_eps(out, x, a, prediction_type)
        denom = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
        return (a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom

    ts = [int(t) for t in timesteps]
    # 1. Predictor: one transfer from ts[0] with the output there.
    e0 = output_fn(x, timesteps[0])
    x_pred = transfer(x, ts[0], ts[0] - stride, e0)
    if len(ts) == 1:
        _report(callback, 0, timesteps[0], x_pred, None)
        return x_pred
    # 2. Corrector: average with the output at the predicted point.
    e1 = output_fn(x_pred, timesteps[1])
    x = transfer(x, ts[1] + stride, ts[1], (e1 + e0) / 2)
    _report(callback, 0, timesteps[0], x, None)
    # 3. Linear multistep over the outputs at ts[1:], e0 included.
    hist = [e0]
    for k in range(1, len(ts)):
        hist = hist[-3:] + [output_fn(x, timesteps[k])]
        if len(hist) == 2:
            out = (3 * hist[-1] - hist[-2]) / 2
        elif len(hist) == 3:
            out = (23 * hist[-1] - 16 * hist[-2] + 5 * hist[-3]) / 12
        else:
            out = (1 / 24) * (55 * hist[-1] - 59 * hist[-2] + 37 * hist[-3] - 9 * hist[-4])
        x = transfer(x, ts[k], ts[k] - stride, out)
        _report(callback, k, timesteps[k], x, None)
    return x


def _to_eps(out, x, ab, prediction_type):
    return vp_x0_eps(out, x, ab**0.5, (1 - ab) ** 0.5, prediction_type)


def ddpm(denoise_fn, x, timesteps, alpha_bar, alpha_bar_prev, variance_type="fixed_small",
         clip=None, noise_fn=None, callback=None):
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0_hat), Ho et al. 2020 eq. 6-7.

    variance_type: fixed_small (posterior variance beta~_t), fixed_small_log (the same
    through exp(0.5 log)), fixed_large (beta_t). No noise is added at t = 0.
    """
    for i, t in enumerate(timesteps):
        ab, ab_prev = alpha_bar[i], alpha_bar_prev[i]
        alpha_t = ab / ab_prev
        beta_t = 1 - alpha_t
        # 1. x0 predicted at t.
        x0_hat, _ = denoise_fn(x, t, ab**0.5, (1 - ab) ** 0.5)
        if clip is not None:
            x0_hat = x0_hat.clamp(-clip, clip)
        # 2. Posterior mean, eq. 7.
        c_x0 = (ab_prev**0.5 * beta_t) / (1 - ab)
        c_xt = alpha_t**0.5 * (1 - ab_prev) / (1 - ab)
        x_mean = c_x0 * x0_hat + c_xt * x
        # 3. Posterior noise.
        if t > 0:
            var = torch.clamp((1 - ab_prev) / (1 - ab) * beta_t, min=1e-20)
            if variance_type == "fixed_small":
                std = var**0.5
            elif variance_type == "fixed_small_log":
                std = torch.exp(0.5 * torch.log(var))
            elif variance_type == "fixed_large":
                std = beta_t**0.5
            else:
                raise ValueError(f"cfg.diffusion.variance_type={variance_type!r}: expected fixed_small, "
                                 "fixed_small_log or fixed_large")
            x_mean = x_mean + std * noise_fn(i, x.shape)
        x = x_mean
        _report(callback, i, t, x, x0_hat)
    return x
