"""AutoencoderKL parity with diffusers on the same random weights (tiny shapes)."""

import json
import zlib

import pytest
import torch
from diffusers import AutoencoderKL

from sd_func import random, tree
from sd_func.models import autoencoder

TINY = dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=32)
# Three levels, channel changes (conv_shortcut) and two resnets per block.
SMALL = dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
             sample_size=16)


def _perturbed(cfg, seed=1):
    """init() params with norms and biases moved away from 1 / 0, so that their use is tested."""
    p = autoencoder.init(random.key(seed), cfg)

    def bump(path, x):
        k = random.fold_in(random.key(seed + 100), zlib.crc32(path.encode()))
        if path.endswith("bias") or "norm" in path:
            return x + 0.3 * random.normal(k, x.shape)
        return x
    return tree.map_with_path(bump, p)


def _reference(cfg, params):
    ref = AutoencoderKL(**autoencoder.to_diffusers_config(cfg)).eval()
    ref.load_state_dict(tree.to_state_dict(params), strict=True)
    return ref


@pytest.mark.parametrize("overrides", [TINY, SMALL], ids=["tiny", "small"])
def test_parity_with_diffusers(overrides):
    cfg = autoencoder.config(**overrides)
    p = _perturbed(cfg)
    ref = _reference(cfg, p)
    images = random.uniform(random.key(2), (2, 3, 24, 16), -1, 1)
    z = random.normal(random.key(3), (2, 4, 6, 5))
    with torch.no_grad():
        mean, logvar = autoencoder.encode(p, images, cfg)
        dist = ref.encode(images).latent_dist
        out = autoencoder.decode(p, z, cfg)
        out_ref = ref.decode(z).sample
    f = 2 ** (len(cfg.block_out_channels) - 1)
    assert mean.shape == logvar.shape == (2, 4, 24 // f, 16 // f)
    assert out.shape == (2, 3, 6 * f, 5 * f)
    errs = {"mean": (mean - dist.mean).abs().max().item(),
            "logvar": (logvar - dist.logvar).abs().max().item(),
            "decode": (out - out_ref).abs().max().item()}
    print(overrides["block_out_channels"], "max abs err", errs)
    assert max(errs.values()) < 1e-4, errs
    # sample_latent is mean + std * noise, as DiagonalGaussianDistribution.sample.
    noise = random.normal(random.key(4), mean.shape)
    torch.testing.assert_close(autoencoder.sample_latent(mean, logvar, noise),
                               dist.mean + dist.std * noise, atol=1e-5, rtol=1e-5)


def test_state_dict_names_match_diffusers():
    cfg = autoencoder.config(**TINY)
    ref_sd = AutoencoderKL(**autoencoder.to_diffusers_config(cfg)).state_dict()
    missing, unexpected, wrong = tree.diff(ref_sd, tree.to_state_dict(autoencoder.init(random.key(0), cfg)))
    assert (missing, unexpected, wrong) == ([], [], [])
    # ... and the other way: a diffusers state dict is a params tree.
    p = tree.from_state_dict(ref_sd)
    assert "to_q" in p["encoder"]["mid_block"]["attentions"]["0"]


def test_no_quant_conv_and_no_mid_attention():
    cfg = autoencoder.config(**TINY, use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False)
    p = _perturbed(cfg)
    assert "quant_conv" not in p and "attentions" not in p["decoder"]["mid_block"]
    ref = _reference(cfg, p)
    x = random.uniform(random.key(5), (1, 3, 16, 16), -1, 1)
    with torch.no_grad():
        torch.testing.assert_close(autoencoder.encode(p, x, cfg)[0], ref.encode(x).latent_dist.mean,
                                   atol=1e-4, rtol=1e-4)


def test_bf16_params_within_bf16_tolerance():
    cfg = autoencoder.config(**TINY)
    p = _perturbed(cfg)
    images = random.uniform(random.key(2), (1, 3, 16, 16), -1, 1)
    z = random.normal(random.key(3), (1, 4, 8, 8))
    with torch.no_grad():
        mean32, _ = autoencoder.encode(p, images, cfg)
        out32 = autoencoder.decode(p, z, cfg)
        p16 = tree.cast(p, torch.bfloat16)
        mean16, _ = autoencoder.encode(p16, images, cfg)
        out16 = autoencoder.decode(p16, z, cfg)
    assert mean16.dtype == out16.dtype == torch.bfloat16
    rel = lambda a, b: ((a.float() - b).abs().max() / b.abs().max()).item()
    errs = (rel(mean16, mean32), rel(out16, out32))
    print("bf16 relative max err (mean, decode)", errs)
    assert max(errs) < 0.05, errs


def test_config_round_trip_and_errors(tmp_path):
    cfg = autoencoder.config()
    d = autoencoder.to_diffusers_config(cfg)
    assert autoencoder.from_diffusers_config(d).to_dict() == cfg.to_dict()
    tiny = autoencoder.config(**TINY)
    AutoencoderKL(**autoencoder.to_diffusers_config(tiny)).save_config(tmp_path)  # a vae/config.json
    saved = json.loads((tmp_path / "config.json").read_text())
    assert autoencoder.from_diffusers_config(saved).to_dict() == tiny.to_dict()
    assert cfg.scaling_factor == 0.18215 and tuple(cfg.block_out_channels) == (128, 256, 512, 512)
    with pytest.raises(ValueError, match="shift_factor"):
        autoencoder.from_diffusers_config({**d, "shift_factor": 0.1})
    with pytest.raises(ValueError, match="up_block_types"):
        autoencoder.from_diffusers_config({**d, "up_block_types": ["AttnUpDecoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="foo"):
        autoencoder.from_diffusers_config({**d, "foo": 1})
    p = autoencoder.init(random.key(0), autoencoder.config(**TINY))
    with pytest.raises(ValueError, match=r"\[B,4,H,W\]"):
        autoencoder.decode(p, torch.zeros(1, 3, 4, 4), autoencoder.config(**TINY))



@pytest.mark.slow
def test_full_size_sd_vae_parity():
    cfg = autoencoder.config()
    p = _perturbed(cfg)
    ref = _reference(cfg, p)
    images = random.uniform(random.key(2), (1, 3, 64, 64), -1, 1)
    z = random.normal(random.key(3), (1, 4, 8, 8))
    with torch.no_grad():
        mean, logvar = autoencoder.encode(p, images, cfg)
        dist = ref.encode(images).latent_dist
        out, out_ref = autoencoder.decode(p, z, cfg), ref.decode(z).sample
    errs = [(mean - dist.mean).abs().max().item(), (logvar - dist.logvar).abs().max().item(),
            (out - out_ref).abs().max().item()]
    print("full-size VAE max abs err (mean, logvar, decode)", errs, "output std", out_ref.std().item())
    assert out_ref.std() > 1e-2 and dist.mean.std() > 1e-2
    assert max(errs) < 1e-3, errs
