"""UNet: parity with diffusers' UNet2DConditionModel on the same random weights, config
interchange, torch.compile(fullgraph=True), low-precision params and channels_last inputs."""

import inspect

import pytest
import torch
from diffusers import UNet2DConditionModel

from sd_func import tree
from sd_func.models import unet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops: on a busy 2-core machine, a second intra-op thread only spins (10-100x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

SD1_TINY = dict(  # SD 1.x shape: conv proj, one head count, a middle cross-attention block
    block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=24, norm_num_groups=8, sample_size=16)
SD2_TINY = dict(  # SD 2.x shape: linear proj, per-block head counts, fp32 attention scores
    block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4), cross_attention_dim=40, use_linear_projection=True,
    upcast_attention=True, transformer_layers_per_block=(1, 2), norm_num_groups=8, sample_size=16)
INPAINT_TINY = dict(  # SD inpainting: 9 input channels (latent, mask, masked-image latent)
    in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8, sample_size=16)


def _reference(cfg, seed=0):
    """A diffusers UNet with norms and biases moved away from 1/0, and its weights as params."""
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**unet.to_diffusers_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, tree.from_state_dict(model.state_dict())


def _check_parity(cfg, x, t, context, reference=None):
    model, params = reference or _reference(cfg)
    with torch.no_grad():
        ref = model(x, t, context).sample
        out = unet.apply(params, x, t, context, cfg)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"max abs err {err:.3g} (output max {scale:.3g})")
    assert err <= 1e-5 * max(1.0, scale), err
    return err


def test_parity_sd1_tiny():
    cfg = unet.config(**SD1_TINY)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 24, generator=g)
    _check_parity(cfg, x, 999, context)


def test_parity_timestep_forms():
    # samplers pass float timesteps; python numbers, 0-d and [B] tensors all broadcast to [B]
    cfg = unet.config(**{**INPAINT_TINY, "in_channels": 4})
    model, params = _reference(cfg)
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    for t in (10, 500.5, torch.tensor(3), torch.tensor([7, 800]), torch.tensor([0.25, 999.0])):
        _check_parity(cfg, x, t, context, (model, params))


def test_parity_sd2_tiny():
    cfg = unet.config(**SD2_TINY)
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 40, generator=g)
    _check_parity(cfg, x, torch.tensor([1.5, 640.0]), context)


def test_parity_inpaint_tiny_odd_size():
    cfg = unet.config(**INPAINT_TINY)
    g = torch.Generator().manual_seed(4)
    # 5x7 is not divisible by 2: upsampling must match the skip's size, as diffusers does
    x, context = torch.randn(2, 9, 5, 7, generator=g), torch.randn(2, 77, 32, generator=g)
    _check_parity(cfg, x, 250, context)


@pytest.mark.parametrize("overrides", [SD1_TINY, SD2_TINY, INPAINT_TINY])
def test_init_loads_strict_into_diffusers(overrides):
    cfg = unet.config(**overrides)
    params = unet.init(0, cfg)
    model = UNet2DConditionModel(**unet.to_diffusers_config(cfg))
    missing, unexpected, wrong = tree.diff(model.state_dict(), tree.to_state_dict(params))
    assert not (missing or unexpected or wrong), (missing, unexpected, wrong)
    model.load_state_dict(tree.to_state_dict(params), strict=True)
    # deterministic in the key, different across keys
    again, other = unet.init(0, cfg), unet.init(1, cfg)
    w = "down_blocks/0/resnets/0/conv1/weight"
    assert torch.equal(tree.flatten(again)[w], tree.flatten(params)[w])
    assert not torch.equal(tree.flatten(other)[w], tree.flatten(params)[w])


def _compile_check(backend):
    cfg = unet.config(block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                      attention_head_dim=2, cross_attention_dim=8, norm_num_groups=4)
    params = unet.init(0, cfg)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 3, 8)
    compiled = torch.compile(lambda p, x, t, c: unet.apply(p, x, t, c, cfg), fullgraph=True,
                             backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(params, x, t, context), unet.apply(params, x, t, context, cfg),
                                   rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_matches_eager():
    # aot_eager: the whole apply is captured as one graph (no graph breaks) and AOT-traced.
    # Inductor's C++ codegen costs minutes on a cold 2-core CPU; it is the slow test below.
    _compile_check("aot_eager")


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    _compile_check("inductor")


def test_bf16_params_channels_last_input():
    cfg = unet.config(**SD2_TINY)
    params = unet.init(0, cfg)
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 40, generator=g)
    with torch.no_grad():
        ref = unet.apply(params, x, 100, context, cfg)
        out = unet.apply(tree.cast(params, torch.bfloat16), x.to(memory_format=torch.channels_last),
                         100, context, cfg)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel
    with torch.no_grad():  # half input keeps its dtype on the way out
        half = unet.apply(tree.cast(params, torch.bfloat16), x.bfloat16(), 100, context, cfg)
    assert half.dtype == torch.bfloat16


def test_fp16_attention_logits_beyond_fp16_range_stay_finite():
    # SD 2.1's reason for upcast_attention: q.k/sqrt(d) over 65504 must not overflow to inf
    from sd_func.models import unet_blocks
    dim, eye = 64, torch.eye(64)
    p = {"to_q": {"weight": 100 * eye}, "to_k": {"weight": 100 * eye}, "to_v": {"weight": eye},
         "to_out": {"0": {"weight": eye, "bias": torch.zeros(dim)}}}
    x = torch.randn(1, 6, dim)
    x[0, 0] = 1.0  # logit of token 0 with itself: 100^2 * 64 / 8 = 80000
    ref = unet_blocks.attention(p, x, x, heads=1)
    out = unet_blocks.attention(tree.cast(p, torch.float16), x.half(), x.half(), heads=1)
    assert out.isfinite().all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_diffusers_config_round_trip():
    for overrides in (SD1_TINY, SD2_TINY, INPAINT_TINY, {}):
        cfg = unet.config(**overrides)
        with torch.device("meta"):
            d = dict(UNet2DConditionModel(**unet.to_diffusers_config(cfg)).config)
        assert unet.from_diffusers_config(d).to_dict() == cfg.to_dict()
    # equivalent spellings of the fixed options are accepted
    d = {**unet.to_diffusers_config(cfg), "only_cross_attention": [False] * 4,
         "mid_block_only_cross_attention": False, "_class_name": "UNet2DConditionModel"}
    assert unet.from_diffusers_config(d).to_dict() == cfg.to_dict()


def test_head_dim_and_num_attention_heads_resolve_to_head_counts():
    by_count = unet.config(**SD2_TINY)
    by_dim = unet.config(**{**SD2_TINY, "attention_head_dim": 8, "head_dim": 16})
    by_num = unet.config(**{**SD2_TINY, "num_attention_heads": (2, 4)})
    for cfg in (by_dim, by_num):
        assert unet.to_diffusers_config(cfg) == unet.to_diffusers_config(by_count)
    # SD 2.x: 64 channels per head is (5, 10, 20, 20) heads
    sd2 = unet.config(head_dim=64, cross_attention_dim=1024, use_linear_projection=True)
    assert unet.to_diffusers_config(sd2)["attention_head_dim"] == [5, 10, 20, 20]


def test_every_diffusers_option_is_mapped_or_rejected():
    params = inspect.signature(UNet2DConditionModel.__init__).parameters
    for name, p in params.items():
        if name == "self":
            continue
        assert name in unet._DEFAULTS or name in unet._FIXED or name in unet._IGNORED, name
        if name in unet._FIXED:
            assert p.default == unet._FIXED[name], name


@pytest.mark.parametrize("bad, key", [
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"only_cross_attention": [False, True, False, False]}, "only_cross_attention"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ({"down_block_types": ["AttnDownBlock2D"] * 4}, "down_block_types"),
    ({"mid_block_type": None}, "mid_block_type"),
    ({"attention_head_dim": [8, 8]}, "attention_head_dim"),
    ({"attention_head_dim": 7}, "head counts"),
    ({"some_future_option": 1}, "some_future_option"),
])
def test_bad_diffusers_config_names_the_key(bad, key):
    d = {**unet.to_diffusers_config(unet.config()), **bad}
    with pytest.raises(ValueError, match=key):
        unet.from_diffusers_config(d)


def test_bad_inputs_are_clear():
    cfg = unet.config(**INPAINT_TINY)
    params = unet.init(0, cfg)
    with pytest.raises(ValueError, match="x must be"):
        unet.apply(params, torch.randn(1, 4, 8, 8), 1, torch.randn(1, 5, 32), cfg)
    with pytest.raises(ValueError, match="context"):
        unet.apply(params, torch.randn(1, 9, 8, 8), 1, torch.randn(1, 5, 16), cfg)
    with pytest.raises(ValueError, match="t must be"):
        unet.apply(params, torch.randn(2, 9, 8, 8), torch.zeros(3), torch.randn(2, 5, 32), cfg)
    with pytest.raises(ValueError, match="unknown field"):
        unet.config(attn_heads=8)


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides, expected", [
    ("sd15", {}, 859_520_964),
    ("sd2", dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 use_linear_projection=True, sample_size=96), 865_910_724)])
def test_full_size_shapes_match_diffusers(name, overrides, expected):
    cfg = unet.config(**overrides)
    with torch.device("meta"):
        model = UNet2DConditionModel(**unet.to_diffusers_config(cfg))
    params = unet.init(0, cfg, dtype=torch.bfloat16)
    missing, unexpected, wrong = tree.diff(model.state_dict(), tree.to_state_dict(params))
    assert not (missing or unexpected or wrong), (missing[:5], unexpected[:5], wrong[:5])
    assert tree.num_params(params) == sum(p.numel() for p in model.parameters()) == expected
