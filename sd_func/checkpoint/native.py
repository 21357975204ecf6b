"""sd_func's native checkpoint: one safetensors file, the whole config in its metadata.

Tensor names are the "/"-joined parameter paths ("unet/down_blocks/0/resnets/0/conv1/weight"),
so the file is the params tree itself; the metadata holds `sd_func_config` (cfg.to_json())
and `sd_func_format` = "native". An optional "ema/<model>/..." subtree holds EMA weights:
`load(..., ema=True)` uses them in place of the raw ones.
"""

import ml_collections

from sd_func import tree
from sd_func.checkpoint import files

FORMAT = "native"
CONFIG_KEY = "sd_func_config"
FORMAT_KEY = "sd_func_format"


def is_native(meta: dict) -> bool:
    return meta.get(FORMAT_KEY) == FORMAT


def save(params: dict, cfg: ml_collections.ConfigDict, path: str) -> None:
    ema = params.get("ema")
    model = {k: v for k, v in params.items() if k != "ema"}
    files.check_params(model, cfg, path)
    if ema is not None:
        for k, sub in ema.items():
            files.check_tree(tree.flatten(sub), files.expected_shapes(k, cfg[k]), path, prefix=f"ema/{k}/")
    meta = {"format": "pt", FORMAT_KEY: FORMAT, CONFIG_KEY: cfg.to_json()}
    files.write_safetensors(tree.flatten(params), path, metadata=meta)


def load(path: str, cfg=None, ema: bool = False, dtype=None) -> tuple[dict, ml_collections.ConfigDict]:
    flat, meta = files.read_safetensors(path)
    if CONFIG_KEY not in meta:
        raise files.CheckpointError(f"{path}: no {CONFIG_KEY!r} in the safetensors metadata; "
                                    "not an sd_func native checkpoint")
    stored = files.config_from_json(meta[CONFIG_KEY], path)
    params = tree.unflatten(flat)
    ema_tree = params.pop("ema", None)
    if ema and not ema_tree:
        raise files.CheckpointError(f"{path}: ema=True but the file holds no ema/* weights")
    if ema or (ema is None and ema_tree):
        params.update(ema_tree)
    files.check_params(params, stored, path)
    return files.cast(params, dtype), files.merge_config(stored, cfg)
