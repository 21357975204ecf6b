"""The train state: one plain dict pytree (big_vision / VDM style), and its checkpoint trees.

    {"params": {"unet": ..., ["text_encoder": ...]},   # trained, float32 master weights
     "opt": {"adamw": {"count": i64,                   # AdamW's applied updates
                       "mu": tree, "nu": tree},        # its moments, the params' paths
             ["loss_scale": {"scale": f32, "good_steps": i64, "skipped": i64}]},  # fp16 only
     ["ema": {"unet": ..., ...}],                      # EMA of params (the UNet stage)
     "step": int64 0-d tensor}                         # steps taken (skipped fp16 ones included)

"opt" is the state of the optimizer transform (train.optim.from_config: a chain of
clip (no state) and adamw, inside dynamic_loss_scale for fp16) with its params-shaped
vectors as per-path trees. Every leaf is a tensor, so the whole state goes through
torch.compile, safetensors (`tree.flatten`: "adamw/mu/unet/conv_in/weight") and
`tree.to` as it is. The frozen networks are not in the state: the step takes them
separately. After a step the leaves of params, mu, nu and ema are views into one
float32 vector per tree (optim.Layout); `.clone()` one to keep it alone.

A checkpoint holds the state as trees `params`, `opt`, [`ema`] and `state` (the
scalars: step); `checkpoint_trees` and `restore` are the two directions.

ZeRO-1 (train.sharding, `shard` given): "params" stay the full trees, but AdamW's mu and
nu and the EMA are this rank's flat slice only. `gather` (a collective: every rank calls
it) rebuilds the unsharded state, which is what checkpoints hold, so a sharded run saves
one loadable model and resumes on any world size; `scatter` takes a rank's slices back out.
"""

import torch

from sd_func import tree
from sd_func.checkpoint import training as checkpoints
from sd_func.train import optim, sharding

SCALARS = "state"   # the checkpoint tree of the state's top-level tensors (the step)
FORMAT_1 = "sd_func.train/1"  # before the optimizer became a chain of transforms


def init_state(params: dict, tx: optim.Transform, lay: optim.Layout, *, ema: bool,
               shard: sharding.Shard | None = None) -> dict:
    """A fresh train state for `params` (float32 copies, laid out as `lay`), with an EMA if asked.

    shard: ZeRO-1; tx is then the optimizer of this rank's slice (optim.from_config(..., shard)).
    """
    flat = optim.flatten(tree.tree_map(lambda x: x.detach().to(torch.float32), params), lay)
    first = tree.flatten(params)[lay.paths[0]]
    if flat.untyped_storage().data_ptr() == first.untyped_storage().data_ptr():
        flat = flat.clone()  # already laid out (e.g. another state's params): own the memory
    mine = flat if shard is None else sharding.local(flat, shard).clone()
    state = {"params": optim.unflatten(flat, lay), "opt": optim.state_to_trees(tx.init(mine), lay),
             "step": torch.zeros((), dtype=torch.int64, device=flat.device)}
    if ema:
        state["ema"] = optim.unflatten(flat.clone(), lay) if shard is None else mine.clone()
    return state


def _is_slice(x, n: int) -> bool:
    return torch.is_tensor(x) and x.dim() == 1 and x.shape[0] == n


def gather(state: dict, lay: optim.Layout, shard: sharding.Shard | None) -> dict:
    """The unsharded state (per-path trees) of a ZeRO-1 state; `state` itself when shard is None.

    A collective: every rank must call it (one all-gather per sliced vector)."""
    if shard is None:
        return state
    n = sharding.size(shard, lay.numel)

    def full(x):
        if isinstance(x, dict):
            return {k: full(v) for k, v in x.items()}
        return optim.unflatten(sharding.gather(x, shard, lay.numel).clone(), lay) if _is_slice(x, n) else x

    return {k: v if k == "params" else full(v) for k, v in state.items()}


def scatter(full: dict, like: dict, lay: optim.Layout, shard: sharding.Shard | None) -> dict:
    """This rank's ZeRO-1 state from an unsharded one; `like`: a sharded state (the structure)."""
    if shard is None:
        return full
    n = sharding.size(shard, lay.numel)

    def mine(f, ref):
        if isinstance(ref, dict):
            return {k: mine(f[k], v) for k, v in ref.items()}
        return sharding.local(optim.flatten(f, lay), shard).clone() if _is_slice(ref, n) else f

    return {k: full[k] if k == "params" else mine(full[k], v) for k, v in like.items()}


def checkpoint_trees(state: dict) -> dict:
    """{tree name: nested dict of tensors} to save: the state's dicts, and its scalars as `state`."""
    trees = {k: v for k, v in state.items() if isinstance(v, dict)}
    trees[SCALARS] = {k: v for k, v in state.items() if not isinstance(v, dict)}
    return trees


def restore(ckpt: str, like: dict) -> dict:
    """The state stored in checkpoint folder `ckpt`, in the structure, dtypes and devices of `like`.

    `like` is a fresh init_state of the same params and optimizer. The fp16 loss scale may
    come and go between starts (precision changed): a checkpoint without one gets `like`'s
    fresh scale, and a stored one is dropped when precision is no longer fp16. Checkpoints
    of format sd_func.train/1 (opt = {"mu", "nu"}, the scale in its own tree, the VAE
    stage's step in checkpoint.json) are read too.
    """
    meta = checkpoints.read_meta(ckpt)
    files = set(meta["files"])
    scalars = {k: v for k, v in like.items() if not isinstance(v, dict)}
    if SCALARS in files:
        restored = checkpoints.restore_like(ckpt, SCALARS, scalars)
    else:  # format 1 of the VAE stage: only the step, in checkpoint.json
        restored = {"step": torch.tensor(int(meta["step"]), dtype=torch.int64, device=like["step"].device)}
    out = {}
    for k, v in like.items():  # like's key order: the structure the step was traced with
        if not isinstance(v, dict):
            out[k] = restored[k]
        elif k == "opt" and meta.get("format") == FORMAT_1:
            out[k] = _opt_from_format_1(ckpt, v, files, restored["step"])
        else:
            out[k] = checkpoints.restore_like(ckpt, k, v, optional=optim.LOSS_SCALE + "/")
    return out


def _opt_from_format_1(ckpt: str, like: dict, files: set, step: torch.Tensor) -> dict:
    """Format 1's {"mu", "nu"} (+ a "loss_scale" tree) as today's chain state."""
    adam = like["adamw"]
    moments = checkpoints.restore_like(ckpt, "opt", {"mu": adam["mu"], "nu": adam["nu"]})
    out = dict(like)
    if optim.LOSS_SCALE in files:
        stored = checkpoints.load_tree(ckpt, optim.LOSS_SCALE)
        if optim.LOSS_SCALE in like:
            out[optim.LOSS_SCALE] = checkpoints.restore_like(ckpt, optim.LOSS_SCALE, like[optim.LOSS_SCALE])
        skipped = stored["skipped"]
    else:
        skipped = torch.zeros((), dtype=torch.int64)
    # Format 1 derived AdamW's count as step - skipped: the same number, now stored.
    count = (step.cpu() - skipped.to(torch.int64)).to(adam["count"].device)
    out["adamw"] = {"count": count, "mu": moments["mu"], "nu": moments["nu"]}
    return out
