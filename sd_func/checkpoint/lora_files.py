"""LoRA files: diffusers/PEFT and kohya-ss/A1111, read and written (the trees are sd_func.lora's).

diffusers (what `StableDiffusionPipeline.load_lora_weights` reads, and what
`save_lora_weights` writes as pytorch_lora_weights.safetensors):

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight  [r, in]
    unet.<module>.lora_B.weight [out, r];  text_encoder.text_model.encoder.layers.0.self_attn.q_proj...

with the ranks and alphas in the safetensors metadata `lora_adapter_metadata` (a JSON of
PEFT LoraConfig fields per prefix: "unet.r", "unet.lora_alpha", "unet.alpha_pattern", ...);
a file without it has alpha = rank (scale 1), as diffusers assumes. Text-encoder keys are
read with or without transformers' "text_model." and written with it (hub files' names).

kohya-ss / A1111: `lora_unet_<module, "_" for ".">.lora_down.weight` [r, in(, kh, kw)],
`.lora_up.weight` [out, r(, 1, 1)], `.alpha` (0-d; absent = rank), `lora_te_<module>` for
the text encoder. UNet modules are named the diffusers way (as kohya's sd-scripts writes
SD 1.x/2.x LoRAs) or the CompVis way (`lora_unet_input_blocks_1_1_transformer_blocks_0_
attn1_to_q`, as older A1111-era files do); both are read by matching every file name
against the names the model's own modules have (checkpoint.compvis_keys), never by
guessing at underscores. Written: diffusers names.

Reading is strict: a key that names no module of the model, a half (down without up), or a
shape that does not fit raises CheckpointError naming the file and the first such keys.
"""

import json
import os
import re

import torch

from sd_func import lora, tree
from sd_func.checkpoint import compvis_keys, files

FORMATS = ("diffusers", "kohya")
DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_TE = "text_model"
_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_KOHYA = re.compile(r"^(lora_(?:unet|te)_\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(unet|text_encoder)\.(.+)\.(lora_A|lora_B)\.weight$")
_KOHYA_PART = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B", "alpha": "alpha"}


def _weights(params: dict) -> dict[str, torch.Tensor]:
    """{full module path "unet/.../to_q": weight} of the linear and conv weights of params."""
    return {p[: -len("/weight")]: w for p, w in tree.flatten(params).items()
            if p.endswith("/weight") and w.ndim in (2, 4)}


def kohya_names(params: dict) -> dict[str, str]:
    """{kohya module name: full module path} for every linear/conv weight of params
    (UNet modules under both their diffusers and their CompVis names)."""
    out = {}
    mods = _weights(params)
    for m in mods:
        section, _, rest = m.partition("/")
        if section in _PREFIX:
            out[_PREFIX[section] + rest.replace("/", "_")] = m
    if "unet" in params:
        keys = list(tree.to_state_dict(params["unet"]))
        for key, entry in compvis_keys.unet_table(keys).items():
            module = "unet/" + key.removesuffix(".weight").replace(".", "/")
            if key.endswith(".weight") and module in mods:
                ldm = entry.ldm[len(compvis_keys.UNET): -len(".weight")]
                out.setdefault(_PREFIX["unet"] + ldm.replace(".", "_"), module)
    return out


def _fit(module: dict, weight: torch.Tensor) -> dict:
    """A and B reshaped between linear [r, in] and 1x1-conv [r, in, 1, 1] to the weight's rank
    (SD 1.x's proj_in/proj_out are 1x1 convs, SD 2.x's linears; files carry either)."""
    out = dict(module)
    for k in lora.WEIGHTS:
        x = module.get(k)
        if x is None:
            continue
        if weight.ndim == 2 and x.ndim == 4 and tuple(x.shape[2:]) == (1, 1):
            out[k] = x[:, :, 0, 0]
        elif weight.ndim == 4 and tuple(weight.shape[2:]) == (1, 1) and x.ndim == 2:
            out[k] = x[:, :, None, None]
    return out


def _finish(found: dict[str, dict], params: dict, path: str, unmatched: list[str]) -> dict:
    """The LoRA tree of {module path: parts}, alpha defaulting to the rank; strict."""
    if unmatched:
        raise files.CheckpointError(f"{path}: LoRA keys that name no module of the model: "
                                    f"{files.first(unmatched)}")
    if not found:
        raise files.CheckpointError(f"{path}: no LoRA tensors")
    weights = _weights(params)
    flat = {}
    for m, parts in found.items():
        half = [k for k in lora.WEIGHTS if k not in parts]
        if half:
            raise files.CheckpointError(f"{path}: LoRA module {m} has no {' and '.join(half)}")
        parts = _fit(parts, weights[m])
        parts.setdefault("alpha", torch.tensor(float(parts["lora_A"].shape[0])))
        for k, v in parts.items():
            flat[f"{m}/{k}"] = v.float().reshape(()) if k == "alpha" else v
    out = tree.unflatten(flat)
    try:
        lora.check(params, out)
    except lora.LoRAError as e:
        raise files.CheckpointError(f"{path}: {e}") from e
    return out


def _te_module(rest: str) -> str:
    return rest if rest.startswith(_TE + ".") else f"{_TE}.{rest}"


def _read_diffusers(sd: dict, meta: dict, params: dict, path: str) -> dict:
    weights = _weights(params)
    config = json.loads(meta[METADATA_KEY]) if meta.get(METADATA_KEY) else {}
    found, unmatched = {}, []
    for key, v in sd.items():
        m = _PEFT.match(key)
        if m is None:
            if not key.endswith(".alpha"):  # diffusers' older network alphas: read below
                unmatched.append(key)
            continue
        section, rest, part = m[1], m[2], m[3]
        rest = _te_module(rest) if section == "text_encoder" else rest
        module = f"{section}/{rest.replace('.', '/')}"
        if module not in weights:
            unmatched.append(key)
            continue
        found.setdefault(module, {})[part] = v
    for module, parts in found.items():
        alpha = _peft_alpha(config, module, sd)
        if alpha is not None:
            parts["alpha"] = torch.tensor(float(alpha))
    return _finish(found, params, path, unmatched)


def _peft_alpha(config: dict, module: str, sd: dict):
    """A module's alpha from the adapter metadata (alpha_pattern, then lora_alpha) or an
    `<prefix>.<module>.alpha` tensor; None = the rank."""
    section, _, rest = module.partition("/")
    dotted = rest.replace("/", ".")
    names = {dotted, dotted.removeprefix(_TE + ".")}
    for name in names:
        if f"{section}.{name}.alpha" in sd:
            return sd[f"{section}.{name}.alpha"].item()
    pattern = config.get(f"{section}.alpha_pattern") or {}
    for key, value in pattern.items():
        if any(re.fullmatch(rf"(.*\.)?({key})", n) for n in names):
            return value
    return config.get(f"{section}.lora_alpha")


def _read_kohya(sd: dict, params: dict, path: str) -> dict:
    names = kohya_names(params)
    found, unmatched = {}, []
    for key, v in sd.items():
        m = _KOHYA.match(key)
        module = names.get(m[1]) if m else None
        if module is None:
            unmatched.append(key)
            continue
        found.setdefault(module, {})[_KOHYA_PART[m[2]]] = v
    return _finish(found, params, path, unmatched)


def detect(keys) -> str:
    keys = list(keys)
    if keys and all(k.startswith(tuple(_PREFIX.values())) for k in keys):
        return "kohya"
    return "diffusers"


def read(path: str, params: dict) -> dict:
    """The LoRA tree of a diffusers/PEFT or kohya file, checked against params
    ({"unet", ["text_encoder"], ...}: the model it will be applied to)."""
    path = os.fspath(path)
    sd, meta = files.read_tensors(path)
    if detect(sd) == "kohya":
        return _read_kohya(sd, params, path)
    return _read_diffusers(sd, meta or {}, params, path)


# ------------------------------------------------------------------------------ writing


def _sections(lora_params: dict) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for module, parts in lora.modules(lora_params).items():
        section, _, rest = module.partition("/")
        if section not in _PREFIX:
            raise files.CheckpointError(f"LoRA module {module}: only unet/ and text_encoder/ modules have file names")
        out.setdefault(section, {})[rest] = parts
    return out


def _most_common(values: dict):
    counts: dict = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=counts.get)


def _adapter_config(section: str, mods: dict[str, dict]) -> dict:
    """PEFT LoraConfig fields for one prefix: r and lora_alpha (the most common ones) with
    patterns for the modules that differ, and the target modules."""
    dotted = {m.replace("/", "."): parts for m, parts in mods.items()}
    ranks = {m: int(p["lora_A"].shape[0]) for m, p in dotted.items()}
    alphas = {m: float(p["alpha"]) for m, p in dotted.items()}
    r, alpha = _most_common(ranks), _most_common(alphas)
    peft = lambda m: m.removeprefix(_TE + ".") if section == "text_encoder" else m  # a suffix of PEFT's names
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(peft(m) for m in dotted),
            "rank_pattern": {re.escape(peft(m)): v for m, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(peft(m)): v for m, v in alphas.items() if v != alpha},
            "use_dora": False, "lora_bias": False}


def to_diffusers(lora_params: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) in diffusers' LoRA format."""
    sd, config = {}, {}
    for section, mods in _sections(lora_params).items():
        for rest, parts in mods.items():
            name = rest.replace("/", ".")
            for k in lora.WEIGHTS:
                sd[f"{section}.{name}.{k}.weight"] = parts[k].detach().contiguous()
        config.update({f"{section}.{k}": v for k, v in _adapter_config(section, mods).items()})
    return sd, {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def to_kohya(lora_params: dict) -> dict[str, torch.Tensor]:
    """The kohya-ss state dict (diffusers module names, "." -> "_")."""
    sd = {}
    for section, mods in _sections(lora_params).items():
        for rest, parts in mods.items():
            name = _PREFIX[section] + rest.replace("/", "_")
            sd[name + ".lora_down.weight"] = parts["lora_A"].detach().contiguous()
            sd[name + ".lora_up.weight"] = parts["lora_B"].detach().contiguous()
            sd[name + ".alpha"] = parts["alpha"].detach().float().reshape(())
    return sd


def save(lora_params: dict, path: str, format: str = "diffusers") -> None:
    """Write a LoRA tree as a .safetensors file (atomically) in `format`."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise files.CheckpointError(f"{path}: LoRA files are written as .safetensors")
    if format == "diffusers":
        sd, meta = to_diffusers(lora_params)
    elif format == "kohya":
        sd, meta = to_kohya(lora_params), {"format": "pt"}
    else:
        raise files.CheckpointError(f"{path}: unknown LoRA format {format!r}; one of {FORMATS}")
    files.write_safetensors({k: v.cpu() for k, v in sd.items()}, path, metadata=meta)
