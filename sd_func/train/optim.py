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

Two forms of the same arithmetic: over lists of leaves (`adamw`, foreach ops), and over
one flat float32 vector per tree (`Layout`, `flatten`, `unflatten`, `adamw_flat`), which
the train step uses: a few fused kernels for any number of parameters, and a compiled
graph whose size does not grow with the parameter count (per-leaf foreach ops made
inductor's scheduler take minutes for a UNet's ~700 tensors). The flat layout puts the
weight-decayed leaves first, so decay is one slice.
"""

from typing import NamedTuple

import torch

from sd_func import tree


def init(params: dict) -> dict:
    """Zero first and second moments, float32, on the params' devices."""
    zeros = lambda p: torch.zeros_like(p, dtype=torch.float32)
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


class Layout(NamedTuple):
    """Where each leaf of a params tree lives in the flat vector (decayed leaves first)."""
    tree_paths: tuple    # the tree's own leaf order (for rebuilding it)
    paths: tuple         # flat order: decayed leaves, then the others
    shapes: tuple
    sizes: tuple
    offsets: dict        # path -> offset in the flat vector
    n_decay: int         # elements [0, n_decay) get weight decay
    numel: int


def layout(params: dict, exclude: str | None) -> Layout:
    flags = tree.flatten(decay_mask(params, exclude))
    flat = tree.flatten(params)
    paths = tuple([k for k in flat if flags[k]] + [k for k in flat if not flags[k]])
    sizes = tuple(flat[k].numel() for k in paths)
    offsets, o = {}, 0
    for k, n in zip(paths, sizes):
        offsets[k] = o
        o += n
    n_decay = sum(n for k, n in zip(paths, sizes) if flags[k])
    return Layout(tuple(flat), paths, tuple(tuple(flat[k].shape) for k in paths), sizes, offsets, n_decay, o)


def flatten(params: dict, lay: Layout) -> torch.Tensor:
    """The flat float32 vector of a tree: free when the leaves already are consecutive
    views of one buffer in lay's order (as `unflatten` makes them), else one copy."""
    with torch.no_grad():  # views without autograd metadata: 5x faster on the host
        return _flatten(tree.flatten(params), lay)


def _flatten(flat: dict, lay: Layout) -> torch.Tensor:
    leaves = [flat[k] for k in lay.paths]
    first = leaves[0]
    storage, off = first.untyped_storage(), first.storage_offset()
    ok = first.dtype == torch.float32
    expect = off
    for x, n in zip(leaves, lay.sizes):
        if not ok:
            break
        ok = (x.dtype == torch.float32 and x.is_contiguous() and x.storage_offset() == expect
              and x.untyped_storage().data_ptr() == storage.data_ptr())
        expect += n
    if ok and expect * 4 <= storage.nbytes():
        return first.new_empty(0).set_(storage, off, (lay.numel,), (1,))
    return torch.cat([x.detach().reshape(-1).to(torch.float32) for x in leaves])


def unflatten(flat: torch.Tensor, lay: Layout) -> dict:
    """A params tree (the original key order) of views into the flat vector."""
    with torch.no_grad():
        views = dict(zip(lay.paths, (v.view(s) for v, s in zip(torch.split(flat, lay.sizes), lay.shapes))))
    return tree.unflatten({k: views[k] for k in lay.tree_paths})


def adamw_flat(p, g, mu, nu, count, lr, *, b1: float, b2: float, eps: float, weight_decay: float,
               n_decay: int):
    """AdamW on flat vectors (torch.optim.AdamW's arithmetic); decay on p[:n_decay]."""
    mu = torch.lerp(mu, g, 1.0 - b1)
    nu = torch.addcmul(nu * b2, g, g, value=1.0 - b2)
    count = count.to(torch.float32)
    step_size = lr / (1.0 - b1**count)
    denom = torch.sqrt(nu) / torch.sqrt(1.0 - b2**count) + eps
    if weight_decay and n_decay:
        p = torch.cat([p[:n_decay] * (1.0 - lr * weight_decay), p[n_decay:]])
    return p - step_size * (mu / denom), mu, nu
