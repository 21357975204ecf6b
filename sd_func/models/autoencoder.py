"""AutoencoderKL, the KL-regularised image autoencoder of latent diffusion, as pure functions.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(sec. 3.1, app. G): a conv encoder maps images in [-1, 1] to the mean and log-variance
of a diagonal Gaussian over a latent 8x smaller (SD: 4 channels), a conv decoder maps a
latent back. Both are stacks of pre-norm ResNet blocks with one single-head self-attention
block in the middle. Parameter paths are diffusers' AutoencoderKL state-dict names
("encoder/down_blocks/0/resnets/0/conv1/weight", "decoder/mid_block/attentions/0/to_q/weight"),
so a diffusers state dict is a params tree. `decode` takes the VAE's own latent: the
scaling factor (0.18215 for SD) is applied by the pipelines, as diffusers does.
"""

import ml_collections
import torch
import torch.nn.functional as F

from sd_func import nn, random
from sd_func.errors import UserError

_EPS = 1e-6  # every GroupNorm of the SD autoencoder uses eps=1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # the clamp of diffusers' DiagonalGaussianDistribution

_DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
    force_upcast=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)
# AutoencoderKL config.json keys that carry no architecture or that must keep a fixed value.
_IGNORED = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
_MUST_BE = dict(shift_factor=None, latents_mean=None, latents_std=None)


def config(**overrides) -> ml_collections.ConfigDict:
    """The SD 1.x / 2.x AutoencoderKL; field names are diffusers' config.json names."""
    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise UserError(f"autoencoder.config: unknown field(s) {unknown}; known: {sorted(_DEFAULTS)}")
    c = ml_collections.ConfigDict(dict(_DEFAULTS))
    c.update(overrides)
    _check(c)
    return c


def _check(c) -> None:
    n = len(c.block_out_channels)
    if tuple(c.down_block_types) != ("DownEncoderBlock2D",) * n:
        raise UserError(f"vae.down_block_types: only {n} x 'DownEncoderBlock2D' is supported, "
                         f"got {tuple(c.down_block_types)}")
    if tuple(c.up_block_types) != ("UpDecoderBlock2D",) * n:
        raise UserError(f"vae.up_block_types: only {n} x 'UpDecoderBlock2D' is supported, "
                         f"got {tuple(c.up_block_types)}")
    if c.act_fn not in nn.ACTIVATIONS:
        raise UserError(f"vae.act_fn: {c.act_fn!r} is not supported; one of {sorted(nn.ACTIVATIONS)}")
    bad = [ch for ch in c.block_out_channels if ch % c.norm_num_groups]
    if bad:
        raise UserError(f"vae.block_out_channels {tuple(c.block_out_channels)}: {bad} not divisible "
                         f"by norm_num_groups={c.norm_num_groups}")


def from_diffusers_config(d: dict) -> ml_collections.ConfigDict:
    """cfg from an AutoencoderKL config.json dict (a diffusers `vae/config.json`)."""
    d = dict(d)
    name = d.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise UserError(f"vae config: _class_name {name!r} is not supported (AutoencoderKL only)")
    for k, want in _MUST_BE.items():
        if d.get(k) != want:
            raise UserError(f"vae config: {k}={d[k]!r} is not supported (SD 1.x/2.x use {want!r})")
    out = {}
    for k, v in d.items():
        if k in _IGNORED or k in _MUST_BE:
            continue
        if k not in _DEFAULTS:
            raise UserError(f"vae config: key {k!r} is not supported by sd_func.models.autoencoder")
        out[k] = tuple(v) if isinstance(v, list) else v
    if isinstance(out.get("sample_size"), tuple):
        out["sample_size"] = out["sample_size"][0]
    return config(**out)


def to_diffusers_config(cfg) -> dict:
    """The AutoencoderKL(**kwargs) / config.json dict for cfg."""
    d = {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in _DEFAULTS}
    return {"_class_name": "AutoencoderKL", **d, **_MUST_BE}


# ---------------------------------------------------------------------------- init


def _init_resnet(k, c_in: int, c_out: int) -> dict:
    k1, k2, k3 = random.split(k, 3)
    p = {"norm1": nn.init_norm(c_in), "conv1": nn.init_conv2d(k1, c_in, c_out),
         "norm2": nn.init_norm(c_out), "conv2": nn.init_conv2d(k2, c_out, c_out)}
    if c_in != c_out:
        p["conv_shortcut"] = nn.init_conv2d(k3, c_in, c_out, kernel=1)
    return p


def _init_attention(k, c: int) -> dict:
    kq, kk, kv, ko = random.split(k, 4)
    return {"group_norm": nn.init_norm(c), "to_q": nn.init_linear(kq, c, c),
            "to_k": nn.init_linear(kk, c, c), "to_v": nn.init_linear(kv, c, c),
            "to_out": {"0": nn.init_linear(ko, c, c)}}


def _init_mid(k, c: int, attention: bool) -> dict:
    k0, k1, ka = random.split(k, 3)
    p = {"resnets": {"0": _init_resnet(k0, c, c), "1": _init_resnet(k1, c, c)}}
    if attention:
        p["attentions"] = {"0": _init_attention(ka, c)}
    return p


def _init_encoder(k, cfg) -> dict:
    ch = tuple(cfg.block_out_channels)
    k_in, k_mid, k_out, k_blocks = random.split(k, 4)
    p = {"conv_in": nn.init_conv2d(k_in, cfg.in_channels, ch[0]), "down_blocks": {}}
    c_prev = ch[0]
    for i, c in enumerate(ch):
        kb = random.fold_in(k_blocks, i)
        block = {"resnets": {str(j): _init_resnet(random.fold_in(kb, j), c_prev if j == 0 else c, c)
                             for j in range(cfg.layers_per_block)}}
        if i < len(ch) - 1:
            block["downsamplers"] = {"0": {"conv": nn.init_conv2d(random.fold_in(kb, 99), c, c)}}
        p["down_blocks"][str(i)] = block
        c_prev = c
    p["mid_block"] = _init_mid(k_mid, ch[-1], cfg.mid_block_add_attention)
    p["conv_norm_out"] = nn.init_norm(ch[-1])
    p["conv_out"] = nn.init_conv2d(k_out, ch[-1], 2 * cfg.latent_channels)
    return p


def _init_decoder(k, cfg) -> dict:
    ch = tuple(reversed(cfg.block_out_channels))
    k_in, k_mid, k_out, k_blocks = random.split(k, 4)
    p = {"conv_in": nn.init_conv2d(k_in, cfg.latent_channels, ch[0]),
         "mid_block": _init_mid(k_mid, ch[0], cfg.mid_block_add_attention), "up_blocks": {}}
    c_prev = ch[0]
    for i, c in enumerate(ch):
        kb = random.fold_in(k_blocks, i)
        block = {"resnets": {str(j): _init_resnet(random.fold_in(kb, j), c_prev if j == 0 else c, c)
                             for j in range(cfg.layers_per_block + 1)}}
        if i < len(ch) - 1:
            block["upsamplers"] = {"0": {"conv": nn.init_conv2d(random.fold_in(kb, 99), c, c)}}
        p["up_blocks"][str(i)] = block
        c_prev = c
    p["conv_norm_out"] = nn.init_norm(ch[-1])
    p["conv_out"] = nn.init_conv2d(k_out, ch[-1], cfg.out_channels)
    return p


def init(key, cfg) -> dict:
    """Random params with torch.nn's default init (norms weight 1, bias 0)."""
    ke, kd, kq, kp = random.split(key, 4)
    p = {"encoder": _init_encoder(ke, cfg), "decoder": _init_decoder(kd, cfg)}
    if cfg.use_quant_conv:
        p["quant_conv"] = nn.init_conv2d(kq, 2 * cfg.latent_channels, 2 * cfg.latent_channels, kernel=1)
    if cfg.use_post_quant_conv:
        p["post_quant_conv"] = nn.init_conv2d(kp, cfg.latent_channels, cfg.latent_channels, kernel=1)
    return p


# --------------------------------------------------------------------------- apply


def _resnet(p: dict, x, groups: int, act) -> torch.Tensor:
    h = nn.conv2d(p["conv1"], act(nn.group_norm(p["norm1"], x, groups, _EPS)))
    h = nn.conv2d(p["conv2"], act(nn.group_norm(p["norm2"], h, groups, _EPS)))
    if "conv_shortcut" in p:
        x = nn.conv2d(p["conv_shortcut"], x)
    return x + h


def _attention(p: dict, x, groups: int) -> torch.Tensor:
    """Single-head self-attention over the H*W positions, with a residual."""
    b, c, height, width = x.shape
    h = nn.group_norm(p["group_norm"], x, groups, _EPS).reshape(b, c, height * width).transpose(1, 2)
    q, k, v = nn.linear(p["to_q"], h), nn.linear(p["to_k"], h), nn.linear(p["to_v"], h)
    h = nn.linear(p["to_out"]["0"], nn.attention(q, k, v, heads=1))
    return x + h.transpose(1, 2).reshape(b, c, height, width)


def _mid(p: dict, x, groups: int, act) -> torch.Tensor:
    x = _resnet(p["resnets"]["0"], x, groups, act)
    if "attentions" in p:
        x = _attention(p["attentions"]["0"], x, groups)
    return _resnet(p["resnets"]["1"], x, groups, act)


def _check_input(name: str, x, channels: int, p_conv: dict) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"autoencoder.{name}: expected [B,{channels},H,W], got {tuple(x.shape)}")
    return x.to(p_conv["weight"].dtype)


def encode(p: dict, images: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """images [B,3,H,W] in [-1,1] -> (mean, logvar), each [B,latent_channels,H/f,W/f].

    f = 2**(len(block_out_channels)-1); logvar is clamped to [-30, 20] as in diffusers.
    """
    e, g, act = p["encoder"], cfg.norm_num_groups, nn.ACTIVATIONS[cfg.act_fn]
    x = nn.conv2d(e["conv_in"], _check_input("encode", images, cfg.in_channels, e["conv_in"]))
    for i in range(len(cfg.block_out_channels)):
        block = e["down_blocks"][str(i)]
        for j in range(cfg.layers_per_block):
            x = _resnet(block["resnets"][str(j)], x, g, act)
        if "downsamplers" in block:
            # Asymmetric (right/bottom) zero padding before a stride-2 conv, as in LDM.
            x = nn.conv2d(block["downsamplers"]["0"]["conv"], F.pad(x, (0, 1, 0, 1)), stride=2, padding=0)
    x = _mid(e["mid_block"], x, g, act)
    x = nn.conv2d(e["conv_out"], act(nn.group_norm(e["conv_norm_out"], x, g, _EPS)))
    if "quant_conv" in p:
        x = nn.conv2d(p["quant_conv"], x)
    mean, logvar = x.chunk(2, dim=1)
    return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw from N(mean, exp(logvar)) given standard-normal noise of the same shape."""
    return mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)


def decode(p: dict, z: torch.Tensor, cfg) -> torch.Tensor:
    """z [B,latent_channels,h,w] (unscaled) -> images [B,3,h*f,w*f], roughly in [-1,1] (not clipped)."""
    d, g, act = p["decoder"], cfg.norm_num_groups, nn.ACTIVATIONS[cfg.act_fn]
    conv0 = p["post_quant_conv"] if "post_quant_conv" in p else d["conv_in"]
    z = _check_input("decode", z, cfg.latent_channels, conv0)
    if "post_quant_conv" in p:
        z = nn.conv2d(p["post_quant_conv"], z)
    x = _mid(d["mid_block"], nn.conv2d(d["conv_in"], z), g, act)
    for i in range(len(cfg.block_out_channels)):
        block = d["up_blocks"][str(i)]
        for j in range(cfg.layers_per_block + 1):
            x = _resnet(block["resnets"][str(j)], x, g, act)
        if "upsamplers" in block:
            x = nn.conv2d(block["upsamplers"]["0"]["conv"], F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return nn.conv2d(d["conv_out"], act(nn.group_norm(d["conv_norm_out"], x, g, _EPS)))
