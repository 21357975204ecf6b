"""Training workdirs: `<workdir>/checkpoints/<step>/`, written atomically, last N kept.

The on-disk format of a training run, read and written here (sd_func.train writes it
through `save`; `sd_func.checkpoint.load` reads a workdir through `load_model`).

A checkpoint folder holds one safetensors file per tree (`params`, `ema`, `opt`,
`state` for the scalars such as the step and the loss scale, and `frozen` for the
VAE and text encoder, so that the model reloads from the workdir alone), and
`checkpoint.json` with the step, the data position of every rank and the full
config. Only plain tensors and JSON are stored, never pickles.

Atomicity: the files go into `checkpoints/tmp-<step>-<pid>/`, are fsynced, and the
folder is renamed to `<step>` (a rename within one filesystem is atomic). Only
folders named by an integer count as checkpoints, so a temporary folder left by a
crash is ignored by `latest` and removed by `clean_partial`.

A folder damaged on disk after its save (a tensor file truncated or deleted, its JSON
unreadable) is not loaded: `latest` checks that every file the checkpoint lists is
there and whole (each safetensors header matches its file's size), warns naming the
bad folder and why, and falls back to the previous complete checkpoint.
"""

import json
import logging
import os
import shutil

import ml_collections
import torch

from sd_func import fileio, lora, tree
from sd_func.checkpoint.files import CheckpointError, CheckpointNotFoundError
from sd_func.errors import UserError

log = logging.getLogger("sd_func.checkpoint")

META = "checkpoint.json"
TMP_PREFIX = "tmp-"
FORMAT = "sd_func.train/2"  # 2: the optimizer state is a chain of transforms (train.state)
# Config sections that fix the parameter shapes: a resume must not change them.
ARCHITECTURE = ("unet", "vae", "text_encoder")
NOT_ARCHITECTURE = {"tokenizer"}  # a path or hub id: may move between runs


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def step_dir(workdir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(workdir), str(step))


def steps(workdir: str) -> list[int]:
    """The steps of the complete checkpoints in workdir, oldest first."""
    d = checkpoint_dir(workdir)
    if not os.path.isdir(d):
        return []
    out = []
    for name in os.listdir(d):
        if name.isdigit() and os.path.isfile(os.path.join(d, name, META)):
            out.append(int(name))
    return sorted(out)


def damage(ckpt: str) -> str | None:
    """Why the checkpoint folder cannot be loaded whole, or None when it can.

    Every file its checkpoint.json lists must exist and be a complete safetensors
    file (safetensors checks the header's tensor offsets against the file size).
    """
    try:
        meta = read_meta(ckpt)
        for name in meta.get("files", []):
            fileio.safetensors_header(os.path.join(ckpt, f"{name}.safetensors"))
    except UserError as e:  # MissingFileError, UnreadableFileError
        return str(e)
    if not meta.get("files"):
        return f"{os.path.join(ckpt, META)} lists no tensor files"
    return None


def latest(workdir: str) -> str | None:
    """The folder of the newest complete and undamaged checkpoint in workdir, or None.

    A damaged newer one is skipped with a warning naming it (see `damage`)."""
    for s in reversed(steps(workdir)):
        ckpt = step_dir(workdir, s)
        why = damage(ckpt)
        if why is None:
            return ckpt
        log.warning("checkpoint %s is damaged and is skipped: %s; falling back to the previous complete one",
                    ckpt, why)
    return None


def clean_partial(workdir: str) -> list[str]:
    """Remove temporary folders left by an interrupted save; returns their names."""
    d = checkpoint_dir(workdir)
    if not os.path.isdir(d):
        return []
    gone = [n for n in os.listdir(d) if n.startswith((TMP_PREFIX, ".old-"))]
    for n in gone:
        shutil.rmtree(os.path.join(d, n), ignore_errors=True)
    return gone


def _flat_tensors(name: str, t) -> dict[str, torch.Tensor]:
    flat = tree.flatten(t) if isinstance(t, dict) else {"value": t}
    out = {}
    for path, v in flat.items():
        if not torch.is_tensor(v):
            raise TypeError(f"checkpoint tree {name!r}: leaf {path!r} is a {type(v).__name__}, "
                            "expected a tensor (put scalars in a 0-d tensor)")
        out[path] = v.detach()  # fileio.write_safetensors gives each its own CPU storage
    return out


def save(workdir: str, step: int, trees: dict, meta: dict, keep: int = 0) -> str:
    """Write trees (name -> nested dict of tensors) and meta as checkpoint `step`.

    meta must be JSON-serialisable; `step` and `format` are added. An existing
    checkpoint of the same step is replaced. Keeps the newest `keep` checkpoints up to
    this step (0 keeps all). Returns the checkpoint folder.
    """
    d = checkpoint_dir(workdir)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f"{TMP_PREFIX}{step}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for name, t in trees.items():
        flat = _flat_tensors(name, t)
        # safetensors sorts its keys; the stored order restores the trees' own key order.
        fileio.write_safetensors(flat, os.path.join(tmp, f"{name}.safetensors"),
                                 metadata={"format": FORMAT, "paths": json.dumps(list(flat))})
    fileio.write_json(dict(meta, step=int(step), format=FORMAT, files=sorted(trees)), os.path.join(tmp, META))
    final = step_dir(workdir, step)
    fileio.replace_folder(tmp, final)
    if keep and keep > 0:  # of those up to this step: a newer one is from before a fallback, redone later
        for s in [s for s in steps(workdir) if s <= step][:-keep]:
            shutil.rmtree(os.path.join(d, str(s)), ignore_errors=True)
    return final


def read_meta(ckpt: str) -> dict:
    return fileio.read_json(os.path.join(ckpt, META))


def _read(ckpt: str, name: str) -> dict[str, torch.Tensor]:
    f = os.path.join(ckpt, f"{name}.safetensors")
    if not os.path.isfile(f):
        raise CheckpointNotFoundError(f"{ckpt}: no {name}.safetensors in this checkpoint")
    keys, meta = fileio.safetensors_header(f)
    paths = json.loads(meta.get("paths", "null")) or sorted(keys)
    return fileio.read_safetensors(f, paths)[0]


def load_tree(ckpt: str, name: str) -> dict:
    """One stored tree as a nested dict of CPU tensors, in the key order it was saved with."""
    flat = _read(ckpt, name)
    if list(flat) == ["value"]:
        return flat["value"]
    return tree.unflatten(flat)


def restore_like(ckpt: str, name: str, like, optional: str | None = None):
    """The stored tree `name`, in the structure, dtypes and devices of `like`.

    Filling a freshly initialised tree keeps its key order and placement, so the
    compiled step sees exactly the structure it was traced with. `optional`: a path
    prefix (e.g. the fp16 "loss_scale/") whose leaves may be missing from the file
    (`like`'s are kept) or extra in it (ignored).
    """
    f = os.path.join(ckpt, f"{name}.safetensors")
    flat = _read(ckpt, name)
    if not isinstance(like, dict):
        return flat["value"].to(device=like.device, dtype=like.dtype)
    want = tree.flatten(like)
    if optional:
        flat = {k: v for k, v in flat.items() if k in want or not k.startswith(optional)}
        flat.update({k: v for k, v in want.items() if k.startswith(optional) and k not in flat})
    missing, unexpected, wrong = tree.diff(want, flat)
    if missing or unexpected or wrong:
        raise CheckpointError(f"{f} does not match the model: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]} wrong_shape={wrong[:5]}")
    return tree.unflatten({k: flat[k].to(device=v.device, dtype=v.dtype) for k, v in want.items()})


def config_json(cfg: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON (tuples become lists)."""
    return fileio.config_to_json(cfg)


def config_from_json(d: dict) -> ml_collections.ConfigDict:
    """Inverse of config_json (lists back to tuples, as the configs write them)."""
    return fileio.config_from_json(d, "checkpoint.json")


def check_architecture(stored: dict, cfg: ml_collections.ConfigDict, where: str) -> None:
    """Raise a ValueError naming the fields where cfg's model shape differs from stored."""
    now = config_json(cfg)
    diffs = []
    for section in ARCHITECTURE:
        a, b = stored.get(section, {}), now.get(section, {})
        for k in sorted(set(a) | set(b)):
            if k not in NOT_ARCHITECTURE and a.get(k) != b.get(k):
                diffs.append(f"{section}.{k}: checkpoint {a.get(k)!r}, config {b.get(k)!r}")
    if diffs:
        raise CheckpointError(f"{where}: the config's model architecture differs from the checkpoint's "
                         f"({'; '.join(diffs[:6])}); use a new --workdir or the stored config")


def load_model(path: str, ema: bool = True) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, cfg) of a training workdir's newest checkpoint (or of one checkpoint folder).

    params = {"unet", "vae", "text_encoder"}, with the EMA weights of the trained
    networks when `ema` (the default, as for sampling). `checkpoint.load` calls this
    for a path that `is_workdir`.
    """
    ckpt = path if os.path.isfile(os.path.join(path, META)) else latest(path)
    if ckpt is None:
        raise CheckpointNotFoundError(f"{path}: no complete checkpoint in {checkpoint_dir(path)}")
    meta = read_meta(ckpt)
    cfg = config_from_json(meta["config"])
    trained = load_tree(ckpt, "ema" if ema and "ema" in meta["files"] else "params")
    params = dict(load_tree(ckpt, "frozen"))
    if "unet" not in trained and lora.TREE not in trained:  # the state holds the UNet tree itself
        trained = {"unet": trained}
    params = lora.merge_trained(dict(params, **trained))  # a LoRA run: its LoRA baked into the base
    return {k: params[k] for k in ("unet", "vae", "text_encoder") if k in params}, cfg


def is_workdir(path: str) -> bool:
    """True for a training workdir with a checkpoint, or a checkpoint folder itself."""
    return os.path.isfile(os.path.join(path, META)) or latest(path) is not None
