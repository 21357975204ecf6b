"""The UNet call the samplers make, eager or compiled whole with torch.compile(fullgraph=True).

`unet_fn(cfg_unet, compile)` returns call(params, x, t, context) -> unet.apply(...). With
compile=True the call is one TorchInductor graph; a compile failure raises (there is no
silent fallback to eager). Compiled calls are cached per UNet config, so repeated
pipeline calls reuse one compiled function (and its guards) instead of recompiling.
"""

import json

import torch

from sd_func.models import unet

_COMPILED: dict = {}


def _eager(cfg_unet):
    def call(params, x, t, context):
        return unet.apply(params, x, t, context, cfg_unet)
    return call


def unet_fn(cfg_unet, compile: bool = False):
    """call(params, x, t, context) for this UNet config; compiled (fullgraph) when asked."""
    if not compile:
        return _eager(cfg_unet)
    key = json.dumps(cfg_unet.to_dict(), sort_keys=True, default=str)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_eager(cfg_unet), fullgraph=True, dynamic=False)
    return _COMPILED[key]
