"""diffusers pipeline folders (StableDiffusionPipeline.save_pretrained layout), read and written.

A folder holds model_index.json and unet/, vae/, text_encoder/, tokenizer/, scheduler/.
Because sd_func's parameter paths are the diffusers / transformers state-dict names, import
is a rename of "." to "/" plus strict validation against the shapes that the folder's
config.json files imply; export writes the same files back, so that
`StableDiffusionPipeline.from_pretrained(folder)` loads them. Weights are read from
.safetensors (also sharded, also the fp16 variant) or from .bin through
`torch.load(weights_only=True)`; they are written as .safetensors.
"""

import json
import os
import re
import shutil
import tempfile

import ml_collections

from sd_func import tree
from sd_func.checkpoint import files
from sd_func.diffusion import schedules
from sd_func.models import autoencoder, text_encoder, tokenizer, unet

INDEX = "model_index.json"
PIPELINE = "StableDiffusionPipeline"
# component -> (library, class) as written to model_index.json; the classes we read
COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "scheduler": ("diffusers", "DDIMScheduler"),
}
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_TORCH_NAMES = {"diffusion_pytorch_model": "diffusion_pytorch_model", "model": "pytorch_model"}
# AutoencoderKL's pre-0.14 attention names, renamed by diffusers on load (modeling_utils.py)
_LEGACY_VAE_ATTN = re.compile(r"^((?:en|de)coder\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.")
_LEGACY_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def is_diffusers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX))


def _read_json(path: str) -> dict:
    files.require(path)
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise files.CheckpointError(f"{path}: not valid JSON ({e})") from e


def weights_file(folder: str, base: str) -> str:
    """The weights of one component folder: safetensors (plain, sharded, fp16), then .bin."""
    torch_base = _TORCH_NAMES[base]
    for name in (f"{base}.safetensors", f"{base}.safetensors.index.json", f"{torch_base}.bin",
                 f"{torch_base}.bin.index.json", f"{base}.fp16.safetensors",
                 f"{base}.fp16.safetensors.index.json", f"{torch_base}.fp16.bin"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    have = sorted(os.listdir(folder)) if os.path.isdir(folder) else "folder missing"
    raise files.CheckpointNotFoundError(
        f"{folder}: no weights ({base}.safetensors, {torch_base}.bin or a sharded index); found {have}")


def read_weights(path: str) -> dict:
    if path.endswith(".index.json"):
        index = _read_json(path)
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise files.CheckpointError(f"{path}: sharded index without a weight_map")
        out = {}
        for s in shards:
            out.update(files.read_tensors(os.path.join(os.path.dirname(path), s))[0])
        return out
    return files.read_tensors(path)[0]


def _component(folder: str, name: str, index: dict) -> None:
    want = COMPONENTS[name][1]
    entry = index.get(name)
    if not entry or entry[1] is None:
        raise files.CheckpointError(f"{os.path.join(folder, INDEX)}: no {name!r} component")
    if name in ("unet", "vae", "text_encoder") and entry[1] != want:
        raise files.CheckpointError(f"{os.path.join(folder, INDEX)}: {name} is {entry[1]!r}; "
                                    f"sd_func reads {want} only")


def _model_cfg(name: str, d: dict, where: str, tokenizer: str = ""):
    module = files.model_module(name)
    try:
        if name == "text_encoder":
            return module.from_diffusers_config(d, tokenizer=tokenizer)
        return module.from_diffusers_config(d)
    except ValueError as e:
        raise files.CheckpointError(f"{where}: {e}") from e


def _state_to_params(name: str, sd: dict) -> dict:
    if name == "text_encoder":
        return files.model_module(name).from_state_dict(sd)
    if name == "vae":
        sd = {_LEGACY_VAE_ATTN.sub(lambda m: f"{m[1]}.{_LEGACY_NEW[m[2]]}.", k): v for k, v in sd.items()}
    return tree.from_state_dict(sd)


def diffusion_config(d: dict, where: str = "scheduler_config.json") -> ml_collections.ConfigDict:
    """cfg.diffusion from a scheduler_config.json: the keys schedules.config() has, the
    missing ones at its defaults (other scheduler keys, e.g. PNDM's skip_prk_steps, are dropped)."""
    if d.get("trained_betas") is not None:
        raise files.CheckpointError(f"{where}: trained_betas (an explicit beta list) is not supported")
    c = schedules.config()
    for k in list(c.keys()):
        if k in d and d[k] is not None:
            try:
                c[k] = float(d[k]) if isinstance(c[k], float) else d[k]
            except (TypeError, ValueError) as e:
                raise files.CheckpointError(f"{where}: {k}={d[k]!r}: {e}") from e
    return c


def load(folder: str, cfg=None, ema=False, dtype=None) -> tuple[dict, ml_collections.ConfigDict]:
    files.require(folder, "folder")
    index = _read_json(os.path.join(folder, INDEX))
    if ema:
        raise files.CheckpointError(f"{folder}: a diffusers folder holds one set of weights (released "
                                    "pipelines hold the EMA weights); load it with ema=False")
    for name in ("unet", "vae", "text_encoder"):
        _component(folder, name, index)
    tok_dir = tokenizer_dir(os.path.join(os.path.abspath(folder), "tokenizer"))
    if tok_dir is not None:
        tokenizer = tok_dir
    else:
        tokenizer = cfg.text_encoder.get("tokenizer", "") if cfg is not None and "text_encoder" in cfg else ""
    model_cfg = ml_collections.ConfigDict()
    params = {}
    for name in ("unet", "vae", "text_encoder"):
        sub = os.path.join(folder, name)
        config_path = os.path.join(sub, "config.json")
        model_cfg[name] = _model_cfg(name, _read_json(config_path), config_path, tokenizer)
        wpath = weights_file(sub, WEIGHT_NAMES[name])
        p = _state_to_params(name, read_weights(wpath))
        files.check_tree(tree.flatten(p), files.expected_shapes(name, model_cfg[name]), wpath)
        params[name] = p
    sched = os.path.join(folder, "scheduler", "scheduler_config.json")
    model_cfg.diffusion = diffusion_config(_read_json(sched) if os.path.isfile(sched) else {}, sched)
    return files.cast(params, dtype), files.merge_config(model_cfg, cfg)


# ------------------------------------------------------------------------------ save


def _version() -> str:
    try:
        import diffusers
        return diffusers.__version__
    except ImportError:
        return "0.30.0"


def tokenizer_dir(path: str) -> str | None:
    """path or path/tokenizer, whichever holds CLIP tokenizer files (vocab.json + merges.txt,
    or the tokenizer.json that transformers >= 5 writes alone); None if neither does."""
    for d in (path, os.path.join(path, "tokenizer")):
        if (os.path.isfile(os.path.join(d, "tokenizer.json"))
                or all(os.path.isfile(os.path.join(d, f)) for f in ("vocab.json", "merges.txt"))):
            return d
    return None


def _write_tokenizer(spec: str, dest: str, where: str) -> None:
    if not spec:
        raise files.CheckpointError(
            f"{where}: cfg.text_encoder.tokenizer is empty, and a diffusers folder needs "
            "tokenizer files. A CompVis checkpoint file carries no tokenizer: set "
            "cfg.text_encoder.tokenizer to a local tokenizer folder (vocab.json + merges.txt), "
            "e.g. --config.text_encoder.tokenizer=PATH, or pass cfg= to checkpoint.load")
    src = os.path.expanduser(spec)
    src = tokenizer_dir(src) if os.path.isdir(src) else None
    if src is not None:
        shutil.copytree(src, dest)
        return
    try:
        tokenizer.load(spec).save_pretrained(dest)
    except (ValueError, OSError) as e:
        raise files.CheckpointError(f"{where}: cannot write tokenizer {spec!r}: {e}") from e


def save(params: dict, cfg, folder: str) -> None:
    folder = os.path.abspath(folder)
    files.check_params(params, cfg, folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        version = _version()
        index = {"_class_name": PIPELINE, "_diffusers_version": version,
                 "safety_checker": [None, None], "feature_extractor": [None, None],
                 "image_encoder": [None, None], "requires_safety_checker": False}
        index.update({k: list(v) for k, v in COMPONENTS.items()})
        files.write_json(index, os.path.join(tmp, INDEX))
        configs = {
            "unet": {"_class_name": "UNet2DConditionModel", **unet.to_diffusers_config(cfg.unet)},
            "vae": {**autoencoder.to_diffusers_config(cfg.vae), "_class_name": "AutoencoderKL"},
            "text_encoder": text_encoder.to_diffusers_config(cfg.text_encoder),
        }
        for name, conf in configs.items():
            os.makedirs(os.path.join(tmp, name))
            if name != "text_encoder":
                conf = {**conf, "_diffusers_version": version}
            files.write_json(conf, os.path.join(tmp, name, "config.json"))
            sd = (text_encoder.to_state_dict(params[name], prefixed=True) if name == "text_encoder"
                  else tree.to_state_dict(params[name]))
            files.write_safetensors(sd, os.path.join(tmp, name, f"{WEIGHT_NAMES[name]}.safetensors"),
                                    metadata={"format": "pt"})
        _write_tokenizer(cfg.text_encoder.get("tokenizer", ""), os.path.join(tmp, "tokenizer"), folder)
        os.makedirs(os.path.join(tmp, "scheduler"))
        sched = {"_class_name": COMPONENTS["scheduler"][1], "_diffusers_version": version,
                 **cfg.diffusion.to_dict()}
        files.write_json(sched, os.path.join(tmp, "scheduler", "scheduler_config.json"))
        files.replace_folder(tmp, folder, is_diffusers_folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
