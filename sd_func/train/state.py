"""The train state: one plain dict pytree (big_vision / VDM style).

    {"params": {"unet": ..., ["text_encoder": ...]},   # trained, float32 master weights
     "opt": {"mu": ..., "nu": ...},                    # AdamW moments, same paths
     "ema": {"unet": ..., ["text_encoder": ...]},      # EMA of params
     "step": int64 0-d tensor,                          # updates taken (skipped fp16 ones included)
     ["loss_scale": {"scale": f32, "good_steps": i64, "skipped": i64}]}  # fp16 only

Every leaf is a tensor, so the whole state goes through torch.compile, safetensors
(`tree.flatten`) and `tree.to` as it is. The frozen VAE and text encoder are not
in the state: they are passed to the step separately. After a train step the leaves
of params, mu, nu and ema are views into one float32 vector per tree (see
sd_func/train/optim.py, Layout); copy them (`.clone()`) to keep one alone.
"""

import torch

from sd_func import tree
from sd_func.train import optim


def init_state(cfg, params_unet: dict, params_te: dict | None = None) -> dict:
    """A fresh train state on the params' device; params_te only when the text encoder trains."""
    train_te = bool(cfg.train.get("train_text_encoder", False))
    if train_te and params_te is None:
        raise ValueError("init_state: cfg.train.train_text_encoder=True needs params_te")
    if params_te is not None and not train_te:
        raise ValueError("init_state: params_te given but cfg.train.train_text_encoder=False; "
                         "pass a frozen text encoder in `frozen` instead")
    params = {"unet": params_unet}
    if params_te is not None:
        params["text_encoder"] = params_te
    params = tree.tree_map(lambda x: x.detach().to(torch.float32), params)
    leaves = tree.leaves(params)
    if not leaves:
        raise ValueError("init_state: params_unet has no tensors")
    device = leaves[0].device
    state = {
        "params": params,
        "opt": optim.init(params),
        "ema": tree.tree_map(lambda x: x.clone(), params),
        "step": torch.zeros((), dtype=torch.int64, device=device),
    }
    if cfg.train.precision == "fp16":
        state["loss_scale"] = {
            "scale": torch.tensor(float(cfg.train.loss_scale_init), dtype=torch.float32, device=device),
            "good_steps": torch.zeros((), dtype=torch.int64, device=device),
            "skipped": torch.zeros((), dtype=torch.int64, device=device),
        }
    return state
