"""The optimizer as composable pure transforms over one flat float32 vector (optax style).

A transform is `Transform(name, init, update)` with `init(params) -> state` and
`update(grads, state, params, step) -> (updates, state)`, where params, grads and
updates are 1-d float32 vectors in a `Layout`'s order and state is a plain dict of
tensors; `apply_updates(params, updates) = params + updates`. `chain(*ts)` runs them
in order, its state a dict keyed by the names of the transforms that keep state. The
ones sd_func trains with (optax's names and arithmetic):

- `clip_by_global_norm(max_norm)`: torch.nn.utils.clip_grad_norm_'s rule, coefficient
  max_norm / (norm + 1e-6) capped at 1 (no-op for max_norm <= 0);
- `adamw(lr_fn, b1, b2, eps, weight_decay, n_decay)`: AdamW (Loshchilov & Hutter 2019)
  with torch.optim.AdamW's arithmetic (bias-corrected moments, eps added to the
  corrected sqrt(nu), decay p * lr * wd decoupled from the gradient) and its own
  update count, decaying only the first `n_decay` elements;
- `dynamic_loss_scale(inner, init_scale, window)`: the fp16 loss scale of
  Micikevicius et al. 2018 (apex/torch.amp's GradScaler rule) as a wrapper, like
  optax.apply_if_finite: a non-finite gradient skips the inner update (zero updates,
  inner state kept, selected with torch.where inside the graph, no host sync) and
  halves the scale; `window` finite steps in a row double it.

`ema(ema, params, decay)` is the exponential moving average (one lerp).

Why one flat vector per tree (`Layout`, `flatten`, `unflatten`): the optimizer is a few
elementwise kernels whatever the parameter count, and the compiled graph does not grow
with it (per-leaf foreach ops made inductor's scheduler take minutes for a UNet's ~700
tensors). The layout puts the weight-decayed leaves first (those whose path does NOT
match the `weight_decay_exclude` regex, big_vision-style rules through sd_func.tree),
so the decay mask is the slice [0, n_decay). State dicts hold two kinds of leaves:
vectors shaped like the flat params (AdamW's mu, nu) and scalars (counts, the loss
scale); `state_to_trees` / `state_to_flat` turn the first kind into per-path trees
and back, which is what the train state and its checkpoints hold.
"""

import re
from collections.abc import Callable
from typing import NamedTuple

import torch

from sd_func import tree
from sd_func.errors import UserError
from sd_func.train import lr as lr_lib
from sd_func.train import sharding


class Transform(NamedTuple):
    """A pure gradient transformation; `name` keys its state inside a chain."""
    name: str
    init: Callable      # (params) -> state dict
    update: Callable    # (grads, state, params, step) -> (updates, state dict)


def apply_updates(params: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    return params + updates


def global_norm(x: torch.Tensor) -> torch.Tensor:
    """sqrt(sum of squares) of a flat vector, as clip_grad_norm_ computes it."""
    return torch.linalg.vector_norm(x)


def ema(ema_params: torch.Tensor, params: torch.Tensor, decay: float) -> torch.Tensor:
    """Exponential moving average: ema + (1 - decay) * (params - ema)."""
    return torch.lerp(ema_params, params, 1.0 - decay)


def chain(*transforms: Transform) -> Transform:
    """Apply transforms in order; state = {name: state} of those that keep state."""
    names = [t.name for t in transforms]
    if len(set(names)) != len(names):
        raise ValueError(f"optim.chain: transform names must be unique, got {names}")

    def init(params):
        states = {t.name: t.init(params) for t in transforms}
        return {k: s for k, s in states.items() if s}

    def update(grads, state, params, step):
        new = {}
        for t in transforms:
            grads, s = t.update(grads, state.get(t.name, {}), params, step)
            if s:
                new[t.name] = s
        return grads, new

    return Transform("chain", init, update)


def clip_by_global_norm(max_norm: float, norm_fn: Callable = global_norm) -> Transform:
    """Scale the gradient so its global norm is at most max_norm (no-op when max_norm <= 0).

    norm_fn: the norm of the gradient (a sharded one: train.sharding.norm over all slices)."""
    max_norm = float(max_norm)

    def update(grads, state, params, step):
        if max_norm <= 0:
            return grads, state
        return grads * torch.clamp(max_norm / (norm_fn(grads) + 1e-6), max=1.0), state

    return Transform("clip", lambda params: {}, update)


def adamw(lr_fn: Callable, *, b1: float, b2: float, eps: float, weight_decay: float,
          n_decay: int) -> Transform:
    """AdamW as torch.optim.AdamW computes it; decay on params[:n_decay] only.

    lr_fn(step) -> 0-d lr tensor (sd_func.train.lr); step is the train state's step, so
    the schedule counts skipped fp16 steps, while the bias correction uses this
    transform's own count of applied updates (as torch's per-parameter "step").
    """
    b1, b2, eps, weight_decay, n_decay = float(b1), float(b2), float(eps), float(weight_decay), int(n_decay)

    def init(params):
        return {"count": torch.zeros((), dtype=torch.int64, device=params.device),
                "mu": torch.zeros_like(params), "nu": torch.zeros_like(params)}

    def update(grads, state, params, step):
        count = state["count"] + 1
        lr = lr_fn(step)
        mu = torch.lerp(state["mu"], grads, 1.0 - b1)
        nu = torch.addcmul(state["nu"] * b2, grads, grads, value=1.0 - b2)
        c = count.to(torch.float32)
        step_size = lr / (1.0 - b1**c)
        denom = torch.sqrt(nu) / torch.sqrt(1.0 - b2**c) + eps
        updates = (-step_size) * (mu / denom)  # negate the 0-d factor: no extra pass over the vector
        if weight_decay and n_decay:  # decoupled: -lr * wd * p, on the decayed slice only
            updates = torch.cat([updates[:n_decay] - (lr * weight_decay) * params[:n_decay], updates[n_decay:]])
        return updates, {"count": count, "mu": mu, "nu": nu}

    return Transform("adamw", init, update)


LOSS_SCALE = "loss_scale"


def dynamic_loss_scale(inner: Transform, *, init_scale: float, window: int,
                       norm_fn: Callable = global_norm) -> Transform:
    """Skip non-finite steps of `inner` and adapt the fp16 loss scale (see the module docstring).

    The caller multiplies the loss by `loss_scale(state)` and divides the gradient by it
    before `update`. State: inner's dict plus {"loss_scale": {"scale": f32, "good_steps":
    i64, "skipped": i64}}. A skipped step returns zero updates and keeps inner's state.
    norm_fn: as clip_by_global_norm's (every slice of a sharded gradient must agree on a skip).
    """
    init_scale, window = float(init_scale), int(window)

    def init(params):
        state = inner.init(params)
        if LOSS_SCALE in state:
            raise ValueError(f"optim.dynamic_loss_scale: the inner state already has {LOSS_SCALE!r}")
        zero = torch.zeros((), dtype=torch.int64, device=params.device)
        return dict(state, **{LOSS_SCALE: {
            "scale": torch.tensor(init_scale, dtype=torch.float32, device=params.device),
            "good_steps": zero, "skipped": zero.clone()}})

    def update(grads, state, params, step):
        ls = state[LOSS_SCALE]
        inner_state = {k: v for k, v in state.items() if k != LOSS_SCALE}
        finite = torch.isfinite(norm_fn(grads))
        updates, new_inner = inner.update(grads, inner_state, params, step)
        updates = torch.where(finite, updates, 0.0)
        new_inner = tree.tree_map(lambda n, o: torch.where(finite, n, o), new_inner, inner_state)
        good = torch.where(finite, ls["good_steps"] + 1, torch.zeros_like(ls["good_steps"]))
        grow = good >= window
        scale = torch.where(finite, torch.where(grow, ls["scale"] * 2.0, ls["scale"]), ls["scale"] * 0.5)
        new_ls = {"scale": scale, "good_steps": torch.where(grow, torch.zeros_like(good), good),
                  "skipped": ls["skipped"] + (~finite).to(ls["skipped"].dtype)}
        return updates, dict(new_inner, **{LOSS_SCALE: new_ls})

    return Transform(inner.name, init, update)


def loss_scale(state: dict) -> torch.Tensor | None:
    """The current fp16 loss scale of an optimizer state, or None without one."""
    return state[LOSS_SCALE]["scale"] if LOSS_SCALE in state else None


def skipped_steps(state: dict) -> torch.Tensor | None:
    """How many steps the loss scale skipped (int64 0-d), or None without a loss scale."""
    return state[LOSS_SCALE]["skipped"] if LOSS_SCALE in state else None


def from_config(tcfg, lay: "Layout", section: str = "config.train",
                shard: sharding.Shard | None = None) -> Transform:
    """The optimizer of a train config section (cfg.train or cfg.vae_train) for `lay`.

    chain(clip_by_global_norm(grad_clip), adamw(schedule, adam_b1, adam_b2, adam_eps,
    weight_decay)), wrapped in dynamic_loss_scale(loss_scale_init, loss_scale_window)
    when precision is "fp16". shard: the optimizer of this rank's slice only (ZeRO-1,
    train.sharding): its norms are over all slices, its decay covers the slice's part.
    """
    n_decay = lay.n_decay if shard is None else sharding.n_decay(shard, lay.numel, lay.n_decay)
    norm_fn = global_norm if shard is None else (lambda g: sharding.norm(g, shard))
    tx = chain(clip_by_global_norm(tcfg.grad_clip, norm_fn),
               adamw(lr_lib.schedule_fn(tcfg, section), b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps,
                     weight_decay=tcfg.weight_decay, n_decay=n_decay))
    if tcfg.precision == "fp16":
        tx = dynamic_loss_scale(tx, init_scale=tcfg.loss_scale_init, window=tcfg.loss_scale_window,
                                norm_fn=norm_fn)
    return tx


# ----------------------------------------------------------------------------- flat layout


class Layout(NamedTuple):
    """Where each leaf of a params tree lives in the flat vector (decayed leaves first)."""
    tree_paths: tuple    # the tree's own leaf order (for rebuilding it)
    paths: tuple         # flat order: decayed leaves, then the others
    shapes: tuple
    sizes: tuple
    n_decay: int         # elements [0, n_decay) get weight decay
    numel: int


def decay_mask(params: dict, exclude: str | None) -> dict:
    """A tree of Python bools: True where weight decay applies (path not matching `exclude`)."""
    rules = [(exclude, False)] if exclude else []
    return tree.map_with_path(lambda p, _: bool(tree.match(rules, p, True)), params)


def layout(params: dict, exclude: str | None) -> Layout:
    """The flat layout of a params tree; `exclude`: regex of the paths without weight decay."""
    if exclude:
        try:
            re.compile(exclude)
        except re.error as e:
            raise UserError(f"weight_decay_exclude={exclude!r}: not a regular expression ({e})") from None
    flags = tree.flatten(decay_mask(params, exclude))
    flat = tree.flatten(params)
    if not flat:
        raise ValueError("optim.layout: the params tree has no tensors")
    paths = tuple([k for k in flat if flags[k]] + [k for k in flat if not flags[k]])
    sizes = tuple(flat[k].numel() for k in paths)
    n_decay = sum(n for k, n in zip(paths, sizes) if flags[k])
    return Layout(tuple(flat), paths, tuple(tuple(flat[k].shape) for k in paths), sizes, n_decay, sum(sizes))


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


def _per_param(x, lay: Layout) -> bool:
    return torch.is_tensor(x) and x.dim() == 1 and x.shape[0] == lay.numel


def state_to_trees(state, lay: Layout):
    """An optimizer state with every params-shaped vector turned into a per-path tree (views)."""
    if isinstance(state, dict):
        return {k: state_to_trees(v, lay) for k, v in state.items()}
    return unflatten(state, lay) if _per_param(state, lay) else state


def state_to_flat(state, template, lay: Layout):
    """Inverse of state_to_trees; `template` (tx.init of a meta vector) says which leaves are trees."""
    if isinstance(template, dict):
        if not isinstance(state, dict) or set(state) != set(template):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"optimizer state has keys {got}, the optimizer expects {sorted(template)}")
        return {k: state_to_flat(state[k], v, lay) for k, v in template.items()}
    return flatten(state, lay) if _per_param(template, lay) else state


def template(tx: Transform, lay: Layout, numel: int | None = None):
    """tx's state structure on the meta device (no memory): which leaves are per-parameter.

    numel: the length of the vector tx updates when it is not lay.numel (a ZeRO-1 slice,
    whose state vectors then stay flat: they are not per-parameter trees)."""
    return tx.init(torch.empty(lay.numel if numel is None else numel, dtype=torch.float32, device="meta"))
