"""Sigma-space samplers (Karras et al. 2022, "Elucidating the Design Space", k-diffusion):
Euler, Euler ancestral, Heun (Alg. 1), LMS, and DPM-Solver++(2M) (Lu et al. 2022).

Each is a small pure function (denoise_fn, x, sigmas, timesteps, noise_fn, callback):
`sigmas` [n+1] ends in 0, `timesteps` [n] are the model timesteps that go with
sigmas[:n] (from schedules.sigmas). Euler, Euler a, Heun and LMS move
x = x0 + sigma eps with denoise_fn = make_denoise_fn(model_fn, dcfg, "ve"):
(x, sigma, t) -> x0_hat. DPM-Solver++ keeps diffusers' variance-preserving state
x = alpha x0 + sigma_vp eps (alpha = 1/sqrt(sigma^2+1), sigma_vp = sigma alpha) with the
"vp" denoiser, so that it agrees with DPMSolverMultistepScheduler to float32 rounding.
"""

import torch


def _report(callback, i, t, sigma, x, x0_hat):
    if callback is not None:
        callback(dict(i=i, t=t, sigma=sigma, x=x, x0_hat=x0_hat))


def euler(denoise_fn, x, sigmas, timesteps, callback=None):
    """Euler steps on the probability-flow ODE dx/dsigma = (x - x0_hat) / sigma."""
    for i, t in enumerate(timesteps):
        sigma = sigmas[i]
        x0_hat = denoise_fn(x, sigma, t)
        d = (x - x0_hat) / sigma
        x = x + d * (sigmas[i + 1] - sigma)
        _report(callback, i, t, sigma, x, x0_hat)
    return x


def euler_ancestral(denoise_fn, x, sigmas, timesteps, noise_fn, callback=None):
    """Euler a: an ODE step down to sigma_down, then fresh noise of std sigma_up, with
    sigma_up^2 = sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2 and
    sigma_down^2 = sigma_to^2 - sigma_up^2 (k-diffusion get_ancestral_step, eta = 1)."""
    for i, t in enumerate(timesteps):
        sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
        x0_hat = denoise_fn(x, sigma_from, t)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        d = (x - x0_hat) / sigma_from
        x = x + d * (sigma_down - sigma_from)
        if sigma_to > 0:
            x = x + noise_fn(i, x.shape) * sigma_up
        _report(callback, i, t, sigma_from, x, x0_hat)
    return x


def heun(denoise_fn, x, sigmas, timesteps, clip=None, callback=None):
    """Karras et al. 2022 Alg. 1 (deterministic, S_churn = 0): Euler predictor, trapezoidal
    corrector at sigma_next; the last step, to sigma = 0, is plain Euler."""
    n = len(timesteps)
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # 1. Euler predictor.
        x0_hat = _clip(denoise_fn(x, sigma, timesteps[i]), clip)
        d = (x - x0_hat) / sigma
        dt = sigma_next - sigma
        if i == n - 1:
            x = x + d * dt
        else:
            # 2. Trapezoid corrector with the slope at the predicted point.
            x_pred = x + d * dt
            x0_next = _clip(denoise_fn(x_pred, sigma_next, timesteps[i + 1]), clip)
            d_next = (x_pred - x0_next) / sigma_next
            x = x + ((d + d_next) / 2) * dt
        _report(callback, i, timesteps[i], sigma, x, x0_hat)
    return x


def _clip(x0_hat, clip):
    return x0_hat if clip is None else x0_hat.clamp(-clip, clip)


def lms_coefficients(sigmas, i: int, order: int) -> list[float]:
    """Linear multistep weights: integrals over [sigma_i, sigma_{i+1}] of the Lagrange
    basis polynomials through sigma_i, sigma_{i-1}, ... (exact, float64)."""
    s = [float(v) for v in sigmas[max(i - order + 1, 0): i + 2]][::-1]  # s[1] = sigma_i, s[0] = sigma_{i+1}
    out = []
    for j in range(order):
        poly = [1.0]  # coefficients, lowest degree first
        for k in range(order):
            if k != j:  # multiply by (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k})
                c = 1.0 / (s[1 + j] - s[1 + k])
                poly = [(a_lo - s[1 + k] * a) * c for a, a_lo in zip(poly + [0.0], [0.0] + poly)]
        out.append(sum(a * (s[0] ** (d + 1) - s[1] ** (d + 1)) / (d + 1) for d, a in enumerate(poly)))
    return out


def lms(denoise_fn, x, sigmas, timesteps, order=4, callback=None):
    """Linear multistep (k-diffusion sample_lms): Adams-Bashforth in sigma over the last
    `order` slopes d = (x - x0_hat) / sigma; the order ramps up 1, 2, 3, 4 from the start."""
    sig = sigmas.tolist()
    ds = []
    for i, t in enumerate(timesteps):
        sigma = sigmas[i]
        x0_hat = denoise_fn(x, sigma, t)
        ds = (ds + [(x - x0_hat) / sigma])[-order:]
        coeffs = lms_coefficients(sig, i, len(ds))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        _report(callback, i, t, sigma, x, x0_hat)
    return x


def _alpha_sigma(sigma):
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def dpmpp_2m(denoise_fn, x, sigmas, timesteps, callback=None):
    """DPM-Solver++(2M), Lu et al. 2022 Alg. 2 with diffusers' midpoint form, lambda =
    log(alpha / sigma_vp). The first step and the last one (to sigma = 0) are first
    order, i.e. DDIM in lambda."""
    x0_prev = None
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        # 1. x0 at the current point, in the VP parameterisation of sigma.
        alpha_s0, sigma_s0 = _alpha_sigma(sigmas[i])
        alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
        x0_hat, _ = denoise_fn(x, t, alpha_s0, sigma_s0)
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        if x0_prev is None or i == n - 1:
            # 2a. First order: x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) x0.
            x = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0_hat
        else:
            # 2b. Second order: D1 = (x0 - x0_prev) / r0 with r0 = h_prev / h.
            alpha_s1, sigma_s1 = _alpha_sigma(sigmas[i - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            r0 = (lambda_s0 - lambda_s1) / h
            d0, d1 = x0_hat, (1.0 / r0) * (x0_hat - x0_prev)
            x = ((sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                 - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
        x0_prev = x0_hat
        _report(callback, i, t, sigmas[i], x, x0_hat)
    return x
