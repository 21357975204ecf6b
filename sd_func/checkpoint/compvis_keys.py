"""Parameter names of the original latent-diffusion code (CompVis / Stability) vs diffusers'.

Rombach et al. 2022's LDM checkpoints name the UNet `model.diffusion_model.*`
(openaimodel.py: input_blocks / middle_block / output_blocks, time_embed, out), the
autoencoder `first_stage_model.*` (encoder.down.N.block.M, mid.attn_1 with 1x1-conv
q/k/v/proj_out, nin_shortcut) and the text encoder `cond_stage_model.*`: transformers'
CLIPTextModel under `transformer.` for SD 1.x, OpenCLIP's text tower under `model.` for
SD 2.x (fused attention in_proj, ln_1/ln_2, mlp.c_fc/c_proj, positional_embedding).
Each `*_table(keys)` maps the diffusers state-dict names of one model (dotted) to an
`Entry`: the LDM name, which third of a fused q/k/v tensor it is, and whether the LDM
tensor is a 1x1 conv. The tables are built from the key set alone, so block counts,
per-block layer counts and which blocks attend come from the parameters themselves.
"""

import re
from typing import NamedTuple

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
OPENCLIP = "cond_stage_model.model."
EMA = "model_ema."
# Buffers of LDM's DDPM wrapper (recomputed from its config) and EMA bookkeeping: not weights.
DDPM_BUFFERS = frozenset((
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
))
# Text-encoder tensors that a CLIPTextModel does not have (SD never uses them).
TEXT_EXTRAS = frozenset((
    CLIP + "text_model.embeddings.position_ids", CLIP + "embeddings.position_ids",
    OPENCLIP + "text_projection", OPENCLIP + "logit_scale", OPENCLIP + "attn_mask",
))


class Entry(NamedTuple):
    ldm: str                 # full LDM name, prefix included
    part: int | None = None  # 0/1/2: q/k/v third of a fused OpenCLIP in_proj tensor
    conv: bool = False       # stored as a 1x1 conv [C, C, 1, 1] in the LDM file


def ema_name(ldm_unet_key: str) -> str:
    """LitEma's name for a UNet weight: model.diffusion_model.a.b -> model_ema.diffusion_modelab."""
    return EMA + "".join(ldm_unet_key.split(".")[1:])


def _unsupported(model: str, key: str):
    return ValueError(f"{model}: parameter {key!r} has no CompVis name (unsupported architecture)")


# ---------------------------------------------------------------------------- UNet

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def _blocks(keys, kind: str) -> dict[int, dict]:
    """{block: {"resnets": {j,...}, "attentions": {j,...}, "sampler": bool}} of down/up blocks."""
    out: dict[int, dict] = {}
    for k in keys:
        m = re.match(rf"{kind}_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.", k)
        if m:
            b = out.setdefault(int(m[1]), {"resnets": set(), "attentions": set(), "sampler": False})
            if m[2] in ("resnets", "attentions"):
                b[m[2]].add(int(m[3]))
            else:
                b["sampler"] = True
    return out


def unet_table(keys) -> dict[str, Entry]:
    """UNet2DConditionModel names -> openaimodel.UNetModel names (model.diffusion_model.*)."""
    keys = list(keys)
    down, up = _blocks(keys, "down"), _blocks(keys, "up")
    index, i = {}, 1  # ("down", block, layer) -> input_blocks index; ("ds", block) -> op index
    for b in sorted(down):
        for j in sorted(down[b]["resnets"]):
            index["down", b, j] = i
            i += 1
        if down[b]["sampler"]:
            index["ds", b] = i
            i += 1
    i = 0
    for b in sorted(up):
        for j in sorted(up[b]["resnets"]):
            index["up", b, j] = i
            i += 1
        index["us", b] = (i - 1, 2 if up[b]["attentions"] else 1)
    table = {}
    for k in keys:
        name = None
        for ours, ldm in _UNET_FIXED.items():
            if k.startswith(ours + "."):
                name = ldm + k[len(ours):]
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k)
        if m:
            kind, b, what, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            n = index[kind, b, j]
            prefix = "input_blocks" if kind == "down" else "output_blocks"
            name = f"{prefix}.{n}.0.{_resnet(rest)}" if what == "resnets" else f"{prefix}.{n}.1.{rest}"
        m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k)
        if m:
            name = f"input_blocks.{index['ds', int(m[1])]}.0.op.{m[2]}"
        m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k)
        if m:
            n, sub = index["us", int(m[1])]
            name = f"output_blocks.{n}.{sub}.conv.{m[2]}"
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", k)
        if m:
            name = (f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets"
                    else f"middle_block.{1 + 2 * int(m[2])}.{m[3]}")
        if name is None:
            raise _unsupported("unet", k)
        table[k] = Entry(UNET + name)
    return table


# ----------------------------------------------------------------------------- VAE

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_table(keys) -> dict[str, Entry]:
    """AutoencoderKL names -> ldm.modules.diffusionmodules.model names (first_stage_model.*)."""
    keys = list(keys)
    n_up = len({m[1] for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    table = {}
    for k in keys:
        conv = False
        name = None
        if re.match(r"(post_)?quant_conv\.|(en|de)coder\.conv_(in|out)\.", k):
            name = k
        elif m := re.match(r"(en|de)coder\.conv_norm_out\.(.+)", k):
            name = f"{m[1]}coder.norm_out.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            name = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}".replace("conv_shortcut", "nin_shortcut")
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            name = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            name = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}".replace("conv_shortcut", "nin_shortcut")
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
            name = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(en|de)coder\.mid_block\.resnets\.(\d)\.(.+)", k):
            name = f"{m[1]}coder.mid.block_{int(m[2]) + 1}.{m[3]}".replace("conv_shortcut", "nin_shortcut")
        elif m := re.match(r"(en|de)coder\.mid_block\.attentions\.0\."
                           r"(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", k):
            name = f"{m[1]}coder.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            conv = m[2] != "group_norm" and m[3] == "weight"
        if name is None:
            raise _unsupported("vae", k)
        table[k] = Entry(VAE + name, conv=conv)
    return table


# -------------------------------------------------------------------- text encoders


def clip_table(keys) -> dict[str, Entry]:
    """CLIPTextModel names ("text_model.*") -> SD 1.x's cond_stage_model.transformer.text_model.*."""
    return {k: Entry(CLIP + k) for k in keys}


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_FIXED = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def openclip_table(keys) -> dict[str, Entry]:
    """CLIPTextModel names ("text_model.*") -> SD 2.x's OpenCLIP names (cond_stage_model.model.*)."""
    table = {}
    for k in keys:
        s = k.removeprefix("text_model.")
        name, part = _OPENCLIP_FIXED.get(s), None
        if m := re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", s):
            layer, mod, wb = m[1], m[2], m[3]
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                name, part = f"transformer.resblocks.{layer}.attn.in_proj_{wb}", "qkv".index(mod[10])
            elif mod in _OPENCLIP_LAYER:
                name = f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[mod]}.{wb}"
        if name is None:
            raise _unsupported("text_encoder (OpenCLIP layout)", k)
        table[k] = Entry(OPENCLIP + name, part=part)
    return table


def openclip_layers(ldm_keys) -> int:
    """The number of transformer.resblocks in an OpenCLIP text tower."""
    block = re.compile(re.escape(OPENCLIP) + r"transformer\.resblocks\.(\d+)\.")
    found = {int(m[1]) for k in ldm_keys if (m := block.match(k))}
    return max(found) + 1 if found else 0
