"""Sampler loop overhead per step, with a trivial model, vs diffusers' scheduler loop.

  python bench/sampler_overhead.py [--steps 50] [--batch 1] [--size 64] [--device cpu|cuda]

The model is `x * 0.5` (one elementwise op), so the time is the sampler's own
arithmetic on [batch, 4, size, size] latents plus its Python and scalar overhead;
the model-only loop time is measured and subtracted. Target: < 1 ms/step. The
diffusers column runs set_timesteps + scale_model_input + step with the same config.
Not a test; prints a table.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sd_func import random
from sd_func.diffusion import samplers, schedules

DIFFUSERS = {
    "ddim": ("DDIMScheduler", {}), "plms": ("PNDMScheduler", dict(skip_prk_steps=True)),
    "euler": ("EulerDiscreteScheduler", {}), "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    "ddpm": ("DDPMScheduler", {}),
}


def model(x, t):
    return x * 0.5


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def ours(name, dcfg, steps, x, noise_fn):
    return samplers.sample(name, model, x * samplers.init_noise_sigma(name, dcfg, steps), dcfg, steps,
                           noise_fn=noise_fn if name in ("ddpm", "euler_ancestral") else None)


def theirs(name, dcfg, steps, x):
    import diffusers
    cls, extra = DIFFUSERS[name]
    sch = getattr(diffusers, cls).from_config({**dcfg.to_dict(), **extra})
    sch.set_timesteps(steps, device=x.device)
    x = x * sch.init_noise_sigma
    for t in sch.timesteps:
        x = sch.step(model(sch.scale_model_input(x, t), t), t, x).prev_sample
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-diffusers", action="store_true")
    a = ap.parse_args()
    device = torch.device(a.device)
    dcfg = schedules.config()
    x = torch.randn(a.batch, 4, a.size, a.size, device=device)
    keys = [random.key(i) for i in range(a.batch)]
    noise_fn = samplers.noise_fn_from_keys(keys, device=device)
    evals = {"heun": 2 * a.steps - 1, "plms": a.steps + 1}

    def model_only(n):
        y = x
        for _ in range(n):
            y = model(y, None)
        return y

    print(f"device={device} latents={tuple(x.shape)} steps={a.steps} threads={torch.get_num_threads()}")
    print(f"{'sampler':16s} {'ours ms/step':>13s} {'diffusers ms/step':>18s}")
    for name in samplers.NAMES:
        n_eval = evals.get(name, a.steps)
        base = timed(lambda n=n_eval: model_only(n), device)
        t_ours = (timed(lambda s=name: ours(s, dcfg, a.steps, x, noise_fn), device) - base) / a.steps * 1e3
        t_ref = float("nan")
        if not a.no_diffusers:
            import diffusers.schedulers.scheduling_ddpm  # noqa: F401  (import outside the timing)
            t_ref = (timed(lambda s=name: theirs(s, dcfg, a.steps, x), device) - base) / a.steps * 1e3
        print(f"{name:16s} {t_ours:13.3f} {t_ref:18.3f}")


if __name__ == "__main__":
    main()
