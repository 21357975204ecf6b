"""Checkpoint interchange: diffusers folders, CompVis files and native files, against diffusers.

Tiny random diffusers / transformers models are the references: a StableDiffusionPipeline
folder they save must load to exactly their weights; a CompVis file we write must convert
back to the same weights through diffusers' own single_file_utils converters; an OpenCLIP
(SD 2.x) text tower built by hand from a CLIPTextModel must load to that model's weights;
our diffusers folder must load with StableDiffusionPipeline.from_pretrained. Every bad input
must raise CheckpointError naming the file and the offending keys.
"""

import json
import os
import shutil

import diffusers
import pytest
import safetensors.torch
import torch
import transformers
from diffusers.loaders import single_file_utils as sfu

from sd_func import checkpoint, tree
from sd_func.checkpoint import CheckpointError, CheckpointNotFoundError, compvis
from sd_func.models import autoencoder, text_encoder, tokenizer, unet

# SD 1.x shape in miniature: 3 levels, 2 resnets each, attention on the first two levels,
# channel changes (conv_shortcut / nin_shortcut), and the SD 1.x conventions that a CompVis
# file cannot record (8 heads, sample sizes, scaling factor) so that inference reproduces them.
UNET1 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
             block_out_channels=(32, 32, 64), norm_num_groups=32, cross_attention_dim=64,
             attention_head_dim=8,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
           block_out_channels=(32, 64), norm_num_groups=32,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TEXT1 = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
             projection_dim=768, bos_token_id=998, eos_token_id=999, pad_token_id=1)
# SD 2.x shape: linear proj_in/proj_out, 64-channel heads, gelu OpenCLIP-style text tower.
UNET2 = dict(UNET1, block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=(1, 2),
             use_linear_projection=True, upcast_attention=True, sample_size=96,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TEXT2 = dict(TEXT1, hidden_act="gelu", projection_dim=512)


def _sd(module) -> dict:
    return {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def _prefixed(text_sd: dict) -> dict:
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text_sd.items()}


def _perturb(module, seed):
    """Move norms / biases off their 1 / 0 init so that a swapped tensor cannot go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def _reference(unet_kw, text_kw, seed=0):
    torch.manual_seed(seed)
    return dict(
        unet=_perturb(diffusers.UNet2DConditionModel(**unet_kw), seed),
        vae=_perturb(diffusers.AutoencoderKL(**VAE), seed + 1),
        text_encoder=_perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_kw)), seed + 2))


def _assert_params_equal(params: dict, ref: dict):
    """Every leaf of params equals the reference modules' state dict (names and values)."""
    for name in ("unet", "vae", "text_encoder"):
        want = _sd(ref[name])
        if name == "text_encoder":
            want = _prefixed(want)
        got = tree.to_state_dict(params[name])
        assert sorted(got) == sorted(want), name
        for k, v in want.items():
            assert torch.equal(got[k], v), f"{name}: {k}"


def _assert_trees_equal(a: dict, b: dict):
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert list(fa) == list(fb) or sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and torch.equal(fa[k], fb[k]), k


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD 1.x StableDiffusionPipeline saved by diffusers, and its modules."""
    ref = _reference(UNET1, TEXT1)
    tok = tokenizer.load("builtin:shapes")
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=ref["vae"], text_encoder=ref["text_encoder"], tokenizer=tok, unet=ref["unet"], scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = str(tmp_path_factory.mktemp("sd1") / "pipe")
    pipe.save_pretrained(folder)
    params, cfg = checkpoint.load(folder)
    return dict(ref=ref, folder=folder, params=params, cfg=cfg)


# ------------------------------------------------------------------------ diffusers


def test_diffusers_folder_load(sd1):
    params, cfg, ref = sd1["params"], sd1["cfg"], sd1["ref"]
    assert checkpoint.detect(sd1["folder"]) == "diffusers"
    _assert_params_equal(params, ref)
    assert cfg.unet == unet.from_diffusers_config(dict(ref["unet"].config))
    assert cfg.vae == autoencoder.from_diffusers_config(dict(ref["vae"].config))
    assert cfg.text_encoder.hidden_act == "quick_gelu" and cfg.text_encoder.num_hidden_layers == 2
    assert cfg.text_encoder.tokenizer == os.path.join(os.path.abspath(sd1["folder"]), "tokenizer")
    # transformers >= 5 saves tokenizer.json alone (no vocab.json / merges.txt)
    assert transformers.CLIPTokenizer.from_pretrained(cfg.text_encoder.tokenizer).vocab_size == 1000
    assert cfg.diffusion.prediction_type == "epsilon" and cfg.diffusion.steps_offset == 1
    assert cfg.diffusion.beta_schedule == "scaled_linear" and cfg.diffusion.beta_end == 0.012


def test_diffusers_folder_legacy_names_bin_and_fp16(sd1, tmp_path):
    """Other layouts: .bin weights, pre-0.14 VAE attention names, fp16 variant, shards; dtype=."""
    folder = str(tmp_path / "old")
    shutil.copytree(sd1["folder"], folder)
    vae_dir = os.path.join(folder, "vae")
    sd = safetensors.torch.load_file(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in sd.items():
        for new, legacy in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        renamed[k] = v
    os.remove(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
    torch.save(renamed, os.path.join(vae_dir, "diffusion_pytorch_model.bin"))
    te_dir = os.path.join(folder, "text_encoder")
    te = safetensors.torch.load_file(os.path.join(te_dir, "model.safetensors"))
    os.remove(os.path.join(te_dir, "model.safetensors"))
    safetensors.torch.save_file({k: v.half() for k, v in te.items()}, os.path.join(te_dir, "model.fp16.safetensors"))
    unet_dir = os.path.join(folder, "unet")
    sd = safetensors.torch.load_file(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
    os.remove(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
    keys, weight_map = sorted(sd), {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        safetensors.torch.save_file({k: sd[k] for k in part}, os.path.join(unet_dir, shard))
        weight_map.update(dict.fromkeys(part, shard))
    with open(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    params, _ = checkpoint.load(folder)
    _assert_trees_equal(params["unet"], sd1["params"]["unet"])  # from two shards
    _assert_trees_equal(params["vae"], sd1["params"]["vae"])  # from .bin with legacy names
    # the fp16 variant file: the same weights, rounded to float16 (and kept in float16)
    _assert_trees_equal(params["text_encoder"], tree.cast(sd1["params"]["text_encoder"], torch.float16))
    assert params["text_encoder"]["text_model"]["final_layer_norm"]["weight"].dtype == torch.float16
    p16, _ = checkpoint.load(sd1["folder"], dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in tree.leaves(p16))


def test_diffusers_save_loads_in_diffusers(sd1, tmp_path):
    folder = str(tmp_path / "ours")
    cfg = sd1["cfg"]
    checkpoint.save(sd1["params"], cfg, folder, format="diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    ref = dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder)
    _assert_params_equal(sd1["params"], ref)
    assert pipe.tokenizer("a red circle").input_ids == tokenizer.load("builtin:shapes")("a red circle").input_ids
    assert pipe.scheduler.config.prediction_type == cfg.diffusion.prediction_type
    assert pipe.safety_checker is None
    params, cfg2 = checkpoint.load(folder)
    _assert_trees_equal(params, sd1["params"])
    assert cfg2.unet == cfg.unet and cfg2.vae == cfg.vae and cfg2.diffusion == cfg.diffusion
    # saving over an existing pipeline folder replaces it atomically; no temp folders left
    checkpoint.save(sd1["params"], cfg2, folder, format="diffusers")
    assert sorted(os.listdir(tmp_path)) == ["ours"]


# ------------------------------------------------------------------------ native


def test_native_round_trip(sd1, tmp_path):
    path = str(tmp_path / "model.safetensors")
    cfg = sd1["cfg"]
    cfg.sample = {"steps": 7}  # non-model sections travel too
    checkpoint.save(sd1["params"], cfg, path)
    assert checkpoint.detect(path) == "native"
    keys = safetensors.torch.load_file(path)
    assert "unet/down_blocks/0/resnets/0/conv1/weight" in keys
    params, cfg2 = checkpoint.load(path)
    _assert_trees_equal(params, sd1["params"])
    assert cfg2.to_dict() == cfg.to_dict()
    del cfg.sample
    # an ema/ subtree replaces the raw weights with ema=True (and is dropped with ema=False)
    ema_unet = tree.tree_map(lambda x: x + 1, sd1["params"]["unet"])
    checkpoint.save({**sd1["params"], "ema": {"unet": ema_unet}}, cfg, path)
    p_ema, _ = checkpoint.load(path, ema=True)
    _assert_trees_equal(p_ema["unet"], ema_unet)
    p_raw, _ = checkpoint.load(path, ema=False)
    _assert_trees_equal(p_raw, sd1["params"])


# ------------------------------------------------------------------------ CompVis


def test_compvis_round_trip_and_diffusers_converters(sd1, tmp_path):
    params, cfg, ref = sd1["params"], sd1["cfg"], sd1["ref"]
    for name in ("sd1.safetensors", "sd1.ckpt"):
        path = str(tmp_path / name)
        checkpoint.save(params, cfg, path, format="compvis")
        assert checkpoint.detect(path) == "compvis"
        p2, cfg2 = checkpoint.load(path)
        _assert_trees_equal(p2, params)
        assert cfg2.to_dict() == cfg.to_dict()
    sd = safetensors.torch.load_file(str(tmp_path / "sd1.safetensors"))
    # the original LDM names
    for k in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
              "model.diffusion_model.time_embed.0.weight", "model.diffusion_model.time_embed.2.bias",
              "model.diffusion_model.out.0.weight", "model.diffusion_model.out.2.weight",
              "model.diffusion_model.input_blocks.3.0.op.weight",
              "model.diffusion_model.output_blocks.2.1.conv.weight",
              "model.diffusion_model.output_blocks.5.2.conv.weight",
              "model.diffusion_model.middle_block.1.proj_in.weight",
              "first_stage_model.encoder.down.0.block.0.conv1.weight",
              "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
              "first_stage_model.decoder.up.1.upsample.conv.weight",
              "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight"):
        assert k in sd, k
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    # diffusers' own single-file converters give back the reference weights, exactly
    checks = (("unet", sfu.convert_ldm_unet_checkpoint(sd, dict(ref["unet"].config)), _sd(ref["unet"])),
              ("vae", sfu.convert_ldm_vae_checkpoint(sd, dict(ref["vae"].config)), _sd(ref["vae"])),
              ("text", sfu.convert_ldm_clip_checkpoint(sd), _prefixed(_sd(ref["text_encoder"]))))
    for name, got, want in checks:
        assert sorted(got) == sorted(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


def _write_plain(sd: dict, path: str):
    """A CompVis file as other tools write it: no sd_func metadata."""
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)


def test_compvis_architecture_inferred_ema_and_extras(sd1, tmp_path, caplog):
    params, cfg = sd1["params"], sd1["cfg"]
    sd = compvis.to_state_dict(params, cfg)
    ema = {}
    for k, v in sd.items():
        if k.startswith("model.diffusion_model."):
            ema["model_ema." + "".join(k.split(".")[1:])] = v + 1
    extras = {"betas": torch.linspace(0.00085, 0.012, 1000), "model_ema.decay": torch.tensor(0.9999),
              "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    path = str(tmp_path / "plain.safetensors")
    _write_plain({**sd, **ema, **extras}, path)
    p, cfg2 = checkpoint.load(path)
    _assert_trees_equal(p, params)
    for s in ("unet", "vae"):
        assert cfg2[s] == cfg[s], s
    te = {k: v for k, v in cfg.text_encoder.items() if k != "tokenizer"}
    assert {k: v for k, v in cfg2.text_encoder.items() if k != "tokenizer"} == te
    assert cfg2.text_encoder.tokenizer == "" and cfg2.diffusion.prediction_type == "epsilon"
    p_ema, _ = checkpoint.load(path, ema=True)
    _assert_trees_equal(p_ema["unet"], tree.tree_map(lambda x: x + 1, params["unet"]))
    _assert_trees_equal(p_ema["vae"], params["vae"])
    # a cfg that fits the weights gives what they cannot tell (heads, upcast, diffusion,
    # tokenizer); one that does not fit (e.g. configs/txt2img.py's SD 1.5 for a tiny file)
    # leaves the inferred architecture, with a warning
    fits = checkpoint.files.ml_collections.ConfigDict(cfg.to_dict())
    fits.unet.upcast_attention, fits.diffusion.prediction_type = True, "v_prediction"
    fits.sample = {"steps": 3}
    p3, cfg3 = checkpoint.load(path, cfg=fits)
    _assert_trees_equal(p3, params)
    assert cfg3.to_dict() == fits.to_dict()
    other = checkpoint.files.ml_collections.ConfigDict(fits.to_dict())
    other.unet = unet.config()
    with caplog.at_level("WARNING"):
        p4, cfg4 = checkpoint.load(path, cfg=other)
    assert "do not fit this file" in caplog.text
    _assert_trees_equal(p4, params)
    assert cfg4.unet == cfg2.unet and cfg4.diffusion == cfg2.diffusion and cfg4.sample.steps == 3
    assert cfg4.text_encoder.tokenizer == cfg.text_encoder.tokenizer
    # without a tokenizer, the error comes when one is needed
    with pytest.raises(ValueError, match="CompVis checkpoint file carries no tokenizer"):
        tokenizer.load(cfg2.text_encoder.tokenizer)
    with pytest.raises(CheckpointError, match="carries no tokenizer"):
        checkpoint.save(p, cfg2, str(tmp_path / "no_tok"), format="diffusers")
    assert not os.path.exists(tmp_path / "no_tok")
    # an SD 1.x file without the "text_model." level
    flat = {k.replace("transformer.text_model.", "transformer."): v for k, v in sd.items()}
    _write_plain(flat, path)
    _assert_trees_equal(checkpoint.load(path)[0], params)


def _openclip_text(text_model, extra_layer: bool) -> dict:
    """SD 2.x's cond_stage_model.model.* written by hand from a gelu CLIPTextModel."""
    s = _prefixed(_sd(text_model))
    t, out = "text_model.", {}
    out["token_embedding.weight"] = s[t + "embeddings.token_embedding.weight"]
    out["positional_embedding"] = s[t + "embeddings.position_embedding.weight"]
    out["ln_final.weight"], out["ln_final.bias"] = s[t + "final_layer_norm.weight"], s[t + "final_layer_norm.bias"]
    n = text_model.config.num_hidden_layers
    for i in range(n + int(extra_layer)):
        src, dst = f"{t}encoder.layers.{min(i, n - 1)}.", f"transformer.resblocks.{i}."
        for wb in ("weight", "bias"):
            out[dst + f"attn.in_proj_{wb}"] = torch.cat(
                [s[src + f"self_attn.{x}_proj.{wb}"] for x in "qkv"]) + (i >= n)
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
                out[dst + f"{a}.{wb}"] = s[src + f"{b}.{wb}"].clone()
    d = text_model.config.hidden_size
    out["text_projection"], out["logit_scale"] = torch.randn(d, d), torch.tensor(4.6)
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def test_compvis_openclip_sd2(tmp_path):
    ref = _reference(UNET2, TEXT2, seed=3)
    folder_cfg_unet = unet.from_diffusers_config(dict(ref["unet"].config))
    cfg = checkpoint.files.ml_collections.ConfigDict(dict(
        unet=folder_cfg_unet, vae=autoencoder.from_diffusers_config(dict(ref["vae"].config)),
        text_encoder=text_encoder.from_diffusers_config(dict(ref["text_encoder"].config.to_dict()))))
    params = dict(unet=tree.from_state_dict(_sd(ref["unet"])), vae=tree.from_state_dict(_sd(ref["vae"])),
                  text_encoder=text_encoder.from_state_dict(_sd(ref["text_encoder"])))
    sd = {k: v for k, v in compvis.to_state_dict(params, cfg).items() if k.startswith(("model.", "first_"))}
    sd.update(_openclip_text(ref["text_encoder"], extra_layer=True))  # 3 blocks: SD 2 keeps n-1
    path = str(tmp_path / "sd2.safetensors")
    _write_plain(sd, path)
    p, cfg2 = checkpoint.load(path)
    _assert_params_equal(p, ref)
    assert cfg2.unet.use_linear_projection and tuple(cfg2.unet.attention_head_dim) == (1, 2)
    assert cfg2.unet == folder_cfg_unet
    assert cfg2.text_encoder.hidden_act == "gelu" and cfg2.text_encoder.num_hidden_layers == 2
    assert cfg2.diffusion.prediction_type == "v_prediction"  # SD 2.x 768-v convention
    # diffusers' OpenCLIP converter agrees with the hand-built file
    got = sfu.convert_open_clip_checkpoint(ref["text_encoder"], sd)
    want = _prefixed(_sd(ref["text_encoder"]))
    assert all(torch.equal(got[k], want[k]) for k in want)
    # our SD 2 file: fused in_proj, num_hidden_layers blocks, reloads exactly with its config
    out = str(tmp_path / "ours.safetensors")
    checkpoint.save(p, cfg2, out, format="compvis")
    ours = safetensors.torch.load_file(out)
    for k, v in _openclip_text(ref["text_encoder"], extra_layer=False).items():
        if "text_projection" not in k and "logit_scale" not in k:
            assert torch.equal(ours[k], v), k
    assert not any(".resblocks.2." in k for k in ours)
    p2, cfg3 = checkpoint.load(out)
    _assert_trees_equal(p2, p)
    assert cfg3.to_dict() == cfg2.to_dict()
    # with cfg given, cfg.diffusion wins (SD 2 512-base is epsilon)
    cfg2.diffusion.prediction_type = "epsilon"
    assert checkpoint.load(path, cfg=cfg2)[1].diffusion.prediction_type == "epsilon"


def _meta_models(unet_kw, vae_kw, text_kw):
    with torch.device("meta"):  # full size, no memory
        return dict(unet=diffusers.UNet2DConditionModel(**unet_kw), vae=diffusers.AutoencoderKL(**vae_kw),
                    text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_kw)))


@pytest.mark.parametrize("release", ["sd15", "sd21_768v", "sd2_inpaint"])
def test_full_size_names_and_inferred_architecture(release):
    """SD 1.5, SD 2.1 (768-v) and SD 2 inpainting (9 input channels, epsilon) at full size on
    the meta device: the inferred config is the released diffusers config, and diffusers'
    converters read our names back, shape for shape."""
    vae_kw = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    if release == "sd15":
        unet_kw, text_kw = dict(cross_attention_dim=768, sample_size=64), dict(projection_dim=768)
        vae_kw["sample_size"] = 512
    else:
        v = release == "sd21_768v"
        unet_kw = dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, in_channels=4 if v else 9,
                       use_linear_projection=True, upcast_attention=v, sample_size=96 if v else 64)
        text_kw = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                       num_attention_heads=16, hidden_act="gelu", projection_dim=512)
        vae_kw["sample_size"] = 768 if v else 512
    ref = _meta_models(unet_kw, vae_kw, text_kw)
    cfg = checkpoint.files.ml_collections.ConfigDict(dict(
        unet=unet.from_diffusers_config(dict(ref["unet"].config)),
        vae=autoencoder.from_diffusers_config(dict(ref["vae"].config)),
        text_encoder=text_encoder.from_diffusers_config(ref["text_encoder"].config.to_dict())))
    params = dict(unet=tree.from_state_dict(_sd(ref["unet"])), vae=tree.from_state_dict(_sd(ref["vae"])),
                  text_encoder=text_encoder.from_state_dict(_sd(ref["text_encoder"])))
    sd = compvis.to_state_dict(params, cfg)
    if release != "sd15":  # the released files have OpenCLIP's 24th layer, unused by SD 2
        for k in [k for k in sd if ".resblocks.22." in k]:
            sd[k.replace(".resblocks.22.", ".resblocks.23.")] = sd[k]
    inferred = compvis.detect_config(sd, {}, release)
    for s in ("unet", "vae"):
        assert inferred[s] == cfg[s], s
    assert inferred.text_encoder == cfg.text_encoder
    assert inferred.diffusion.prediction_type == ("v_prediction" if release == "sd21_768v" else "epsilon")
    p = compvis.from_state_dict(sd, inferred, release)
    assert {k: v.shape for k, v in tree.flatten(p).items()} == {k: v.shape for k, v in tree.flatten(params).items()}
    got = sfu.convert_ldm_unet_checkpoint(sd, dict(ref["unet"].config))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in _sd(ref["unet"]).items()}
    got = sfu.convert_ldm_vae_checkpoint(sd, dict(ref["vae"].config))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in _sd(ref["vae"]).items()}


def test_training_workdir(sd1, tmp_path):
    from sd_func.checkpoint import training as checkpointing
    p, cfg = sd1["params"], sd1["cfg"]
    ema_unet = tree.tree_map(lambda x: x + 1, p["unet"])
    trees = {"params": {"unet": p["unet"]}, "ema": {"unet": ema_unet},
             "frozen": {"vae": p["vae"], "text_encoder": p["text_encoder"]}}
    checkpointing.save(str(tmp_path), 5, trees, {"config": checkpointing.config_json(cfg)})
    assert checkpoint.detect(str(tmp_path)) == "workdir"
    raw, cfg2 = checkpoint.load(str(tmp_path))
    _assert_trees_equal(raw, p)
    assert cfg2.unet == cfg.unet
    _assert_trees_equal(checkpoint.load(str(tmp_path), ema=True)[0]["unet"], ema_unet)


# ------------------------------------------------------------------------ errors


class _Obj:
    pass


def test_errors(sd1, tmp_path):
    params, cfg = sd1["params"], sd1["cfg"]
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        checkpoint.load(str(tmp_path / "nowhere.safetensors"))
    assert issubclass(CheckpointNotFoundError, FileNotFoundError) and issubclass(CheckpointError, ValueError)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        checkpoint.load(str(tmp_path / "notes.txt"))
    with pytest.raises(CheckpointError, match="component folder"):
        checkpoint.load(os.path.join(sd1["folder"], "unet"))
    other = str(tmp_path / "other.safetensors")
    safetensors.torch.save_file({"foo.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="foo.weight"):
        checkpoint.load(other)

    good = str(tmp_path / "good.safetensors")
    checkpoint.save(params, cfg, good, format="compvis")
    data = (tmp_path / "good.safetensors").read_bytes()
    for name, blob in (("trunc.safetensors", data[: len(data) // 2]), ("head.safetensors", data[:40])):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match=name):
            checkpoint.load(str(tmp_path / name))
    ckpt = str(tmp_path / "good.ckpt")
    checkpoint.save(params, cfg, ckpt, format="compvis")
    (tmp_path / "trunc.ckpt").write_bytes((tmp_path / "good.ckpt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="trunc.ckpt"):
        checkpoint.load(str(tmp_path / "trunc.ckpt"))
    torch.save({"state_dict": compvis.to_state_dict(params, cfg), "callback": _Obj()}, tmp_path / "pickle.ckpt")
    with pytest.raises(CheckpointError, match="weights_only"):
        checkpoint.load(str(tmp_path / "pickle.ckpt"))

    sd = safetensors.torch.load_file(good)
    gone = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    bad = dict(sd)
    del bad[gone]
    bad["model.diffusion_model.extra.weight"] = torch.zeros(1)
    bad["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1, 2, 3, 3)
    _write_plain(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(str(tmp_path / "bad.safetensors"), cfg=cfg)
    msg = str(e.value)  # cfg's architecture first, then the inferred one: both fail
    assert "bad.safetensors" in msg and gone in msg and "extra.weight" in msg and "failed too" in msg
    assert "decoder.conv_in.weight: expected (64, 4, 3, 3), got (1, 2, 3, 3)" in msg
    with pytest.raises(CheckpointError, match="ema=True but the file has no model_ema"):
        checkpoint.load(good, ema=True)
    with pytest.raises(CheckpointError, match="extra.weight"):
        checkpoint.load(str(tmp_path / "bad.safetensors"))

    # native: a missing tensor; diffusers: missing weights, unsupported config value
    nat = str(tmp_path / "n.safetensors")
    checkpoint.save(params, cfg, nat)
    flat, meta = checkpoint.files.read_safetensors(nat)
    del flat["vae/decoder/conv_out/bias"]
    safetensors.torch.save_file(flat, nat, metadata=meta)
    with pytest.raises(CheckpointError, match="vae/decoder/conv_out/bias"):
        checkpoint.load(nat)
    folder = str(tmp_path / "pipe")
    shutil.copytree(sd1["folder"], folder)
    os.remove(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointNotFoundError, match="no weights"):
        checkpoint.load(folder)
    with pytest.raises(CheckpointError, match="ema=False"):
        checkpoint.load(sd1["folder"], ema=True)

    # saves: params must match cfg; unknown format; a user's folder is never overwritten
    broken = {**params, "vae": {k: v for k, v in params["vae"].items() if k != "quant_conv"}}
    with pytest.raises(CheckpointError, match="quant_conv"):
        checkpoint.save(broken, cfg, str(tmp_path / "x.safetensors"))
    assert not os.path.exists(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="unknown format"):
        checkpoint.save(params, cfg, str(tmp_path / "x.safetensors"), format="onnx")
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.png").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        checkpoint.save(params, cfg, str(user), format="diffusers")
    assert os.listdir(user) == ["cat.png"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
