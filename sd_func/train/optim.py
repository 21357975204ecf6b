"""Functional AdamW (Loshchilov & Hutter 2019) over parameter pytrees.

The optimizer state is a plain dict {"mu": tree, "nu": tree} (first and second
moments, float32, same paths as the params). `adamw` reproduces
torch.optim.AdamW's arithmetic (decoupled decay p *= 1 - lr*wd, bias-corrected
moments, eps added to the corrected sqrt(nu)) with torch._foreach_* ops, so the
eager step launches a few multi-tensor kernels instead of ~10 per tensor and the
compiled step fuses it all. Weight decay applies to the leaves whose path does
NOT fully match `weight_decay_exclude` (a regex over "unet/down_blocks/0/..."
paths; big_vision-style rules through sd_func.tree). Global-norm clipping as
torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), capped at 1).
"""

import torch

from sd_func import tree


def init(params: dict) -> dict:
    """Zero first and second moments, float32, on the params' devices."""
    zeros = lambda p: torch.zeros_like(p, dtype=torch.float32)  # noqa: E731
    return {"mu": tree.tree_map(zeros, params), "nu": tree.tree_map(zeros, params)}


def decay_mask(params: dict, exclude: str | None) -> dict:
    """A tree of Python bools: True where weight decay applies (path not matching `exclude`)."""
    rules = [(exclude, False)] if exclude else []
    return tree.map_with_path(lambda p, _: bool(tree.match(rules, p, True)), params)


def global_norm(leaves: list) -> torch.Tensor:
    """sqrt(sum of squares) of a list of tensors, float32, via one foreach norm."""
    if not leaves:
        return torch.zeros(())
    norms = torch._foreach_norm([x.float() for x in leaves])
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_by_global_norm(grads: list, norm: torch.Tensor, max_norm: float) -> list:
    """Scale grads so their global norm is at most max_norm (no-op when max_norm <= 0)."""
    if not max_norm or max_norm <= 0:
        return grads
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return torch._foreach_mul(grads, coef)


def adamw(params: list, grads: list, mu: list, nu: list, decay: list, count, lr, *,
          b1: float, b2: float, eps: float, weight_decay: float):
    """One AdamW update over aligned leaf lists; returns (params, mu, nu) as new lists.

    count: the 1-based update count (0-d tensor) for bias correction; lr: 0-d tensor;
    decay: one bool per leaf (weight decay on/off).
    """
    mu = torch._foreach_lerp(mu, grads, 1.0 - b1)
    nu = torch._foreach_addcmul(torch._foreach_mul(nu, b2), grads, grads, value=1.0 - b2)
    count = count.to(torch.float32)
    step_size = lr / (1.0 - b1**count)
    bc2_sqrt = torch.sqrt(1.0 - b2**count)
    denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(nu), bc2_sqrt), eps)
    direction = torch._foreach_mul(torch._foreach_div(mu, denom), step_size)
    if weight_decay:
        idx = [i for i, d in enumerate(decay) if d]
        if idx:
            shrunk = torch._foreach_mul([params[i] for i in idx], 1.0 - lr * weight_decay)
            params = list(params)
            for i, p in zip(idx, shrunk):
                params[i] = p
    return torch._foreach_sub(params, direction), mu, nu


def ema(ema_leaves: list, params: list, decay: float) -> list:
    """Exponential moving average: ema + (1 - decay) * (params - ema)."""
    return torch._foreach_lerp(ema_leaves, params, 1.0 - decay)
