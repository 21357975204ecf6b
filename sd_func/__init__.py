"""sd_func: Stable Diffusion as pure functions over parameter pytrees.

Models are `init(key, cfg) -> params` / `apply(params, ..., cfg)` pairs; params
are nested dicts of tensors whose "/"-joined paths are exactly the module names
diffusers and transformers use, so a diffusers state dict *is* a params tree.
"""

__version__ = "0.1.0"
