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


def _native_half(name: str) -> bool:
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):
        return False


# bf16/fp16 matmuls, convolutions and attention on a CPU without bf16/fp16 arithmetic
# (AVX2, AVX512 without BF16/FP16; PyTorch's kernels there reach ~2 GFLOP/s against ~40
# in fp32) compute in fp32 on the half-precision values and round the result back: what
# a native kernel does (fp32 accumulation), up to summation order.
_CPU_NATIVE = {torch.bfloat16: _native_half("_is_mkldnn_bf16_supported"),
               torch.float16: _native_half("_is_mkldnn_fp16_supported")}


def _cpu_upcast(dtype) -> bool:
    return dtype in _CPU_NATIVE and not _CPU_NATIVE[dtype] and not exporting()


def exporting() -> bool:
    """True while torch.onnx or torch.export traces a model (sd_func.deploy): the graph then
    gets the plain operators (Conv, MatMul in the params' dtype), not the CPU eager fast paths
    below, whose choice depends on the traced shapes and on this machine."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


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
    w, b = p["weight"], p.get("bias")
    if x.device.type == "cpu" and _cpu_upcast(x.dtype):
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    return F.linear(x, w, b)


def init_conv2d(k, c_in: int, c_out: int, kernel: int = 3, bias: bool = True, dtype=torch.float32) -> dict:
    kw, kb = random.split(k)
    bound = 1.0 / math.sqrt(c_in * kernel * kernel)
    p = {"weight": _uniform(kw, (c_out, c_in, kernel, kernel), bound, dtype)}
    if bias:
        p["bias"] = _uniform(kb, (c_out,), bound, dtype)
    return p


# CPU convolutions with few output pixels (B*Ho*Wo) run as one GEMM over gathered patches:
# there eager oneDNN convolutions reach half or less of the GEMM rate (SD's 8x8 and 4x4
# levels at 1280 channels: 5-15 vs 25 GFLOP/s on one AVX2 core; BENCHMARKS.md).
GEMM_CONV_MAX_PIXELS = 512


def conv2d(p: dict, x: torch.Tensor, stride: int = 1, padding: int | None = None) -> torch.Tensor:
    w, b = p["weight"], p.get("bias")
    kernel = w.shape[-1]
    if padding is None:
        padding = kernel // 2
    if x.device.type == "cpu" and not exporting():
        if _cpu_upcast(x.dtype):
            return conv2d({"weight": w.float(), **({"bias": b.float()} if b is not None else {})},
                          x.float(), stride, padding).to(x.dtype)
        ho = (x.shape[-2] + 2 * padding - w.shape[-2]) // stride + 1
        wo = (x.shape[-1] + 2 * padding - kernel) // stride + 1
        if kernel == 1 or x.shape[0] * ho * wo <= GEMM_CONV_MAX_PIXELS:
            return conv2d_gemm(x, w, b, stride, padding)
    return F.conv2d(x, w, b, stride=stride, padding=padding)


def conv2d_gemm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int = 1,
                padding: int = 0) -> torch.Tensor:
    """F.conv2d as one matmul (im2col) on NHWC views: patches [B,Ho,Wo,K] @ weight [O,K]^T.

    The patch order follows the weight's memory layout ([O,kh,kw,C] for channels_last
    weights, [O,C,kh,kw] otherwise), so the weight is reshaped without a copy. The result
    is a channels_last [B,O,Ho,Wo] view of the matmul's output.
    """
    o, c, kh, kw = w.shape
    xh = x.permute(0, 2, 3, 1)  # a view for channels_last x
    if padding:
        xh = F.pad(xh, (0, 0, padding, padding, padding, padding))
    ho, wo = (xh.shape[1] - kh) // stride + 1, (xh.shape[2] - kw) // stride + 1
    if kh == kw == 1:
        cols, wm = xh[:, ::stride, ::stride], w.reshape(o, c)
    else:
        taps = [xh[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
                for i in range(kh) for j in range(kw)]
        if w.is_contiguous(memory_format=torch.channels_last):
            cols, wm = torch.cat(taps, dim=-1), w.permute(0, 2, 3, 1).reshape(o, -1)
        else:
            cols, wm = torch.stack(taps, dim=-1).flatten(-2), w.reshape(o, -1)
    return F.linear(cols, wm, b).permute(0, 3, 1, 2)


def init_norm(c: int, dtype=torch.float32) -> dict:
    """GroupNorm / LayerNorm affine parameters (weight 1, bias 0)."""
    return {"weight": torch.ones(c, dtype=dtype), "bias": torch.zeros(c, dtype=dtype)}


def group_norm(p: dict, x: torch.Tensor, groups: int = 32, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm over [B,C,H,W] (any memory format, channels_last included)."""
    w, b = p["weight"], p["bias"]
    if (not torch.compiler.is_compiling() and torch._C._functorch.is_gradtrackingtensor(x)
            and x.dtype == w.dtype == b.dtype and x.numel() > 0):
        return _GroupNorm.apply(x, w, b, groups, eps)[0]
    return F.group_norm(x, groups, w, b, eps)


class _GroupNorm(torch.autograd.Function):
    """F.group_norm whose backward is ATen's fused native_group_norm_backward kernel.

    Only inside torch.func.grad, where the built-in derivative runs as a decomposition
    into ~20 elementwise ops (2x the fused kernel's time on a CPU). Plain autograd (the
    eager train steps, train.autodiff) already runs the fused kernel, and under
    torch.compile inductor fuses the decomposition itself: both take F.group_norm.
    """

    generate_vmap_rule = True  # for vmap(grad(...))

    @staticmethod
    def forward(x, w, b, groups, eps):
        n, c = x.shape[:2]
        return torch.ops.aten.native_group_norm(x, w, b, n, c, x.numel() // max(n * c, 1), groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _, groups, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.groups = groups
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, gy, _gmean, _grstd):
        x, w, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        cl = x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        gy = gy.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            gy, x, mean, rstd, w, n, c, x.numel() // max(n * c, 1), ctx.groups, list(ctx.needs_input_grad[:3]))
        return gx, gw, gb, None, None


def layer_norm(p: dict, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, p["weight"].shape, p["weight"], p["bias"], eps)


def init_embedding(k, num: int, dim: int, dtype=torch.float32) -> dict:
    return {"weight": random.normal(k, (num, dim), dtype=dtype) * 0.02}


def embedding(p: dict, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, p["weight"])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """Multi-head attention over [B, N, C] projections via scaled_dot_product_attention."""
    if q.device.type == "cpu" and _cpu_upcast(q.dtype):
        m = mask if mask is None or mask.dtype == torch.bool else mask.float()
        return attention(q.float(), k.float(), v.float(), heads, m, is_causal).to(q.dtype)
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
