"""Checkpoint interchange: sd_func native files, diffusers folders, CompVis single files.

  params, cfg = checkpoint.load(path, cfg=None, ema=False, dtype=None)   # format detected
  checkpoint.save(params, cfg, path, format="native" | "diffusers" | "compvis")
  lora_params = checkpoint.load_lora(path, params)    # diffusers/PEFT or kohya LoRA file
  checkpoint.save_lora(lora_params, path, format="diffusers" | "kohya")

params = {"unet", "vae", "text_encoder"} trees whose "/"-paths are diffusers/transformers
state-dict names; cfg has cfg.unet, cfg.vae, cfg.text_encoder, cfg.diffusion (and, when a
cfg is passed to `load`, its other sections are kept). Every load is strict: a missing,
unexpected or wrongly shaped tensor, an unknown format or a corrupt file raises
CheckpointError (a ValueError; CheckpointNotFoundError is also a FileNotFoundError) naming
the file and the first offending keys. Every save is atomic (temp file or folder, then
rename). Formats: native.py, diffusers_format.py, compvis.py (+ compvis_keys.py), LoRA
files in lora_files.py (trees of sd_func.lora); an
sd_func training workdir (or one of its checkpoint folders) also loads, through
training.py (the format sd_func.train writes).
"""

import os

from sd_func.checkpoint import compvis, diffusers_format, files, lora_files, native, training
from sd_func.checkpoint.files import CheckpointError, CheckpointNotFoundError

FORMATS = ("native", "diffusers", "compvis")
_TORCH_EXT = (".ckpt", ".pt", ".pth", ".bin")

load_lora = lora_files.read
save_lora = lora_files.save

__all__ = ["FORMATS", "CheckpointError", "CheckpointNotFoundError", "detect", "load", "load_lora", "save",
           "save_lora"]


def detect(path: str) -> str:
    """The format of path: "native", "diffusers", "compvis" or "workdir" (sd_func training)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        if diffusers_format.is_diffusers_folder(path):
            return "diffusers"
        if training.is_workdir(path):
            return "workdir"
        hint = (" (a single component folder; pass the pipeline folder above it)"
                if os.path.isfile(os.path.join(path, "config.json")) else "")
        raise CheckpointError(f"{path}: a folder without {diffusers_format.INDEX} nor an sd_func "
                              f"training checkpoint; not a known checkpoint format{hint}")
    if path.endswith(".safetensors"):
        keys, meta = files.safetensors_header(path)
        if native.is_native(meta):
            return "native"
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
               for k in keys):
            return "compvis"
        raise CheckpointError(f"{path}: neither an sd_func native file (no sd_func_format metadata) "
                              f"nor a CompVis checkpoint; first keys: {files.first(keys)}")
    if path.endswith(_TORCH_EXT):
        return "compvis"
    raise CheckpointError(f"{path}: unknown checkpoint format (expected a diffusers folder, "
                          ".safetensors, or .ckpt)")


def load(path: str, cfg=None, ema=False, dtype=None):
    """(params, cfg) from a native file, diffusers folder, CompVis file or training workdir.

    cfg: the non-model sections (sample, train, data, ...) of the returned cfg, and the
      tokenizer when the checkpoint has none. The model sections (unet, vae, text_encoder,
      diffusion) come from the checkpoint; a CompVis file without sd_func's embedded config
      uses cfg's when they fit its tensors exactly, else infers them (see compvis.py).
    ema: True = the EMA weights (an error when the checkpoint has none), False = the raw
      weights, None = EMA when present. A diffusers folder has one set of weights.
    dtype: cast floating-point tensors (e.g. torch.float16); None keeps the file's dtype.
    """
    path = os.fspath(path)
    kind = detect(path)
    if kind == "workdir":
        return _load_workdir(path, cfg, ema, dtype)
    module = {"native": native, "diffusers": diffusers_format, "compvis": compvis}[kind]
    if kind == "diffusers" and ema is None:
        ema = False
    return module.load(path, cfg=cfg, ema=ema, dtype=dtype)


def _load_workdir(path: str, cfg, ema, dtype):
    if ema:
        ckpt = path if os.path.isfile(os.path.join(path, training.META)) else training.latest(path)
        if "ema" not in training.read_meta(ckpt).get("files", ()):
            raise CheckpointError(f"{ckpt}: ema=True but this training checkpoint stores no EMA weights")
    params, stored = training.load_model(path, ema=ema is not False)
    files.check_params(params, stored, path)
    return files.cast(params, dtype), files.merge_config(stored, cfg)


def save(params: dict, cfg, path: str, format: str = "native") -> None:
    """Write params + cfg: "native" (.safetensors, cfg embedded), "diffusers" (a pipeline
    folder) or "compvis" (.safetensors or .ckpt). Atomic; params must match cfg."""
    path = os.fspath(path)
    if format == "native":
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: a native checkpoint is a .safetensors file")
        native.save(params, cfg, path)
    elif format == "diffusers":
        diffusers_format.save(params, cfg, path)
    elif format == "compvis":
        compvis.save(params, cfg, path)
    else:
        raise CheckpointError(f"{path}: unknown format {format!r}; one of {FORMATS}")
