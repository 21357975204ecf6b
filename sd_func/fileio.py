"""Files on disk, written so that a crash never leaves half of one: the low I/O layer.

Everything sd_func writes goes through here: safetensors files (with string metadata),
JSON files, whole folders, and configs as JSON. A write goes to a temporary name in
the destination folder, is fsynced, and is then moved into place with `os.replace`
(a file) or `os.rename` (a folder), which is atomic within one filesystem: a reader
sees the old file or the new one, never a partial one. Reading a safetensors file
that is truncated or not safetensors at all raises `UnreadableFileError` naming the
file. Both the checkpoint formats (sd_func.checkpoint) and the training checkpoints
use this module; it imports nothing else of sd_func but the error types.
"""

import json
import os
import shutil
import tempfile

import ml_collections
import safetensors
import safetensors.torch
import torch

from sd_func.errors import MissingFileError, UserError


class UnreadableFileError(UserError):
    """A file that exists but cannot be read: truncated, corrupt, or another format."""


# ---------------------------------------------------------------------------- writing


def fsync(path: str) -> None:
    """Flush a file's (or a folder's) contents to disk before a rename makes it visible."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(write_fn, path: str, suffix: str = "") -> None:
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


def own_storage(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing storage (safetensors refuses that)."""
    out, seen = {}, set()
    for k, v in flat.items():
        if not torch.is_tensor(v):
            raise TypeError(f"cannot save {k!r}: a {type(v).__name__}, not a tensor")
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen or v.numel() * v.element_size() != v.untyped_storage().nbytes():
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def write_safetensors(flat: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    """flat {name: tensor} (+ string metadata) to a safetensors file, atomically."""
    atomic_write(lambda tmp: safetensors.torch.save_file(own_storage(flat), tmp, metadata=metadata),
                 path, ".safetensors")


def write_json(obj, path: str) -> None:
    """obj as indented, key-sorted JSON, atomically."""
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True)
            fh.write("\n")
    atomic_write(write, path, ".json")


def replace_folder(tmp: str, final: str) -> None:
    """Move the finished folder tmp to final; an existing final is swapped out, then removed."""
    fsync(tmp)
    if os.path.lexists(final):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(final)))
        os.rmdir(old)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync(os.path.dirname(os.path.abspath(final)))


# ---------------------------------------------------------------------------- reading


def require_file(path: str, what: str = "file") -> None:
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: {what} not found")


def safetensors_header(path: str) -> tuple[list[str], dict]:
    """(tensor names, metadata) of a safetensors file without reading its tensors."""
    require_file(path)
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as e:  # SafetensorError for a truncated / corrupt header
        raise UnreadableFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def read_safetensors(path: str, names=None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file on the CPU; `names` picks (and orders) tensors."""
    keys, meta = safetensors_header(path)
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in (keys if names is None else names)}, meta
    except Exception as e:
        raise UnreadableFileError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from e


def read_json(path: str):
    require_file(path)
    try:
        with open(path) as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise UnreadableFileError(f"{path}: not valid JSON ({e})") from e


# ---------------------------------------------------------------------------- configs


def config_to_json(cfg: ml_collections.ConfigDict) -> dict:
    """A config as plain JSON data (tuples become lists)."""
    return json.loads(cfg.to_json())


def _tuples(x):
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return x


def config_from_json(data, where: str) -> ml_collections.ConfigDict:
    """The inverse of config_to_json, from JSON text or data (lists back to tuples, as the
    config files write them)."""
    try:
        if isinstance(data, str):
            data = json.loads(data)
        return ml_collections.ConfigDict(_tuples(data))
    except (ValueError, TypeError) as e:
        raise UnreadableFileError(f"{where}: stored config is not valid JSON ({e})") from e
