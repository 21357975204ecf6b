"""The k-diffusion samplers (Karras et al. 2022, "Elucidating the Design Space", and
crowsonkb/k-diffusion sampling.py): Euler, Euler ancestral, Heun (Alg. 1), LMS, and
DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2, in k-diffusion's sigma form).

Each is a small pure function (denoise_fn, x, sigmas, ...): x = x0 + sigma eps is the
state, `sigmas` [n+1] the grid it moves along (ending in 0), and denoise_fn(x, sigma) ->
x0_hat the one denoiser of denoiser.make_denoise_fn. After step i the state, at
sigmas[i+1], goes through step_transform(i, x, sigma_next) -> x when one is given (the
inpaint blend), then callback(info) observes it; `end_step` does both, for every sampler.
Step i only ever evaluates the model at grid sigmas, so the denoiser hands the model
diffusers' own timesteps, and each sampler agrees with its diffusers scheduler
(EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete, LMSDiscrete, DPMSolverMultistep) to
float32 rounding.
"""

import torch


def end_step(i, sigma, sigma_next, x, x0_hat, step_transform=None, callback=None):
    """The state after step i: step_transform's output if given; the callback only observes."""
    if step_transform is not None:
        x = step_transform(i, x, sigma_next)
    if callback is not None:
        callback(dict(i=i, sigma=sigma, x=x, x0_hat=x0_hat))
    return x


def euler(denoise_fn, x, sigmas, callback=None, step_transform=None):
    """Euler steps on the probability-flow ODE dx/dsigma = (x - x0_hat) / sigma."""
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        x0_hat = denoise_fn(x, sigma)
        d = (x - x0_hat) / sigma
        x = x + d * (sigmas[i + 1] - sigma)
        x = end_step(i, sigma, sigmas[i + 1], x, x0_hat, step_transform, callback)
    return x


def euler_ancestral(denoise_fn, x, sigmas, noise_fn, callback=None, step_transform=None):
    """Euler a: an ODE step down to sigma_down, then fresh noise of std sigma_up, with
    sigma_up^2 = sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2 and
    sigma_down^2 = sigma_to^2 - sigma_up^2 (k-diffusion get_ancestral_step, eta = 1)."""
    for i in range(len(sigmas) - 1):
        sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
        x0_hat = denoise_fn(x, sigma_from)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        d = (x - x0_hat) / sigma_from
        x = x + d * (sigma_down - sigma_from)
        if sigma_to > 0:
            x = x + noise_fn(i, x.shape) * sigma_up
        x = end_step(i, sigma_from, sigma_to, x, x0_hat, step_transform, callback)
    return x


def heun(denoise_fn, x, sigmas, clip=None, callback=None, step_transform=None):
    """Karras et al. 2022 Alg. 1 (deterministic, S_churn = 0): Euler predictor, trapezoidal
    corrector at sigma_next; the last step, to sigma = 0, is plain Euler. clip: clamp x0_hat
    to [-clip, clip] (diffusers' clip_sample)."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # 1. Euler predictor.
        x0_hat = clip_x0(denoise_fn(x, sigma), clip)
        d = (x - x0_hat) / sigma
        dt = sigma_next - sigma
        if i == n - 1:
            x = x + d * dt
        else:
            # 2. Trapezoid corrector with the slope at the predicted point.
            x_pred = x + d * dt
            x0_next = clip_x0(denoise_fn(x_pred, sigma_next), clip)
            d_next = (x_pred - x0_next) / sigma_next
            x = x + ((d + d_next) / 2) * dt
        x = end_step(i, sigma, sigma_next, x, x0_hat, step_transform, callback)
    return x


def clip_x0(x0_hat, clip):
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


def lms(denoise_fn, x, sigmas, order=4, callback=None, step_transform=None):
    """Linear multistep (k-diffusion sample_lms): Adams-Bashforth in sigma over the last
    `order` slopes d = (x - x0_hat) / sigma; the order ramps up 1, 2, 3, 4 from the start."""
    sig = sigmas.tolist()
    ds = []
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        x0_hat = denoise_fn(x, sigma)
        ds = (ds + [(x - x0_hat) / sigma])[-order:]
        coeffs = lms_coefficients(sig, i, len(ds))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        x = end_step(i, sigma, sigmas[i + 1], x, x0_hat, step_transform, callback)
    return x


def dpmpp_2m(denoise_fn, x, sigmas, callback=None, step_transform=None):
    """DPM-Solver++(2M) in sigma space (k-diffusion sample_dpmpp_2m), lambda = -log sigma:
    x <- (sigma_next / sigma) x - expm1(-h) D with h = lambda_next - lambda and D = x0_hat
    (first order: DDIM) or, from the second step on, D = x0_hat + (x0_hat - x0_prev) / (2 r)
    with r = h_prev / h (diffusers' midpoint form). The step to sigma = 0 is first order,
    where it lands on x0_hat (the h -> inf limit), as diffusers' lower_order_final does."""
    x0_prev = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_hat = denoise_fn(x, sigma)
        if sigma_next == 0:
            x = x0_hat
        else:
            h = torch.log(sigma) - torch.log(sigma_next)
            d = x0_hat
            if x0_prev is not None:
                r = (torch.log(sigmas[i - 1]) - torch.log(sigma)) / h
                d = x0_hat + (x0_hat - x0_prev) / (2 * r)
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        x0_prev = x0_hat
        x = end_step(i, sigma, sigma_next, x, x0_hat, step_transform, callback)
    return x
