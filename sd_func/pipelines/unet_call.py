"""The UNet call the samplers make, eager or compiled whole with torch.compile(fullgraph=True).

`make_unet_fn(cfg_unet, compile)` returns call(params, x, t, context) -> unet.apply(...).
compile: False (eager), True (TorchInductor) or a torch.compile backend name ("inductor",
"aot_eager", "eager", "cudagraphs", ...; "eager" traces the graph with TorchDynamo only,
which is how to check quickly that the call has no graph break). A compiled call is one
fullgraph graph: a compile failure raises, there is no silent fallback to eager.

There is no module-level cache: whoever wants a compiled UNet builds it once and holds
it (job.run from cfg.sample.compile, a benchmark, a server), and passes it to the
pipelines as `unet_fn=`, so its compiled code and guards live as long as its holder.
"""

import torch

from sd_func.errors import UserError
from sd_func.models import unet


def backend_of(compile) -> str | None:
    """None for eager, else the torch.compile backend (True = "inductor")."""
    if compile is False or compile is None or compile == "":
        return None
    if compile is True:
        return "inductor"
    if isinstance(compile, str):
        return compile
    raise UserError(f"compile={compile!r}: expected true, false or a torch.compile backend name")


def make_unet_fn(cfg_unet, compile=False):
    """call(params, x, t, context) for this UNet config; compiled (fullgraph) when asked."""
    backend = backend_of(compile)

    def call(params, x, t, context):
        return unet.apply(params, x, t, context, cfg_unet)
    if backend is None:
        return call
    return torch.compile(call, fullgraph=True, dynamic=False, backend=backend)
