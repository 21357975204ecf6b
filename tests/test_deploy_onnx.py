"""run_export.py --out: the four ONNX files, run by onnxruntime (CPU), against the pure
apply / encode / decode on the same params and inputs, at two batch sizes and two latent
sizes; pipeline.json and the tokenizer files; the one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from deploy_models import TINY_CONFIG, tiny_checkpoint

from configs import tiny
from sd_func import random, tree
from sd_func.diffusion import schedules
from sd_func.models import autoencoder, text_encoder, tokenizer, unet
from sd_func.pipelines import job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_REL_ERR = 1e-4  # max |onnx - apply| / max |apply|, float32
BATCHES = (1, 3)
LATENTS = ((16, 16), (8, 24))  # the tiny model's native 16x16 and a smaller, non-square one


def run_export(*args):
    return subprocess.run([sys.executable, "run_export.py", f"--config={TINY_CONFIG}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    ckpt = tiny_checkpoint(str(d / "tiny.safetensors"), seed=3)
    r = run_export(f"--ckpt={ckpt}", f"--out={d / 'out'}")
    assert r.returncode == 0, r.stderr[-3000:]
    params, cfg = job.load_model(ckpt, tiny.get_config(), device="cpu")
    return d / "out", params, cfg


def session(folder, name):
    return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])


def rel_err(got, want) -> float:
    want = want.detach().numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


def report(name, errs):
    print(f"\n{name}: max relative error {max(errs):.2e} over {len(errs)} shapes")
    assert max(errs) < MAX_REL_ERR, errs


def test_text_encoder_matches_apply(exported):
    folder, params, cfg = exported
    s, errs = session(folder, "text_encoder.onnx"), []
    for b in BATCHES:
        for length in (77, 12):
            ids = torch.randint(0, cfg.text_encoder.vocab_size, (b, length), generator=torch.Generator().manual_seed(b))
            (got,) = s.run(None, {"input_ids": ids.numpy()})
            errs.append(rel_err(got, text_encoder.apply(params["text_encoder"], ids, cfg.text_encoder)))
    report("text_encoder.onnx", errs)


def test_unet_matches_apply(exported):
    folder, params, cfg = exported
    s, errs = session(folder, "unet.onnx"), []
    for b in BATCHES:
        for h, w in LATENTS:
            x = random.normal(random.key(b * h), (b, 4, h, w))
            t = torch.linspace(1, 999, b)
            ctx = random.normal(random.key(b + h), (b, 77, cfg.unet.cross_attention_dim))
            (got,) = s.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()})
            assert got.shape == (b, 4, h, w)
            errs.append(rel_err(got, unet.apply(params["unet"], x, t, ctx, cfg.unet)))
    report("unet.onnx", errs)


def test_vae_decoder_and_encoder_match(exported):
    folder, params, cfg = exported
    dec, enc, errs = session(folder, "vae_decoder.onnx"), session(folder, "vae_encoder.onnx"), []
    for b in BATCHES:
        for h, w in LATENTS:
            z = random.normal(random.key(b * w), (b, 4, h, w))
            (img,) = dec.run(None, {"latent": z.numpy()})
            assert img.shape == (b, 3, 2 * h, 2 * w)
            errs.append(rel_err(img, autoencoder.decode(params["vae"], z, cfg.vae)))
            x = torch.rand(b, 3, 2 * h, 2 * w, generator=torch.Generator().manual_seed(w)) * 2 - 1
            mean, logvar = enc.run(None, {"image": x.numpy()})
            want_mean, want_logvar = autoencoder.encode(params["vae"], x, cfg.vae)
            errs += [rel_err(mean, want_mean), rel_err(logvar, want_logvar)]
    report("vae_decoder.onnx + vae_encoder.onnx", errs)


def test_graph_signatures_and_dynamic_axes(exported):
    folder, _, _ = exported
    want = {"text_encoder.onnx": (["input_ids"], ["last_hidden_state"]),
            "unet.onnx": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
            "vae_decoder.onnx": (["latent"], ["image"]), "vae_encoder.onnx": (["image"], ["mean", "logvar"])}
    for name, (ins, outs) in want.items():
        g = onnx.load(str(folder / name)).graph
        assert [i.name for i in g.input] == ins and [o.name for o in g.output] == outs, name
        dims = g.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param, f"{name}: batch axis is not dynamic"
        if len(dims) == 4:
            assert dims[2].dim_param and dims[3].dim_param, f"{name}: spatial axes are not dynamic"


def test_convolutions_are_conv_nodes(exported):
    """The CPU eager fast path (convolutions as gathered-patch GEMMs) stays out of the graphs:
    one ONNX Conv per conv weight (the transformers' 1x1 proj_in / proj_out are token
    linears), which TensorRT and onnxruntime fuse."""
    folder, params, _ = exported
    for name, p, prefixes in (("unet.onnx", params["unet"], ("",)),
                              ("vae_decoder.onnx", params["vae"], ("decoder/", "post_quant_conv/"))):
        convs = sum(1 for n in onnx.load(str(folder / name)).graph.node if n.op_type == "Conv")
        weights = sum(1 for k, v in tree.flatten(p).items() if v.ndim == 4 and k.startswith(prefixes)
                      and not k.endswith(("proj_in/weight", "proj_out/weight")))
        assert convs == weights, (name, convs, weights)


def test_pipeline_json_and_tokenizer(exported):
    folder, _, cfg = exported
    p = json.loads((folder / "pipeline.json").read_text())
    assert p["prediction_type"] == "epsilon" and p["scaling_factor"] == cfg.vae.scaling_factor
    assert p["defaults"]["height"] == cfg.sample.height and p["defaults"]["sampler"] == cfg.sample.sampler
    np.testing.assert_allclose(p["alphas_cumprod"], schedules.alphas_cumprod(cfg.diffusion).numpy(), rtol=1e-6)
    assert p["models"]["unet.onnx"]["outputs"] == ["out_sample"]
    tok, ref = tokenizer.load(str(folder / "tokenizer")), tokenizer.load(cfg.text_encoder.tokenizer)
    prompt = "a red circle on a blue background"
    assert torch.equal(tokenizer.encode(tok, [prompt], 77), tokenizer.encode(ref, [prompt], 77))


def test_float16_export_runs(exported, tmp_path):
    folder, params, cfg = exported
    ckpt = tiny_checkpoint(str(tmp_path / "tiny.safetensors"), seed=3)
    r = run_export(f"--ckpt={ckpt}", f"--out={tmp_path / 'fp16'}", "--dtype=float16")
    assert r.returncode == 0, r.stderr[-3000:]
    g = onnx.load(str(tmp_path / "fp16" / "vae_decoder.onnx"))
    assert g.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    z = random.normal(random.key(0), (1, 4, 16, 16))
    (img,) = session(tmp_path / "fp16", "vae_decoder.onnx").run(None, {"latent": z.half().numpy()})
    assert rel_err(img.astype(np.float32), autoencoder.decode(params["vae"], z, cfg.vae)) < 1e-2


@pytest.mark.parametrize("case", ["inpainting_unet", "bad_dtype", "no_output"])
def test_bad_input_is_one_line(tmp_path, case):
    ckpt = str(tmp_path / "tiny.safetensors")
    if case == "inpainting_unet":
        tiny_checkpoint(ckpt, in_channels=9)
        args, want = [f"--out={tmp_path / 'o'}"], "unet.in_channels=9: an inpainting UNet"
    elif case == "bad_dtype":
        tiny_checkpoint(ckpt)
        args, want = [f"--out={tmp_path / 'o'}", "--dtype=bfloat16"], "--dtype=bfloat16: expected one of"
    else:
        tiny_checkpoint(ckpt)
        args, want = [], "give --out=DIR"
    r = run_export(f"--ckpt={ckpt}", *args)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("run_export.py: error: ") and want in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
