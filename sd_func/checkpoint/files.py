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
import json
import os
import shutil
import tempfile
from collections.abc import Iterable

import ml_collections
import safetensors
import safetensors.torch
import torch

from sd_func import tree

SHOW = 5  # offending keys named in an error message
MODEL_SECTIONS = ("unet", "vae", "text_encoder")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: unknown format, corrupt, or not matching the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
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
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as e:  # SafetensorError for a truncated / corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a whole safetensors file, on the CPU."""
    require(path)
    keys, meta = safetensors_header(path)
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}, meta
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from e


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


def _own_storage(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing storage (safetensors refuses that)."""
    out, seen = {}, set()
    for k, v in flat.items():
        if not torch.is_tensor(v):
            raise CheckpointError(f"cannot save {k!r}: a {type(v).__name__}, not a tensor")
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen or v.numel() * v.element_size() != v.untyped_storage().nbytes():
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def fsync(path: str) -> None:
    """Flush a file's (or a folder's) contents to disk before a rename makes it visible."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(write_fn, path: str, suffix: str) -> None:
    """write_fn(tmp) into a temporary file in path's folder, fsync, then os.replace onto path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_safetensors(flat: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    """Write atomically: a temporary file in the same folder, fsync, os.replace."""
    _atomic_write(lambda tmp: safetensors.torch.save_file(_own_storage(flat), tmp, metadata=metadata),
                  path, ".safetensors")


def write_torch(obj: dict, path: str) -> None:
    """torch.save atomically; obj must hold only tensors and plain values."""
    _atomic_write(lambda tmp: torch.save(obj, tmp), path, ".ckpt")


def write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def replace_folder(tmp: str, final: str, is_ours) -> None:
    """Move the finished folder tmp to final; an existing final folder is replaced only
    when is_ours(final) says it is a checkpoint of the same kind (never a user's folder)."""
    final = os.path.abspath(final)
    if os.path.lexists(final):
        if not os.path.isdir(final) or not (is_ours(final) or not os.listdir(final)):
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{final}: exists and is not a checkpoint folder of this kind; "
                                  "refusing to overwrite it")
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(final))
        os.rmdir(old)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


# ---------------------------------------------------------------------------- configs


def _tuples(x):
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return x


def config_from_json(text: str, where: str) -> ml_collections.ConfigDict:
    """The inverse of cfg.to_json() (lists back to tuples, as the configs write them)."""
    try:
        return ml_collections.ConfigDict(_tuples(json.loads(text)))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: stored config is not valid JSON ({e})") from e


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
    from sd_func.models import autoencoder, text_encoder, unet
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
