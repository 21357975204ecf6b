"""sd_func.lora and its files against diffusers + PEFT on the same tiny random weights.

A tiny SD pipeline (test_pipelines.tiny_sd_folder) is loaded by both; LoRAs with random
A and B (on attention, LoCon convs and the text encoder, ranks and alphas that differ
between modules) go through our files into diffusers' `load_lora_weights`, and kohya
files written here (diffusers- and CompVis-named) into both. The UNet and the text
encoder must then agree to float32 rounding (relative to the output's scale), and
txt2img / run_sample.py --lora must give diffusers' images.
Run with -s to see the measured errors.
"""

import diffusers
import numpy as np
import pytest
import torch
from test_pipelines import MAX_MEAN_ERR_U8, tiny_sd_folder
from test_run_sample import cli, read_pngs

from sd_func import checkpoint, fileio, lora, pipelines, random, tree
from sd_func.checkpoint import lora_files
from sd_func.models import text_encoder, unet

MAX_REL = 1e-5
ALL = "attn,conv,te_attn,te_mlp"
PROMPTS = ["a red circle on a blue background", "a green square"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd"))
    tiny_sd_folder(path, seed=3)
    params, cfg = checkpoint.load(path)
    return path, params, cfg


def fresh_pipe(path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def nets(params):
    return {"unet": params["unet"], "text_encoder": params["text_encoder"]}


def random_lora(params, seed, target=ALL, rank=4, alpha=8.0, vary=False):
    """A LoRA with random B (so it changes the model); vary: every third module rank 2, alpha 3."""
    lp = lora.init(random.key(seed), nets(params), rank, alpha, target)
    g = torch.Generator().manual_seed(seed)
    flat = tree.flatten(lp)
    for i, m in enumerate(lora.modules(lp)):
        if vary and i % 3 == 0:
            flat[m + "/lora_A"], flat[m + "/lora_B"] = flat[m + "/lora_A"][:2], flat[m + "/lora_B"][:, :2]
            flat[m + "/alpha"] = torch.tensor(3.0)
        b = flat[m + "/lora_B"]
        flat[m + "/lora_B"] = 0.2 * torch.randn(b.shape, generator=g)
    return tree.unflatten(flat)


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g),
            torch.randint(0, 1000, (2, 77), generator=g))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def compare(pipe, params, cfg, name):
    """(UNet, text encoder) relative max errors of our params against the diffusers pipeline's modules."""
    x, t, ctx, ids = inputs()
    with torch.no_grad():
        e_unet = rel(unet.apply(params["unet"], x, t, ctx, cfg.unet), pipe.unet(x, t, ctx).sample)
        e_te = rel(text_encoder.apply(params["text_encoder"], ids, cfg.text_encoder),
                   pipe.text_encoder(ids).last_hidden_state)
    print(f"{name}: unet rel err {e_unet:.1e}, text encoder {e_te:.1e}")
    return e_unet, e_te


def test_zero_b_is_the_base_model_exactly(sd):
    _, params, cfg = sd
    lp = lora.init(random.key(0), nets(params), 4, 16.0, ALL)
    assert all((m["lora_B"] == 0).all() and m["lora_A"].abs().sum() > 0 for m in lora.modules(lp).values())
    out = lora.apply(nets(params), lp, scale=3.0)
    for k, v in tree.flatten(nets(params)).items():
        assert torch.equal(tree.flatten(out)[k], v), k
    x, t, ctx, _ = inputs()
    assert torch.equal(unet.apply(out["unet"], x, t, ctx, cfg.unet), unet.apply(params["unet"], x, t, ctx, cfg.unet))


def test_diffusers_format_matches_load_lora_weights(sd, tmp_path):
    path, params, cfg = sd
    lp = random_lora(params, 1, vary=True)
    f = str(tmp_path / lora_files.DIFFUSERS_NAME)
    checkpoint.save_lora(lp, f)
    pipe = fresh_pipe(path)
    base = compare(pipe, params, cfg, "base vs diffusers without the LoRA")
    pipe.load_lora_weights(f)
    e_unet, e_te = compare(pipe, lora.apply(nets(params), lp), cfg, "ours -> diffusers format -> load_lora_weights")
    assert e_unet < MAX_REL and e_te < MAX_REL
    assert min(compare(pipe, params, cfg, "base vs diffusers with the LoRA")) > 1e3 * MAX_REL > max(base)
    back = checkpoint.load_lora(f, params)  # ours -> diffusers -> ours: exact, alphas included
    assert tree.flatten(back).keys() == tree.flatten(lp).keys()
    assert all(torch.equal(a, tree.flatten(lp)[k]) for k, a in tree.flatten(back).items())


@pytest.mark.parametrize("names", ["diffusers", "compvis"])
def test_kohya_file_matches_diffusers(sd, tmp_path, names):
    path, params, cfg = sd
    # diffusers maps CompVis (sgm) UNet names for SD 1.x only with unet_config; LoCon convs of
    # CompVis-named files are beyond its converter, so that file adapts attention + text encoder.
    # One rank and alpha (8 / 4) for all: diffusers' kohya converter builds PEFT alpha_pattern
    # keys that match no module (a warning) when alphas differ, so only ours would be right.
    lp = random_lora(params, 2, target=ALL if names == "diffusers" else "attn,te_attn,te_mlp")
    sd_k = lora_files.to_kohya(lp)
    if names == "compvis":
        kohya = lora_files.kohya_names(nets(params))
        compvis = {m: k for k, m in kohya.items() if "input_blocks" in k or "middle_block" in k or "output_blocks" in k}
        renamed = {}
        for k, v in sd_k.items():
            name, _, part = k.partition(".")
            renamed[compvis.get(kohya[name], name) + "." + part] = v
        assert sum("input_blocks" in k for k in renamed) and sum("lora_te_" in k for k in renamed)
        sd_k = renamed
    f = str(tmp_path / "kohya.safetensors")
    fileio.write_safetensors(sd_k, f)
    pipe = fresh_pipe(path)
    pipe.load_lora_weights(f, unet_config=pipe.unet.config)
    ours = checkpoint.load_lora(f, params)
    e_unet, e_te = compare(pipe, lora.apply(nets(params), ours), cfg, f"kohya ({names} names) -> both")
    assert e_unet < MAX_REL and e_te < MAX_REL
    assert sum(v.numel() for v in tree.leaves(ours)) == sum(v.numel() for v in tree.leaves(lp))


def test_kohya_round_trip_is_exact(sd, tmp_path):
    _, params, _ = sd
    lp = random_lora(params, 3, vary=True)
    f = str(tmp_path / "k.safetensors")
    checkpoint.save_lora(lp, f, format="kohya")
    keys, _ = fileio.safetensors_header(f)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    back = checkpoint.load_lora(f, params)
    assert tree.flatten(back).keys() == tree.flatten(lp).keys()
    assert all(torch.equal(a, tree.flatten(lp)[k]) for k, a in tree.flatten(back).items())


def test_unmatched_keys_are_one_error_naming_the_file(sd, tmp_path):
    _, params, _ = sd
    sd_k = lora_files.to_kohya(random_lora(params, 4, target="attn"))
    sd_k["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    f = str(tmp_path / "bad.safetensors")
    fileio.write_safetensors(sd_k, f)
    with pytest.raises(checkpoint.CheckpointError, match=r"bad\.safetensors: LoRA keys that name no module of "
                                                         r"the model: lora_unet_down_blocks_7_attentions_0_proj_in"):
        checkpoint.load_lora(f, params)
    sd_d, meta = lora_files.to_diffusers(random_lora(params, 4, target="attn"))
    key = next(k for k in sd_d if k.endswith("lora_A.weight"))
    sd_d[key] = torch.zeros(4, 31)  # wrong in-features
    fileio.write_safetensors(sd_d, f, metadata=meta)
    with pytest.raises(checkpoint.CheckpointError, match=r"bad\.safetensors: LoRA shapes do not fit the model"):
        checkpoint.load_lora(f, params)
    del sd_d[key]
    fileio.write_safetensors(sd_d, f, metadata=meta)
    with pytest.raises(checkpoint.CheckpointError, match=r"bad\.safetensors: LoRA module unet/.* has no lora_A"):
        checkpoint.load_lora(f, params)
    sd_d, meta = lora_files.to_diffusers(random_lora(params, 4, target="attn"))
    sd_d["unet.mid_block.attentions.3.proj_out.lora_A.weight"] = torch.zeros(4, 64)
    fileio.write_safetensors(sd_d, f, metadata=meta)
    with pytest.raises(checkpoint.CheckpointError, match=r"bad\.safetensors: LoRA keys that name no module of "
                                                         r"the model: unet\.mid_block\.attentions\.3\.proj_out"):
        checkpoint.load_lora(f, params)


def test_linear_shaped_lora_of_a_1x1_conv_is_reshaped(sd, tmp_path):
    """SD 1.x's proj_in/proj_out are 1x1 convs, SD 2.x's linears; files carry either shape."""
    _, params, _ = sd
    lp = random_lora(params, 10, target=r"unet/.*/proj_(in|out)/weight")
    assert all(m["lora_A"].ndim == 4 for m in lora.modules(lp).values())
    flat = {k: v[:, :, 0, 0] if v.ndim == 4 else v for k, v in lora_files.to_kohya(lp).items()}
    f = str(tmp_path / "linear.safetensors")
    fileio.write_safetensors(flat, f)
    back = checkpoint.load_lora(f, params)
    assert all(torch.equal(a, tree.flatten(lp)[k]) for k, a in tree.flatten(back).items())


def test_two_loras_compose_as_diffusers_adapters(sd, tmp_path):
    path, params, cfg = sd
    a, b = random_lora(params, 5, target="attn,te_attn"), random_lora(params, 6, target="attn,conv", rank=2)
    files = [str(tmp_path / f"{n}.safetensors") for n in "ab"]
    for lp, f in zip((a, b), files):
        checkpoint.save_lora(lp, f)
    pipe = fresh_pipe(path)
    for n, f in zip("ab", files):
        pipe.load_lora_weights(f, adapter_name=n)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.5])
    merged = lora.merge(nets(params), [(a, 0.7), (b, -0.5)])
    chained = lora.apply(lora.apply(nets(params), a, 0.7), b, -0.5)
    assert all(torch.equal(x, tree.flatten(chained)[k]) for k, x in tree.flatten(merged).items())
    e_unet, e_te = compare(pipe, merged, cfg, "two LoRAs, scales 0.7 and -0.5")
    assert e_unet < MAX_REL and e_te < MAX_REL


def test_txt2img_and_run_sample_with_loras_match_diffusers(sd, tmp_path):
    path, params, cfg = sd
    a, b = random_lora(params, 7, target="attn,te_attn"), random_lora(params, 8, target="attn,conv", rank=2)
    files = [str(tmp_path / f"{n}.safetensors") for n in "ab"]
    checkpoint.save_lora(a, files[0])
    checkpoint.save_lora(b, files[1], format="kohya")
    lat = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    pipe = fresh_pipe(path)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(files[0], adapter_name="a")
    pipe.load_lora_weights(files[1], adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.6])
    ref = pipe(PROMPTS, latents=lat, num_inference_steps=6, guidance_scale=6.0, output_type="np").images
    ours = pipelines.txt2img(params, cfg, PROMPTS, latents=lat, steps=6, sampler="ddim", guidance_scale=6.0,
                             output_type="float", loras=[(checkpoint.load_lora(f, params), s)
                                                         for f, s in zip(files, (1.0, 0.6))])
    base = pipelines.txt2img(params, cfg, PROMPTS, latents=lat, steps=6, sampler="ddim", guidance_scale=6.0,
                             output_type="float")
    d = (ours.numpy() - ref) * 255
    print(f"txt2img with 2 LoRAs: mean abs diff {np.abs(d).mean():.2e} u8 levels, max {np.abs(d).max():.2e}; "
          f"LoRAs change the image by {np.abs((base.numpy() - ref) * 255).mean():.1f} levels")
    assert np.abs(d).mean() <= MAX_MEAN_ERR_U8 and np.abs((base.numpy() - ref) * 255).mean() > 1.0
    lat_file = str(tmp_path / "latents.safetensors")
    fileio.write_safetensors({"latents": lat}, lat_file)
    out = str(tmp_path / "out")
    assert cli(f"--ckpt={path}", *(f"--prompt={p}" for p in PROMPTS), f"--latents={lat_file}",
               f"--lora={files[0]}", f"--lora={files[1]}:0.6", "--config.sample.sampler=ddim",
               "--config.sample.steps=6", "--config.sample.guidance_scale=6.0", f"--outdir={out}") == 0
    pngs = read_pngs(out, 2).astype(np.int32)
    diff = np.abs(pngs - (ref * 255).round().astype(np.int32))
    print(f"run_sample.py --lora x2: mean abs diff {diff.mean():.2e} u8 levels, max {diff.max()}")
    assert diff.mean() < MAX_MEAN_ERR_U8 and diff.max() <= 1


def test_run_sample_lora_errors(sd, tmp_path, capsys):
    path, params, _ = sd
    assert cli(f"--ckpt={path}", "--prompt=x", f"--lora={tmp_path / 'none.safetensors'}:0.5") == 1
    assert "run_sample.py: error: --lora=" in capsys.readouterr().err
    f = str(tmp_path / "te_only.safetensors")
    sd_k = lora_files.to_kohya(random_lora(params, 9, target="te_attn"))
    fileio.write_safetensors({k.replace("layers_1", "layers_5"): v for k, v in sd_k.items()}, f)
    assert cli(f"--ckpt={path}", "--prompt=x", f"--lora={f}") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"run_sample.py: error: {f}: LoRA keys that name no module of the model: "
                              "lora_te_text_model_encoder_layers_5_")


def test_merged_model_saves_in_every_format(sd, tmp_path):
    _, params, cfg = sd
    merged = lora.merge(params, [(random_lora(params, 11, target="attn,conv,te_attn"), 0.8)])
    q = "down_blocks/0/attentions/0/transformer_blocks/0/attn1/to_q/weight"
    assert not torch.equal(tree.flatten(merged["unet"])[q], tree.flatten(params["unet"])[q])
    for fmt, name in (("native", "m.safetensors"), ("diffusers", "m_diffusers"), ("compvis", "m_cv.safetensors")):
        checkpoint.save(merged, cfg, str(tmp_path / name), format=fmt)
        back, _ = checkpoint.load(str(tmp_path / name), cfg=cfg)
        for section in ("unet", "text_encoder"):
            got = tree.flatten(back[section])
            assert all(torch.equal(got[k], v) for k, v in tree.flatten(merged[section]).items()), (fmt, section)
