"""The Stable Diffusion 1.x / 2.x UNet (diffusers' UNet2DConditionModel) as a pure function.

The latent diffusion denoiser of Rombach et al. 2022 ("High-Resolution Image Synthesis
with Latent Diffusion Models"): a UNet of time-conditioned ResNet blocks with spatial
transformers that cross-attend to the text encoder's hidden states. `apply(params, x, t,
context, cfg)` maps a noisy latent x [B,C,H,W], timesteps t and text context [B,77,D] to
the model output (eps or v) of x's shape and dtype. Params are nested dicts whose
"/"-joined paths are UNet2DConditionModel's state-dict names; cfg fields are its
config.json names (plus `head_dim`, an sd_func extension: heads = channels // head_dim).

Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost"): `apply(..., remat=)` runs the ResNet blocks, the spatial transformers or both
("resnets", "attention", "all") through torch.utils.checkpoint (non-reentrant), so that
autograd keeps only each block's inputs and recomputes its inside during backward. The
outputs and gradients are those of remat="none"; only peak memory and time change.
"""

from typing import Any

import ml_collections
import torch
import torch.utils.checkpoint

from sd_func import nn, random
from sd_func.errors import UserError
from sd_func.models import unet_blocks as blocks

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn",)
ACT_FNS = ("silu", "swish", "gelu")
REMAT = ("none", "attention", "resnets", "all")   # which blocks apply(..., remat=) recomputes

_DEFAULTS = dict(  # Stable Diffusion 1.5
    in_channels=4, out_channels=4, sample_size=64,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8,       # diffusers' misnomer: the head COUNT (num_attention_heads None)
    num_attention_heads=None,   # the head count, when given
    head_dim=None,              # sd_func extension: channels per head (SD 2.x: 64)
    cross_attention_dim=768, use_linear_projection=False, transformer_layers_per_block=1,
    upcast_attention=False,     # fp32 attention logits; SDPA always does so (see unet_blocks)
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1.0,
    center_input_sample=False,
)
_FLOATS = ("norm_eps", "mid_block_scale_factor")

# UNet2DConditionModel options that sd_func supports only at the value SD 1.x/2.x uses.
_FIXED = dict(
    only_cross_attention=False, dual_cross_attention=False, dropout=0.0,
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    class_embed_type=None, num_class_embeds=None, class_embeddings_concat=False,
    projection_class_embeddings_input_dim=None, addition_embed_type=None,
    addition_time_embed_dim=None, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None,
    conv_in_kernel=3, conv_out_kernel=3, attention_type="default",
    mid_block_only_cross_attention=None, cross_attention_norm=None,
)
_IGNORED = ("addition_embed_type_num_heads",)  # meaningless without addition_embed_type


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


def config(**overrides) -> ml_collections.ConfigDict:
    """UNet config (UNet2DConditionModel's field names); defaults are SD 1.5."""
    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise UserError(f"unet.config: unknown field(s) {unknown}; known: {sorted(_DEFAULTS)}")
    d = {**_DEFAULTS, **{k: _tuplify(v) for k, v in overrides.items()}}
    for k in _FLOATS:
        d[k] = float(d[k])
    cfg = ml_collections.ConfigDict(d)
    _plan(cfg)  # validates
    return cfg


def _is_fixed_value(k: str, v) -> bool:
    """v means the same as _FIXED[k] (a per-block tuple of it; False for an unset None flag)."""
    fixed = _FIXED[k]
    if isinstance(v, tuple) and not isinstance(fixed, tuple):
        return all(_is_fixed_value(k, x) for x in v)
    return v == fixed or (k == "mid_block_only_cross_attention" and v is False)


def from_diffusers_config(d: dict) -> ml_collections.ConfigDict:
    """A UNet2DConditionModel config.json dict -> cfg; ValueError naming any unsupported key."""
    fields = {}
    for k, v in dict(d).items():
        if k.startswith("_") or k in _IGNORED:
            continue
        v = _tuplify(v)
        if k in _FIXED:
            if not _is_fixed_value(k, v):
                raise UserError(f"unet.from_diffusers_config: {k}={v!r} is not supported "
                                 f"(only {_FIXED[k]!r}, as in Stable Diffusion 1.x/2.x)")
        elif k in _DEFAULTS and k != "head_dim":
            fields[k] = v
        else:
            raise UserError(f"unet.from_diffusers_config: unknown UNet2DConditionModel key {k!r}")
    return config(**fields)


def to_diffusers_config(cfg) -> dict:
    """The UNet2DConditionModel(**kwargs) that rebuilds this UNet (head counts resolved)."""
    out = {k: cfg[k] for k in _DEFAULTS if k not in ("head_dim", "num_attention_heads")}
    if cfg.head_dim is not None or cfg.num_attention_heads is not None:
        # diffusers refuses num_attention_heads; attention_head_dim carries the head counts.
        out["attention_head_dim"] = tuple(_plan(cfg)["heads"])
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _per_block(cfg, name: str, n: int) -> tuple:
    v = cfg[name]
    if isinstance(v, int):
        return (v,) * n
    if len(v) != n or not all(isinstance(x, int) for x in v):
        raise UserError(f"unet config: {name}={v!r} must be an int or {n} ints (one per block)")
    return tuple(v)


def _plan(cfg) -> dict:
    """Per-block settings resolved from cfg (heads, layers, ...); ValueError on a bad config."""
    n = len(cfg.block_out_channels)
    for name, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
        types = tuple(cfg[name])
        if len(types) != n:
            raise UserError(f"unet config: {name} has {len(types)} entries, block_out_channels {n}")
        bad = [t for t in types if t not in allowed]
        if bad:
            raise UserError(f"unet config: {name} {bad} not supported (only {allowed})")
    if cfg.mid_block_type not in MID_TYPES:
        raise UserError(f"unet config: mid_block_type={cfg.mid_block_type!r} not supported (only {MID_TYPES})")
    if cfg.act_fn not in ACT_FNS:
        raise UserError(f"unet config: act_fn={cfg.act_fn!r} not supported (only {ACT_FNS})")
    channels = tuple(cfg.block_out_channels)
    if cfg.head_dim is not None:
        bad = [c for c in channels if c % cfg.head_dim]
        if bad:
            raise UserError(f"unet config: head_dim={cfg.head_dim} does not divide channels {bad}")
        heads = tuple(c // cfg.head_dim for c in channels)
    else:
        name = "num_attention_heads" if cfg.num_attention_heads is not None else "attention_head_dim"
        heads = _per_block(cfg, name, n)
    bad = [(c, h) for c, h in zip(channels, heads) if h <= 0 or c % h]
    if bad:
        raise UserError(f"unet config: head counts must divide block_out_channels, got (channels, heads) {bad}")
    bad = [c for c in channels if c % cfg.norm_num_groups]
    if bad:
        raise UserError(f"unet config: norm_num_groups={cfg.norm_num_groups} does not divide channels {bad}")
    return dict(channels=channels, heads=heads,
                layers=_per_block(cfg, "layers_per_block", n),
                tlayers=_per_block(cfg, "transformer_layers_per_block", n),
                context_dims=_per_block(cfg, "cross_attention_dim", n),
                down_attn=tuple(t.startswith("CrossAttn") for t in cfg.down_block_types),
                up_attn=tuple(t.startswith("CrossAttn") for t in cfg.up_block_types))


def init(key: int, cfg, dtype=torch.float32) -> dict:
    """Random params (torch's default Linear/Conv2d init, norms at 1/0), diffusers' names."""
    plan = _plan(cfg)
    ch, n = plan["channels"], len(plan["channels"])
    temb = 4 * ch[0]
    k_in, k_time, k_down, k_mid, k_up, k_out = random.split(key, 6)
    k1, k2 = random.split(k_time)
    p = {"conv_in": nn.init_conv2d(k_in, cfg.in_channels, ch[0], dtype=dtype),
         "time_embedding": {"linear_1": nn.init_linear(k1, ch[0], temb, dtype=dtype),
                            "linear_2": nn.init_linear(k2, temb, temb, dtype=dtype)}}

    def attn(k, c, i):
        return blocks.init_transformer_2d(k, c, plan["context_dims"][i], plan["tlayers"][i],
                                          cfg.use_linear_projection, dtype)

    p["down_blocks"] = {}
    c_prev = ch[0]
    for i in range(n):
        kb = random.fold_in(k_down, i)
        b = {"resnets": {}}
        if plan["down_attn"][i]:
            b["attentions"] = {}
        for j in range(plan["layers"][i]):
            kr, ka = random.split(random.fold_in(kb, j))
            b["resnets"][str(j)] = blocks.init_resnet(kr, c_prev if j == 0 else ch[i], ch[i], temb, dtype)
            if plan["down_attn"][i]:
                b["attentions"][str(j)] = attn(ka, ch[i], i)
        if i < n - 1:
            b["downsamplers"] = {"0": blocks.init_resample(random.fold_in(kb, 1000), ch[i], dtype)}
        p["down_blocks"][str(i)] = b
        c_prev = ch[i]

    km = random.split(k_mid, 3)
    p["mid_block"] = {"resnets": {"0": blocks.init_resnet(km[0], ch[-1], ch[-1], temb, dtype),
                                  "1": blocks.init_resnet(km[1], ch[-1], ch[-1], temb, dtype)},
                      "attentions": {"0": attn(km[2], ch[-1], n - 1)}}

    p["up_blocks"] = {}
    rch = ch[::-1]
    for i in range(n):
        r = n - 1 - i  # the down block this up block mirrors
        kb = random.fold_in(k_up, i)
        b = {"resnets": {}}
        if plan["up_attn"][i]:
            b["attentions"] = {}
        num = plan["layers"][r] + 1
        for j in range(num):
            c_in = rch[i - 1] if (j == 0 and i > 0) else rch[i]
            c_skip = rch[min(i + 1, n - 1)] if j == num - 1 else rch[i]
            kr, ka = random.split(random.fold_in(kb, j))
            b["resnets"][str(j)] = blocks.init_resnet(kr, c_in + c_skip, rch[i], temb, dtype)
            if plan["up_attn"][i]:
                b["attentions"][str(j)] = attn(ka, rch[i], r)
        if i < n - 1:
            b["upsamplers"] = {"0": blocks.init_resample(random.fold_in(kb, 1000), rch[i], dtype)}
        p["up_blocks"][str(i)] = b

    p["conv_norm_out"] = nn.init_norm(ch[0], dtype)
    p["conv_out"] = nn.init_conv2d(k_out, ch[0], cfg.out_channels, dtype=dtype)
    return p


def _timesteps(t, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"unet.apply: t must be a number, a 0-d tensor or shape [{batch}], got {tuple(t.shape)}")
    return t.expand(batch)


def _remat(fn, on: bool):
    """fn, or fn through non-reentrant activation checkpointing."""
    if not on:
        return fn
    return lambda *args: torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def apply(params: dict, x: torch.Tensor, t: Any, context: torch.Tensor, cfg, remat: str = "none") -> torch.Tensor:
    """UNet output (eps or v) for noisy latents x [B,C,H,W] at timesteps t given context [B,L,D].

    t: a Python number, a 0-d tensor or a [B] tensor, integer or fractional. Computation
    runs in the params' dtype; the result has x's shape (out_channels) and dtype.
    remat: one of REMAT, the blocks whose activations are recomputed in backward (autograd,
    also under torch.compile; torch.func transforms do not support it in torch 2.13).
    """
    if remat not in REMAT:
        raise UserError(f"unet.apply: remat={remat!r}: expected one of {REMAT}")
    resnet = _remat(blocks.resnet, remat in ("resnets", "all"))
    transformer = _remat(blocks.transformer_2d, remat in ("attention", "all"))
    plan = _plan(cfg)
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"unet.apply: x must be [B,{cfg.in_channels},H,W], got {tuple(x.shape)}")
    if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] not in plan["context_dims"]:
        raise ValueError(f"unet.apply: context must be [{x.shape[0]},L,{plan['context_dims'][0]}], "
                         f"got {tuple(context.shape)}")
    dtype = params["conv_in"]["weight"].dtype
    act = nn.ACTIVATIONS[cfg.act_fn]
    groups, eps, n = cfg.norm_num_groups, cfg.norm_eps, len(plan["channels"])

    def attn(p, h, i):
        return transformer(p, h, context, plan["heads"][i], plan["tlayers"][i], groups)

    # Time embedding: sinusoids in float32, MLP in the params' dtype; every resnet sees act(emb).
    t_freq = nn.timestep_embedding(_timesteps(t, x.shape[0], x.device), plan["channels"][0],
                                   cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype)
    te = params["time_embedding"]
    temb = act(nn.linear(te["linear_2"], act(nn.linear(te["linear_1"], t_freq))))

    context = context.to(dtype)
    h = x.to(dtype)
    if cfg.center_input_sample:
        h = 2 * h - 1.0
    h = nn.conv2d(params["conv_in"], h)

    skips = [h]
    for i in range(n):
        b = params["down_blocks"][str(i)]
        for j in range(plan["layers"][i]):
            h = resnet(b["resnets"][str(j)], h, temb, groups, eps, act)
            if plan["down_attn"][i]:
                h = attn(b["attentions"][str(j)], h, i)
            skips.append(h)
        if i < n - 1:
            h = blocks.downsample(b["downsamplers"]["0"], h, cfg.downsample_padding)
            skips.append(h)

    m, s = params["mid_block"], cfg.mid_block_scale_factor
    h = resnet(m["resnets"]["0"], h, temb, groups, eps, act, s)
    h = attn(m["attentions"]["0"], h, n - 1)
    h = resnet(m["resnets"]["1"], h, temb, groups, eps, act, s)

    for i in range(n):
        r = n - 1 - i
        b = params["up_blocks"][str(i)]
        for j in range(plan["layers"][r] + 1):
            h = torch.cat([h, skips.pop()], dim=1)
            h = resnet(b["resnets"][str(j)], h, temb, groups, eps, act)
            if plan["up_attn"][i]:
                h = attn(b["attentions"][str(j)], h, r)
        if i < n - 1:
            h = blocks.upsample(b["upsamplers"]["0"], h, skips[-1].shape[-2:])

    h = act(nn.group_norm(params["conv_norm_out"], h, groups, eps))
    return nn.conv2d(params["conv_out"], h).to(x.dtype)
