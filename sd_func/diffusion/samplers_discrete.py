"""The discrete-time samplers, written in sigma space: DDIM (Song et al. 2021), PLMS (Liu
et al. 2022, "Pseudo Numerical Methods for Diffusion Models") and ancestral DDPM (Ho et
al. 2020).

They move the same state as the k-diffusion samplers, x = x0 + sigma eps, with the same
denoise_fn(x, sigma) -> x0_hat; diffusers' variance-preserving latents are
x_vp = x / sqrt(sigma^2 + 1). In sigma space DDIM is a straight step along eps (with
eta > 0 an ancestral one), a PLMS step is DDIM with a combined eps, and the DDPM
posterior is an ancestral step. `sigmas` [n+1] is the grid the model is evaluated on
(sigma of the run's timesteps, then 0); the final 0 stands for diffusers' output latents.

Two quirks of diffusers' DDIMScheduler and PNDMScheduler are reproduced for parity
(leading spacing, the SD default, has neither): a step from timestep t goes to
t - T//n (`sigmas_to`), which for trailing or linspace spacing is not the next grid
timestep, and the final step goes to final_alpha_cumprod (alpha_bar_0 unless
set_alpha_to_one), not to sigma = 0. diffusers keeps its VP latents across that gap and
reads them at the next timestep; in sigma space that is the rescale `carry`, which for
the last step is the conversion to diffusers' output latents.
"""

import torch

from sd_func.diffusion.denoiser import eps_from_output, output_from_x0
from sd_func.diffusion.samplers_sigma import clip_x0, end_step
from sd_func.errors import UserError

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


def carry(x, sigma_from, sigma_to):
    """The state at sigma_from re-read at sigma_to with the same VP latents
    x / sqrt(sigma^2 + 1); the identity when the two are equal."""
    if sigma_from == sigma_to:
        return x
    return x * ((sigma_to**2 + 1) / (sigma_from**2 + 1)) ** 0.5


def ddim(denoise_fn, x, sigmas, sigmas_to=None, eta=0.0, clip=None, noise_fn=None, callback=None,
         step_transform=None):
    """DDIM, Song et al. 2021 eq. 12 in sigma space; eta = 0 deterministic, eta = 1 DDPM-like.

    sigmas_to[i]: where step i lands (default sigmas[i+1]). clip: clamp x0_hat to
    [-clip, clip]; eps_hat stays the unclipped model's, as in diffusers.
    """
    to = sigmas[1:] if sigmas_to is None else sigmas_to
    for i in range(len(sigmas) - 1):
        sigma, sigma_to = sigmas[i], to[i]
        # 1. x0 and eps predicted at sigma.
        x0_hat = denoise_fn(x, sigma)
        eps_hat = (x - x0_hat) / sigma
        x0_hat = clip_x0(x0_hat, clip)
        # 2. eq. 16's sigma_t(eta) in sigma space: sigma_up^2 = eta^2 s_to^2 (s^2 - s_to^2) / s^2.
        sigma_up = eta * (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        # 3. x at sigma_to: x0 + sqrt(s_to^2 - sigma_up^2) eps + sigma_up z.
        x = x0_hat + (sigma_to**2 - sigma_up**2).clamp(min=0) ** 0.5 * eps_hat
        if eta > 0:
            x = x + sigma_up * noise_fn(i, x.shape)
        x = carry(x, sigma_to, sigmas[i + 1])
        x = end_step(i, sigma, sigmas[i + 1], x, x0_hat, step_transform, callback)
    return x


def _combine(outs):
    """Adams-Bashforth weights of order len(outs) (1-4) over raw outputs, newest last (eq. 12)."""
    if len(outs) == 1:
        return outs[-1]
    if len(outs) == 2:
        return (3 * outs[-1] - outs[-2]) / 2
    if len(outs) == 3:
        return (23 * outs[-1] - 16 * outs[-2] + 5 * outs[-3]) / 12
    return (1 / 24) * (55 * outs[-1] - 59 * outs[-2] + 37 * outs[-3] - 9 * outs[-4])


def plms(denoise_fn, x, sigmas, prediction_type, sigmas_to=None, sigma_back=None, callback=None,
         step_transform=None):
    """PLMS (PNDM's linear multistep half) with diffusers' skip_prk_steps warm-up.

    A step is x + (sigma_to - sigma) eps, eq. 11's transfer phi in sigma space. Step 0 is
    a Heun-like predictor/corrector: predict with the output at sigmas[0], average it with
    the output at the predicted point, and step from the start again; later steps use
    Adams-Bashforth of order up to 4 over the outputs at sigmas[1:], step 0's included (a
    predictor output is not kept, as in diffusers).

    Like diffusers, the multistep combination is over RAW model outputs (eps, v or x0, as
    prediction_type says), converted to eps at the current point. For eps prediction that
    is combining eps; for v or x0 prediction it is not (the conversion depends on the point
    each output was made at), and we keep diffusers' choice for parity: each x0_hat goes
    back to the raw output of its own point (output_from_x0), the outputs are combined,
    and the result is read at the current point (eps_from_output).

    sigmas_to[k]: where step k lands (default sigmas[k+1]); sigma_back: where the warm-up
    corrector steps from (diffusers: timestep t_1 + T//n; default sigmas[0]).
    """
    n = len(sigmas) - 1
    to = sigmas[1:] if sigmas_to is None else sigmas_to
    back = sigmas[0] if sigma_back is None else sigma_back

    def output_at(x, sigma):
        x0_hat = denoise_fn(x, sigma)
        return x0_hat, output_from_x0(x0_hat, x, sigma, prediction_type)

    def transfer(x, sigma, sigma_to, out):
        return x + (sigma_to - sigma) * eps_from_output(out, x, sigma, prediction_type)

    # 1. Predictor: one step from sigmas[0] with the output there.
    x0_hat, e0 = output_at(x, sigmas[0])
    x_pred = carry(transfer(x, sigmas[0], to[0], e0), to[0], sigmas[1])
    if n == 1:
        return end_step(0, sigmas[0], sigmas[1], x_pred, x0_hat, step_transform, callback)
    # 2. Corrector: the average with the output at the predicted point, from the start again.
    _, e1 = output_at(x_pred, sigmas[1])
    x = transfer(carry(x, sigmas[0], back), back, sigmas[1], (e0 + e1) / 2)
    x = end_step(0, sigmas[0], sigmas[1], x, x0_hat, step_transform, callback)
    # 3. Linear multistep over the outputs at sigmas[1:], e0 included.
    outs = [e0]
    for k in range(1, n):
        x0_hat, e = output_at(x, sigmas[k])
        outs = outs[-3:] + [e]
        x = carry(transfer(x, sigmas[k], to[k], _combine(outs)), to[k], sigmas[k + 1])
        x = end_step(k, sigmas[k], sigmas[k + 1], x, x0_hat, step_transform, callback)
    return x


def ddpm(denoise_fn, x, sigmas, variance_type="fixed_small", clip=None, noise_fn=None, callback=None,
         step_transform=None, noise_at_end=True):
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0_hat), Ho et al. 2020 eq. 6-7.

    diffusers' posterior mean and noise divided by sqrt(alpha_bar_prev) are, in sigma space,
    x0 + (s_prev / s)^2 (x - x0) and a variance of
      fixed_small      beta~_t / alpha_bar_prev = s_prev^2 (s^2 - s_prev^2) / s^2
                       (Euler a's sigma_up^2), clamped to 1e-20 as diffusers does;
      fixed_small_log  the same, through exp(0.5 log);
      fixed_large      beta_t / alpha_bar_prev = (s^2 - s_prev^2) (1 + s_prev^2) / (1 + s^2).
    noise_at_end: diffusers adds noise at every step with timestep > 0, so a grid that
    ends at t > 0 gets noise at its last step too (False when it ends at t = 0).
    """
    if variance_type not in VARIANCE_TYPES:
        raise UserError(f"cfg.diffusion.variance_type={variance_type!r}: expected one of {', '.join(VARIANCE_TYPES)}")
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_prev = sigmas[i], sigmas[i + 1]
        # 1. x0 predicted at sigma.
        x0_hat = clip_x0(denoise_fn(x, sigma), clip)
        # 2. Posterior mean, eq. 7.
        ratio = sigma_prev**2 / sigma**2
        x = x0_hat + ratio * (x - x0_hat)
        # 3. Posterior noise.
        if i < n - 1 or noise_at_end:
            if variance_type == "fixed_large":
                std = ((sigma**2 - sigma_prev**2) * (1 + sigma_prev**2) / (1 + sigma**2)) ** 0.5
            else:
                var = torch.clamp(ratio * (sigma**2 - sigma_prev**2), min=1e-20)
                std = var**0.5 if variance_type == "fixed_small" else torch.exp(0.5 * torch.log(var))
            x = x + std * noise_fn(i, x.shape)
        x = end_step(i, sigma, sigma_prev, x, x0_hat, step_transform, callback)
    return x
