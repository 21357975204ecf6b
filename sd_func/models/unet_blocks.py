"""Building blocks of the Stable Diffusion UNet as pure functions (init_* / apply pairs).

The blocks of the latent diffusion UNet (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"): a time-conditioned ResNet block, a spatial
transformer (GroupNorm, 1x1-conv or linear projection, self-attention, cross-attention
on the text context, GEGLU feed-forward; Vaswani et al. 2017, Shazeer 2020), and the
strided-conv / nearest-neighbour resamplers. Parameter names follow diffusers'
ResnetBlock2D, Transformer2DModel, BasicTransformerBlock, Attention, FeedForward,
Downsample2D and Upsample2D, so diffusers weights load without renaming. Token
sequences are kept as [B, H*W, C] views of NHWC activations: with channels_last
inputs the transformer's entry and exit permutes are free.
"""

import torch
import torch.nn.functional as F

from sd_func import nn, random

# --- ResNet block -------------------------------------------------------------------


def init_resnet(k, c_in: int, c_out: int, temb_dim: int, dtype=torch.float32) -> dict:
    k1, k2, k3, k4 = random.split(k, 4)
    p = {"norm1": nn.init_norm(c_in, dtype), "conv1": nn.init_conv2d(k1, c_in, c_out, dtype=dtype),
         "time_emb_proj": nn.init_linear(k2, temb_dim, c_out, dtype=dtype),
         "norm2": nn.init_norm(c_out, dtype), "conv2": nn.init_conv2d(k3, c_out, c_out, dtype=dtype)}
    if c_in != c_out:
        p["conv_shortcut"] = nn.init_conv2d(k4, c_in, c_out, kernel=1, dtype=dtype)
    return p


def resnet(p: dict, x: torch.Tensor, temb_act: torch.Tensor, groups: int, eps: float,
           act_fn, out_scale: float = 1.0) -> torch.Tensor:
    """x [B,C,H,W]; temb_act = act(time embedding) [B,T], shared by every block."""
    h = act_fn(nn.group_norm(p["norm1"], x, groups, eps))
    h = nn.conv2d(p["conv1"], h)
    h = h + nn.linear(p["time_emb_proj"], temb_act)[:, :, None, None]
    h = act_fn(nn.group_norm(p["norm2"], h, groups, eps))
    h = nn.conv2d(p["conv2"], h)
    if "conv_shortcut" in p:
        x = nn.conv2d(p["conv_shortcut"], x)
    out = x + h
    return out if out_scale == 1.0 else out / out_scale


# --- Resampling -----------------------------------------------------------------------


def init_resample(k, c: int, dtype=torch.float32) -> dict:
    """Downsample2D / Upsample2D with use_conv: one 3x3 conv named "conv"."""
    return {"conv": nn.init_conv2d(k, c, c, dtype=dtype)}


def downsample(p: dict, x: torch.Tensor, padding: int = 1) -> torch.Tensor:
    if padding == 0:  # diffusers' asymmetric pad for padding=0 checkpoints
        x = F.pad(x, (0, 1, 0, 1))
    return nn.conv2d(p["conv"], x, stride=2, padding=padding)


def upsample(p: dict, x: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour upsampling to `size` (2x, or the skip's size for odd inputs), then conv."""
    return nn.conv2d(p["conv"], F.interpolate(x, size=tuple(size), mode="nearest"))


# --- Spatial transformer -----------------------------------------------------------------


def init_attention(k, dim: int, context_dim: int, dtype=torch.float32) -> dict:
    kq, kk, kv, ko = random.split(k, 4)
    return {"to_q": nn.init_linear(kq, dim, dim, bias=False, dtype=dtype),
            "to_k": nn.init_linear(kk, context_dim, dim, bias=False, dtype=dtype),
            "to_v": nn.init_linear(kv, context_dim, dim, bias=False, dtype=dtype),
            "to_out": {"0": nn.init_linear(ko, dim, dim, dtype=dtype)}}


def attention(p: dict, x: torch.Tensor, context: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of x [B,N,C] over context [B,M,D] (context = x for self-attention).

    scaled_dot_product_attention keeps the logits and softmax in float32 for half inputs in
    every backend (fused kernels accumulate in fp32; the math backend upcasts), which is
    what SD 2.1's `upcast_attention` asks for; an explicit cast would only slow it down.
    """
    q, k, v = nn.linear(p["to_q"], x), nn.linear(p["to_k"], context), nn.linear(p["to_v"], context)
    return nn.linear(p["to_out"]["0"], nn.attention(q, k, v, heads))


def init_feed_forward(k, dim: int, mult: int = 4, dtype=torch.float32) -> dict:
    k1, k2 = random.split(k)
    inner = dim * mult
    return {"net": {"0": {"proj": nn.init_linear(k1, dim, 2 * inner, dtype=dtype)},
                    "2": nn.init_linear(k2, inner, dim, dtype=dtype)}}


def feed_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    """GEGLU MLP: one projection to [value, gate], value * gelu(gate), projection back."""
    value, gate = nn.linear(p["net"]["0"]["proj"], x).chunk(2, dim=-1)
    return nn.linear(p["net"]["2"], value * F.gelu(gate))


def init_transformer_block(k, dim: int, context_dim: int, dtype=torch.float32) -> dict:
    k1, k2, k3 = random.split(k, 3)
    return {"norm1": nn.init_norm(dim, dtype), "attn1": init_attention(k1, dim, dim, dtype),
            "norm2": nn.init_norm(dim, dtype), "attn2": init_attention(k2, dim, context_dim, dtype),
            "norm3": nn.init_norm(dim, dtype), "ff": init_feed_forward(k3, dim, dtype=dtype)}


def transformer_block(p: dict, x: torch.Tensor, context: torch.Tensor, heads: int) -> torch.Tensor:
    """Pre-norm block: self-attention, cross-attention on the text, feed-forward."""
    h = nn.layer_norm(p["norm1"], x)
    x = x + attention(p["attn1"], h, h, heads)
    x = x + attention(p["attn2"], nn.layer_norm(p["norm2"], x), context, heads)
    return x + feed_forward(p["ff"], nn.layer_norm(p["norm3"], x))


def init_transformer_2d(k, c: int, context_dim: int, num_layers: int, linear_proj: bool,
                        dtype=torch.float32) -> dict:
    ks = random.split(k, num_layers + 2)
    proj = (lambda kk: nn.init_linear(kk, c, c, dtype=dtype)) if linear_proj else \
        (lambda kk: nn.init_conv2d(kk, c, c, kernel=1, dtype=dtype))
    return {"norm": nn.init_norm(c, dtype), "proj_in": proj(ks[0]),
            "transformer_blocks": {str(i): init_transformer_block(ks[2 + i], c, context_dim, dtype)
                                   for i in range(num_layers)},
            "proj_out": proj(ks[1])}


def _token_linear(p: dict, x: torch.Tensor) -> torch.Tensor:
    """A Linear, or a 1x1 Conv2d applied to tokens (the same matmul, no NCHW round trip)."""
    w = p["weight"]
    return nn.linear({"weight": w[:, :, 0, 0] if w.ndim == 4 else w, "bias": p["bias"]}, x)


def transformer_2d(p: dict, x: torch.Tensor, context: torch.Tensor, heads: int, num_layers: int,
                   groups: int) -> torch.Tensor:
    """Spatial transformer over x [B,C,H,W]: tokens are the H*W positions."""
    b, c, hgt, wid = x.shape
    h = nn.group_norm(p["norm"], x, groups, eps=1e-6)
    h = h.permute(0, 2, 3, 1).reshape(b, hgt * wid, c)  # a view for channels_last input
    h = _token_linear(p["proj_in"], h)
    for i in range(num_layers):
        h = transformer_block(p["transformer_blocks"][str(i)], h, context, heads)
    h = _token_linear(p["proj_out"], h)
    return x + h.reshape(b, hgt, wid, c).permute(0, 3, 1, 2)
