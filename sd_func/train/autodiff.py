"""`grad_and_value` for the training steps: torch.func's, or the same through autograd in eager.

Both give `(grads, (value, aux))` for `fn(params) -> (value, aux)` over a dict of tensors,
without touching the caller's tensors (the step stays a pure function). Under
torch.compile it is torch.func.grad_and_value, which Dynamo traces into one graph. In
eager mode it differentiates detached leaf copies with torch.autograd.grad instead:
the same derivatives, but run by ATen's fused backward kernels (torch.func replaces
some, GroupNorm's for one, by decompositions into elementwise ops) and without
functorch's per-op wrapping; the configs/shapes.py step is ~12% faster on a CPU.
"""

import torch

from sd_func import tree


def grad_and_value(fn, params: dict):
    """(d value / d params, (value, aux)) of `fn(params) -> (value, aux)`; value is 0-d."""
    if torch.compiler.is_compiling():
        return torch.func.grad_and_value(fn, has_aux=True)(params)
    flat = tree.flatten(params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in flat.items()}
    with torch.enable_grad():
        value, aux = fn(tree.unflatten(leaves))
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    return tree.unflatten(grads), (value.detach(), _detach(aux))


def _detach(aux):
    if isinstance(aux, torch.Tensor):
        return aux.detach()
    if isinstance(aux, (tuple, list)):
        return type(aux)(_detach(a) for a in aux)
    if isinstance(aux, dict):
        return {k: _detach(v) for k, v in aux.items()}
    return aux
