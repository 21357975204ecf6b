"""LoRA (Hu et al. 2021) and LoCon as pure transformations of a params tree.

A LoRA of a model is a tree that mirrors the modules it adapts: for the weight at path
"unet/.../attn1/to_q/weight" it holds, at "unet/.../attn1/to_q",

    {"lora_A": [r, in] (conv: [r, in, kh, kw]),   # random at init (torch.nn.Linear's)
     "lora_B": [out, r] (conv: [out, r, 1, 1]),   # zero at init: step 0 is the base model
     "alpha":  0-d float}                         # the update is (alpha / r) * B @ A

which are PEFT's names and kohya's `.alpha` (diffusers and kohya files: sd_func.checkpoint.
lora_files). `apply(params, lora_params, scale)` gives W + scale * alpha / r * B @ A for
every adapted weight (for a conv, the r-channel 1x1 B after the kh x kw A, as one
[out, in, kh, kw] kernel: LoCon), differentiably, so training takes gradients through it
with the base params frozen; several LoRAs compose by applying one after the other, each
with its own scale, and `merge` bakes a list of them in. Targets are regexes over the full
params paths (big_vision style); `TARGETS` names the usual sets.
"""

import math
import re
import zlib

import torch

from sd_func import random, tree

# Named target sets: the weights LoRA usually adapts (a regex over full params paths).
TARGETS = {
    "attn": r"unet/.*/(to_q|to_k|to_v|to_out/0)/weight",             # diffusers' default
    "te_attn": r"text_encoder/.*/self_attn/(q_proj|k_proj|v_proj|out_proj)/weight",
    "te_mlp": r"text_encoder/.*/mlp/(fc1|fc2)/weight",
    "conv": r"unet/(down_blocks|mid_block|up_blocks)/.*/(conv1|conv2|conv_shortcut|conv)/weight",  # LoCon
}
KEYS = ("lora_A", "lora_B", "alpha")
TREE, ALPHA_TREE = "lora", "lora_alpha"  # a LoRA training run's trained and frozen trees
WEIGHTS = ("lora_A", "lora_B")


class LoRAError(ValueError):
    """A LoRA that does not fit the model it is applied to."""


def target_regex(target: str) -> str:
    """A regex from a target spec: comma-separated names of TARGETS, or a regex itself."""
    names = [t.strip() for t in str(target).split(",") if t.strip()]
    if names and all(n in TARGETS for n in names):
        return "|".join(f"(?:{TARGETS[n]})" for n in names)
    return str(target)


def modules(lora_params: dict) -> dict[str, dict]:
    """{module path ("unet/.../to_q"): {"lora_A", "lora_B", "alpha"}} of a LoRA tree, in tree order."""
    out: dict[str, dict] = {}
    for path, v in tree.flatten(lora_params).items():
        module, _, name = path.rpartition("/")
        if name not in KEYS or not module:
            raise LoRAError(f"LoRA tree: leaf {path!r} is not one of {KEYS} of a module")
        out.setdefault(module, {})[name] = v
    return out


def init(key: int, params: dict, rank: int, alpha: float | None = None, target: str = "attn") -> dict:
    """A fresh LoRA of rank r on the weights of `params` whose paths match `target`.

    params: {"unet": ..., ["text_encoder": ...]} (paths as "unet/.../to_q/weight").
    alpha: the scale numerator (default rank: scale 1). A is drawn as torch.nn.Linear's
    weight (kaiming uniform, a=sqrt(5), as PEFT), one key per module path; B is zero.
    """
    rank = int(rank)
    if rank < 1:
        raise LoRAError(f"LoRA rank {rank}: expected >= 1")
    alpha = float(rank if alpha is None else alpha)
    pattern = re.compile(target_regex(target))
    flat = {}
    for path, w in tree.flatten(params).items():
        if not pattern.fullmatch(path):
            continue
        if not path.endswith("/weight") or w.ndim not in (2, 4):
            raise LoRAError(f"LoRA target {target!r} matches {path!r} {tuple(w.shape)}: not a linear or conv weight")
        module = path[: -len("/weight")]
        fan_in = math.prod(w.shape[1:])
        a_shape = (rank, *w.shape[1:])
        b_shape = (w.shape[0], rank) + ((1, 1) if w.ndim == 4 else ())
        k = random.fold_in(key, zlib.crc32(module.encode()))  # a module's A: its path's key alone
        flat[module + "/lora_A"] = random.uniform(k, a_shape, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        flat[module + "/lora_B"] = torch.zeros(b_shape)
        flat[module + "/alpha"] = torch.tensor(alpha)
    if not flat:
        raise LoRAError(f"LoRA target {target!r} matches no linear or conv weight of the model")
    return tree.unflatten(flat)


def delta(module: dict) -> torch.Tensor:
    """(alpha / r) * B @ A in the adapted weight's shape ([out, in] or [out, in, kh, kw])."""
    a, b = module["lora_A"], module["lora_B"]
    r = a.shape[0]
    d = b.reshape(b.shape[0], r) @ a.reshape(r, -1)
    return (module["alpha"] / r) * d.reshape(b.shape[0], *a.shape[1:])


def check(params: dict, lora_params: dict) -> None:
    """Raise LoRAError naming the first modules of lora_params that `params` lacks or that misfit."""
    flat = tree.flatten(params)
    missing, wrong = [], []
    for module, m in modules(lora_params).items():
        lacking = [k for k in KEYS if k not in m]
        w = flat.get(module + "/weight")
        if w is None or lacking:
            missing.append(module if w is None else f"{module} (no {', '.join(lacking)})")
            continue
        a, b = m["lora_A"], m["lora_B"]
        if a.ndim != w.ndim or b.ndim != w.ndim or tuple(a.shape[1:]) != tuple(w.shape[1:]) \
                or b.shape[0] != w.shape[0] or b.shape[1] != a.shape[0] or tuple(b.shape[2:]) not in ((), (1, 1)):
            wrong.append(f"{module}: A {tuple(a.shape)}, B {tuple(b.shape)} for weight {tuple(w.shape)}")
    if missing:
        raise LoRAError(f"LoRA modules not in the model: {missing[:3]} ({len(missing)} in all)")
    if wrong:
        raise LoRAError(f"LoRA shapes do not fit the model: {wrong[:3]} ({len(wrong)} in all)")


def apply(params: dict, lora_params: dict, scale: float = 1.0) -> dict:
    """params with W + scale * (alpha / r) * B @ A for each module of lora_params.

    Differentiable in both trees (training passes frozen base params and trained A, B);
    the adapted weights keep their dtype (the update is added in float32). Other leaves
    are the same tensors as in `params`.
    """
    check(params, lora_params)
    flat = dict(tree.flatten(params))
    for module, m in modules(lora_params).items():
        w = flat[module + "/weight"]
        flat[module + "/weight"] = (w.float() + float(scale) * delta(m).float()).to(w.dtype)
    return tree.unflatten(flat)


def merge(params: dict, loras) -> dict:
    """params with each (lora_params, scale) of `loras` baked in, in order (no gradients)."""
    with torch.no_grad():
        for lora_params, scale in loras:
            params = apply(params, tree.to(lora_params, device=_device(params)), scale)
    return params


def merge_trained(params: dict) -> dict:
    """Models with a training run's LoRA baked in: params {"unet", ..., ["lora": A/B tree,
    "lora_alpha": alpha tree]} (train.unet_stage) -> the models alone."""
    params = dict(params)
    if TREE not in params:
        return params
    lora_params = join(params.pop(TREE), params.pop(ALPHA_TREE))
    return merge(params, [(lora_params, 1.0)])


def _device(params: dict):
    return next(iter(tree.flatten(params).values())).device


def split(lora_params: dict) -> tuple[dict, dict]:
    """(the trained A, B tree, the alpha tree): training differentiates the first only."""
    flat = tree.flatten(lora_params)
    weights = {k: v for k, v in flat.items() if k.rpartition("/")[2] in WEIGHTS}
    alphas = {k: v for k, v in flat.items() if k.rpartition("/")[2] == "alpha"}
    return tree.unflatten(weights), tree.unflatten(alphas)


def join(weights: dict, alphas: dict) -> dict:
    """The LoRA tree of `split`'s two parts."""
    return tree.unflatten({**tree.flatten(weights), **tree.flatten(alphas)})


def rank_of(lora_params: dict) -> dict[str, int]:
    """{module path: rank}."""
    return {m: int(v["lora_A"].shape[0]) for m, v in modules(lora_params).items()}

