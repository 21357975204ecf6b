"""CPU fast paths of sd_func.nn (convolution as a GEMM over patches, fp32 compute for bf16 on
CPUs without bf16 arithmetic, GroupNorm's fused backward under torch.func) against the plain
torch ops, and bench/common's analytic UNet MAC count against torch.utils.flop_counter."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from sd_func import nn, tree
from sd_func.models import unet

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("shape", [(4, 8, 6, 6), (2, 32, 5, 7), (3, 6, 10)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_fused_backward_matches_torch(shape, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    p = {"weight": torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5,
         "bias": torch.randn(shape[1], generator=g, dtype=torch.float64)}
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    ours = torch.func.grad(lambda p, x: (nn.group_norm(p, x, 2) * t).sum(), argnums=(0, 1))(p, x)
    ref = torch.func.grad(lambda p, x: (F.group_norm(x, 2, p["weight"], p["bias"]) * t).sum(),
                          argnums=(0, 1))(p, x)
    for a, b in zip(tree.leaves(ours), tree.leaves(ref)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    y = nn.group_norm(p, x.requires_grad_(), 2)
    assert y.is_contiguous(memory_format=torch.channels_last) == (channels_last and x.ndim == 4)
    torch.testing.assert_close(y, F.group_norm(x, 2, p["weight"], p["bias"]))


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (3, 2, 0), (1, 1, 0), (1, 2, 0), (3, 1, 0)])
@pytest.mark.parametrize("x_cl,w_cl", [(False, False), (True, True), (True, False), (False, True)])
def test_conv2d_gemm_matches_conv2d(kernel, stride, padding, x_cl, w_cl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 7, 9, generator=g)
    w = torch.randn(5, 6, kernel, kernel, generator=g)
    b = torch.randn(5, generator=g)
    ref = F.conv2d(x, w, b, stride=stride, padding=padding)
    if x_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    if w_cl:
        w = w.contiguous(memory_format=torch.channels_last)
    out = nn.conv2d_gemm(x, w, b, stride, padding)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out = nn.conv2d_gemm(x, w, None, stride, padding)
    torch.testing.assert_close(out, ref - b[:, None, None], atol=1e-5, rtol=1e-5)


def test_conv2d_picks_a_path_by_size_and_matches():
    g = torch.Generator().manual_seed(1)
    p = nn.init_conv2d(0, 8, 4)
    for hw in (4, 40):  # 2*4*4 pixels: GEMM path; 2*40*40 > GEMM_CONV_MAX_PIXELS: F.conv2d
        x = torch.randn(2, 8, hw, hw, generator=g)
        torch.testing.assert_close(nn.conv2d(p, x), F.conv2d(x, p["weight"], p["bias"], padding=1),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nn.conv2d(p, x, stride=2), F.conv2d(x, p["weight"], p["bias"], stride=2,
                                                                      padding=1), atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 8, 5, 5, generator=g, requires_grad=True)  # differentiable like F.conv2d
    nn.conv2d(p, x).square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    F.conv2d(x, p["weight"], p["bias"], padding=1).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-4, rtol=1e-5)


def test_half_precision_on_cpu_rounds_like_a_native_kernel():
    """bf16 linear/conv/attention: bf16 in, bf16 out, within bf16 rounding of the fp32 result
    of the same bf16 inputs (native or fp32-computed alike)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 6, 6, generator=g).bfloat16()
    pc = tree.cast(nn.init_conv2d(1, 16, 8), torch.bfloat16)
    pl = tree.cast(nn.init_linear(2, 16, 8), torch.bfloat16)
    q, k, v = (torch.randn(2, 10, 16, generator=g).bfloat16() for _ in range(3))
    outs = {"conv": (nn.conv2d(pc, x), F.conv2d(x.float(), pc["weight"].float(), pc["bias"].float(), padding=1)),
            "linear": (nn.linear(pl, x.permute(0, 2, 3, 1)),
                       F.linear(x.permute(0, 2, 3, 1).float(), pl["weight"].float(), pl["bias"].float())),
            "attention": (nn.attention(q, k, v, heads=2), nn.attention(q.float(), k.float(), v.float(), heads=2))}
    for name, (out, ref) in outs.items():
        assert out.dtype == torch.bfloat16, name
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2, msg=name)


@pytest.mark.parametrize("size", [(32, 32), (17, 23)])
def test_unet_macs_match_flop_counter(size):
    import common
    from diffusers import UNet2DConditionModel
    cfg = unet.config(block_out_channels=(32, 64, 64), layers_per_block=(1, 2, 1),
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                      attention_head_dim=4, cross_attention_dim=24, norm_num_groups=8,
                      transformer_layers_per_block=(1, 2, 1), use_linear_projection=True, in_channels=9)
    with torch.device("meta"):
        params = tree.from_state_dict(UNet2DConditionModel(**unet.to_diffusers_config(cfg)).state_dict())
        x, c, t = torch.empty(2, 9, *size), torch.empty(2, 77, 24), torch.ones(2)
    counted = common.counted_macs(lambda: unet.apply(params, x, t, c, cfg))
    assert common.unet_macs(cfg, 2, *size)["total"] == counted
