"""Functional layers: each `init_*(key, ...) -> params` has an apply function.

Parameter names are the ones torch.nn uses ("weight", "bias"), so a diffusers or
transformers state dict maps onto these trees without renaming. Every apply
function is pure and works under torch.compile(fullgraph=True), torch.func
transforms, channels_last inputs and bf16/fp16 parameters.
"""

import math

import torch
import torch.nn.functional as F

from sd_func import random


def _uniform(k, shape, bound, dtype):
    return random.uniform(k, shape, -bound, bound, dtype=dtype)


def init_linear(k, d_in: int, d_out: int, bias: bool = True, dtype=torch.float32) -> dict:
    """torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    kw, kb = random.split(k)
    bound = 1.0 / math.sqrt(d_in)
    p = {"weight": _uniform(kw, (d_out, d_in), bound, dtype)}
    if bias:
        p["bias"] = _uniform(kb, (d_out,), bound, dtype)
    return p


def linear(p: dict, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, p["weight"], p.get("bias"))


def init_conv2d(k, c_in: int, c_out: int, kernel: int = 3, bias: bool = True, dtype=torch.float32) -> dict:
    kw, kb = random.split(k)
    bound = 1.0 / math.sqrt(c_in * kernel * kernel)
    p = {"weight": _uniform(kw, (c_out, c_in, kernel, kernel), bound, dtype)}
    if bias:
        p["bias"] = _uniform(kb, (c_out,), bound, dtype)
    return p


def conv2d(p: dict, x: torch.Tensor, stride: int = 1, padding: int | None = None) -> torch.Tensor:
    kernel = p["weight"].shape[-1]
    if padding is None:
        padding = kernel // 2
    return F.conv2d(x, p["weight"], p.get("bias"), stride=stride, padding=padding)


def init_norm(c: int, dtype=torch.float32) -> dict:
    """GroupNorm / LayerNorm affine parameters (weight 1, bias 0)."""
    return {"weight": torch.ones(c, dtype=dtype), "bias": torch.zeros(c, dtype=dtype)}


def group_norm(p: dict, x: torch.Tensor, groups: int = 32, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm over [B,C,H,W] (any memory format, channels_last included)."""
    return F.group_norm(x, groups, p["weight"], p["bias"], eps)


def layer_norm(p: dict, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), p["weight"], p["bias"], eps)


def init_embedding(k, num: int, dim: int, dtype=torch.float32) -> dict:
    return {"weight": random.normal(k, (num, dim), dtype=dtype) * 0.02}


def embedding(p: dict, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, p["weight"])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """Multi-head attention over [B, N, C] projections via scaled_dot_product_attention."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return out.transpose(1, 2).reshape(b, n, c)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim], float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "quick_gelu": quick_gelu,
               "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh}
