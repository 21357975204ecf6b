"""File-level helpers shared by the checkpoint formats: reading, atomic writing, validation.

Tensors are read from `.safetensors` files, or from `.ckpt`/`.bin`/`.pt` files only through
`torch.load(weights_only=True)`, so no code is ever unpickled. Every write goes to a temporary
name in the destination folder and is moved into place with `os.replace` / `os.rename`, so a
crash never leaves a half-written checkpoint under the final name. Validation compares a
loaded tree with the shapes `init(key, cfg)` would produce, computed under FakeTensorMode so
that no memory is allocated, and raises a `CheckpointError` that names the file and the
first offending keys; nothing is ever loaded partially.
"""

import functools
import os
import shutil
from collections.abc import Iterable

import ml_collections
import torch

from sd_func import fileio, tree
from sd_func.errors import MissingFileError, UserError
from sd_func.models import autoencoder, text_encoder, unet

SHOW = 5  # offending keys named in an error message
MODEL_SECTIONS = ("unet", "vae", "text_encoder")


class CheckpointError(UserError):
    """A checkpoint that cannot be read: unknown format, corrupt, or not matching the model."""


class CheckpointNotFoundError(CheckpointError, MissingFileError):
    """The checkpoint path (or a file a checkpoint folder needs) does not exist."""


def first(keys: Iterable, n: int = SHOW) -> str:
    keys = list(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(str(k) for k in keys[:n]) + more


def require(path: str, kind: str = "file") -> None:
    ok = os.path.isdir(path) if kind == "folder" else os.path.isfile(path)
    if not ok:
        what = "folder" if kind == "folder" else "file"
        raise CheckpointNotFoundError(f"{path}: checkpoint {what} not found")


# ---------------------------------------------------------------------------- reading


def safetensors_header(path: str) -> tuple[list[str], dict]:
    """(tensor names, metadata) of a safetensors file without reading its tensors."""
    require(path)
    try:
        return fileio.safetensors_header(path)
    except fileio.UnreadableFileError as e:
        raise CheckpointError(str(e)) from e


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a whole safetensors file, on the CPU."""
    require(path)
    try:
        return fileio.read_safetensors(path)
    except fileio.UnreadableFileError as e:
        raise CheckpointError(str(e)) from e


def read_torch(path: str) -> dict:
    """A torch.save file loaded with weights_only=True (tensors and plain containers only)."""
    require(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e)[:300]}). The file is corrupt, truncated, or pickles objects other than "
            "tensors; sd_func never unpickles code. Convert it to .safetensors with a tool you "
            "trust.") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(flat tensors, metadata) of a .safetensors or torch file; a torch file's
    non-tensor top-level entries (global_step, epoch, ...) are returned as metadata."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    obj = read_torch(path)
    meta = {k: v for k, v in obj.items() if not torch.is_tensor(v) and k != "state_dict"}
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    tensors = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (top-level keys: {first(obj)})")
    return tensors, meta


# ---------------------------------------------------------------------------- writing


write_safetensors = fileio.write_safetensors
write_json = fileio.write_json


def write_torch(obj: dict, path: str) -> None:
    """torch.save atomically; obj must hold only tensors and plain values."""
    fileio.atomic_write(lambda tmp: torch.save(obj, tmp), path, ".ckpt")


def replace_folder(tmp: str, final: str, is_ours) -> None:
    """Move the finished folder tmp to final; an existing final folder is replaced only
    when is_ours(final) says it is a checkpoint of the same kind (never a user's folder)."""
    final = os.path.abspath(final)
    if os.path.lexists(final) and not (os.path.isdir(final) and (is_ours(final) or not os.listdir(final))):
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{final}: exists and is not a checkpoint folder of this kind; "
                              "refusing to overwrite it")
    fileio.replace_folder(tmp, final)


# ---------------------------------------------------------------------------- configs


def config_from_json(text: str, where: str) -> ml_collections.ConfigDict:
    """The inverse of cfg.to_json() (lists back to tuples, as the configs write them)."""
    try:
        return fileio.config_from_json(text, where)
    except fileio.UnreadableFileError as e:
        raise CheckpointError(str(e)) from e


def merge_config(model_cfg: ml_collections.ConfigDict, cfg) -> ml_collections.ConfigDict:
    """cfg (when given) with its model sections (unet, vae, text_encoder, diffusion)
    replaced by model_cfg's; without cfg, model_cfg itself. The tokenizer is not part of
    the architecture: an empty text_encoder.tokenizer is taken from cfg."""
    if cfg is None:
        return model_cfg
    out = ml_collections.ConfigDict(cfg.to_dict())
    for k in (*MODEL_SECTIONS, "diffusion"):
        if k in model_cfg:
            if k in out:
                del out[k]
            out[k] = ml_collections.ConfigDict(model_cfg[k].to_dict())
    given = cfg.get("text_encoder", {}).get("tokenizer", "")
    if "text_encoder" in out and not out.text_encoder.get("tokenizer", "") and given:
        out.text_encoder.tokenizer = given
    return out


# ---------------------------------------------------------------------------- validation


def model_module(section: str):
    return {"unet": unet, "vae": autoencoder, "text_encoder": text_encoder}[section]


def expected_shapes(section: str, section_cfg) -> dict[str, tuple]:
    """{"a/b/weight": shape} of `init(key, cfg)` for one model, without allocating it."""
    return dict(_expected_shapes(section, section_cfg.to_json()))


@functools.lru_cache(maxsize=32)
def _expected_shapes(section: str, cfg_json: str) -> tuple:
    section_cfg = config_from_json(cfg_json, f"cfg.{section}")
    init = model_module(section).init
    try:  # meta tensors: shapes only, no memory, no random numbers drawn
        with torch.device("meta"):
            params = init(0, section_cfg)
    except (RuntimeError, NotImplementedError, TypeError):  # an op without a meta kernel
        params = init(0, section_cfg)
    return tuple((k, tuple(v.shape)) for k, v in tree.flatten(params).items())


def check_tree(got: dict[str, torch.Tensor], expected: dict[str, tuple], where: str,
               extra_hint: str = "", prefix: str = "") -> None:
    """Raise CheckpointError unless got (flat "/" paths) has exactly the expected keys and
    shapes; the message names keys as prefix + path."""
    missing = [prefix + k for k in expected if k not in got]
    unexpected = [prefix + k for k in got if k not in expected]
    wrong = [f"{prefix}{k}: expected {expected[k]}, got {tuple(got[k].shape)}"
             for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({first(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shapes ({first(wrong)})")
        raise CheckpointError(f"{where}: does not match the config: {'; '.join(parts)}{extra_hint}")


def check_params(params: dict, cfg, where: str, extra_hint: str = "") -> None:
    """Check params = {"unet", "vae", "text_encoder"} against cfg's model sections."""
    missing = [s for s in MODEL_SECTIONS if s not in params]
    unexpected = [s for s in params if s not in MODEL_SECTIONS]
    if missing or unexpected:
        raise CheckpointError(f"{where}: params must hold exactly {MODEL_SECTIONS}; "
                              f"missing {missing}, unexpected {unexpected}")
    for s in MODEL_SECTIONS:
        if s not in cfg:
            raise CheckpointError(f"{where}: cfg has no section {s!r}")
        check_tree(tree.flatten(params[s]), expected_shapes(s, cfg[s]), where, extra_hint, prefix=f"{s}/")


def cast(params: dict, dtype) -> dict:
    if dtype is None:
        return params
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return tree.cast(params, dtype)
