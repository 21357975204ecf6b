"""Learning-rate schedules as pure functions of the step tensor.

`schedule(tcfg, step)` gives the learning rate for the update that turns state
step `step` (0-based count of updates done) into `step + 1`. It is made of torch
ops on a 0-d tensor, so it runs inside the compiled train step without a
recompile per step. Warmup follows NeMo's WarmupPolicy: lr * (s+1)/(warmup+1),
reaching the peak at s = warmup. After warmup:

- "constant": hold the peak (NeMo's WarmupHoldPolicy with no decay; SD 1.5 recipe),
- "cosine":   half-cosine from the peak to `lr_min` at `steps` (Loshchilov & Hutter 2017),
- "linear":   straight line from the peak to `lr_min` at `steps`.

`tcfg` is `cfg.train` (or `cfg.vae_train`): lr, lr_schedule, warmup, steps and optional
lr_min (default 0).
"""

import math

import torch

from sd_func.errors import UserError

SCHEDULES = ("constant", "cosine", "linear")


def schedule(tcfg, step) -> torch.Tensor:
    """The learning rate (0-d float32 tensor) used for the update at `step`."""
    return schedule_fn(tcfg)(step)


def schedule_fn(tcfg, section: str = "config.train"):
    """`step -> lr` with the config read now (plain Python values; safe to trace).

    section: the config key of tcfg, for the error message (cfg.vae_train has the same fields).
    """
    kind = tcfg.lr_schedule
    if kind not in SCHEDULES:
        raise UserError(f"{section}.lr_schedule={kind!r}: expected one of {SCHEDULES}")
    peak, warmup, total = float(tcfg.lr), int(tcfg.warmup), int(tcfg.steps)
    lr_min = float(tcfg.get("lr_min", 0.0) or 0.0)
    return lambda step: _lr(kind, peak, warmup, total, lr_min, step)


def _lr(kind: str, peak: float, warmup: int, total: int, lr_min: float, step) -> torch.Tensor:
    s = torch.as_tensor(step).to(torch.float32)
    warm = torch.clamp((s + 1.0) / (warmup + 1.0), max=1.0) if warmup > 0 else torch.ones_like(s)
    if kind == "constant":
        return peak * warm
    progress = torch.clamp((s - warmup) / max(total - warmup, 1), 0.0, 1.0)
    if kind == "cosine":
        decayed = lr_min + 0.5 * (peak - lr_min) * (1.0 + torch.cos(math.pi * progress))
    else:
        decayed = peak + (lr_min - peak) * progress
    return torch.where(s < warmup, peak * warm, decayed)
