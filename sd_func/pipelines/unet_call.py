"""The UNet call the samplers make, eager or compiled whole with torch.compile(fullgraph=True).

`unet_fn(cfg_unet, compile)` returns call(params, x, t, context) -> unet.apply(...).
compile: False (eager), True (TorchInductor) or a torch.compile backend name ("inductor",
"aot_eager", "eager", "cudagraphs", ...; "eager" traces the graph with TorchDynamo only,
which is how to check quickly that the call has no graph break). The call is always one
fullgraph graph: a compile failure raises, there is no silent fallback to eager.
Compiled calls are cached per UNet config and backend, so repeated pipeline calls reuse
one compiled function (and its guards) instead of recompiling.
"""

import json

import torch

from sd_func.models import unet

_COMPILED: dict = {}


def _eager(cfg_unet):
    def call(params, x, t, context):
        return unet.apply(params, x, t, context, cfg_unet)
    return call


def backend_of(compile) -> str | None:
    """None for eager, else the torch.compile backend (True = "inductor")."""
    if compile is False or compile is None or compile == "":
        return None
    if compile is True:
        return "inductor"
    if isinstance(compile, str):
        return compile
    raise ValueError(f"compile={compile!r}: expected True, False or a torch.compile backend name")


def unet_fn(cfg_unet, compile=False):
    """call(params, x, t, context) for this UNet config; compiled (fullgraph) when asked."""
    backend = backend_of(compile)
    if backend is None:
        return _eager(cfg_unet)
    key = (json.dumps(cfg_unet.to_dict(), sort_keys=True, default=str), backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_eager(cfg_unet), fullgraph=True, dynamic=False, backend=backend)
    return _COMPILED[key]
