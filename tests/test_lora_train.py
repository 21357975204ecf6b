"""LoRA and DreamBooth training on configs/tiny.py's random model.

The step trains the LoRA alone: the state (params, AdamW's moments, EMA) holds only A and
B, the base UNet and text encoder (inputs of the step) stay bit-identical, the compiled
step (aot_eager: the one graph inductor gets) equals eager, and the loss falls. A run
through run_train.py resumes, exports a diffusers LoRA file, and the workdir samples as
its base + that file. DreamBooth: the prior-preservation loss equals diffusers'
train_dreambooth.py formula on the same batch, the data source alternates instance and
class examples, and class images are generated once (resumable).
"""

import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_runs as runs
from configs import dreambooth as dreambooth_config
from configs import lora as lora_config
from configs import shapes_lora as shapes_lora_config
from sd_func import checkpoint, data, lora, pipelines, random, tree
from sd_func.data import shapes as shapes_data
from sd_func.diffusion import schedules
from sd_func.errors import UserError
from sd_func.eval import shapes as shapes_eval
from sd_func.models import autoencoder, text_encoder, unet
from sd_func.pipelines import images as image_io
from sd_func.train import checks, dreambooth, unet_stage

B = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**lora_overrides):
    cfg = lora_config.get_config("tiny")
    cfg.train.update(compile=False, cond_drop=0.0)
    cfg.lora.update(**lora_overrides)
    return cfg


@pytest.fixture(scope="module")
def models():
    cfg = lora_config.get_config("tiny")
    g = torch.Generator().manual_seed(0)
    params = {"unet": unet.init(random.key(0), cfg.unet), "vae": autoencoder.init(random.key(1), cfg.vae),
              "text_encoder": text_encoder.init(random.key(2), cfg.text_encoder)}
    return {"params": params, "images": torch.rand(B, 3, 32, 32, generator=g) * 2 - 1,
            "input_ids": torch.randint(2, 1000, (B, 77), generator=g)}


def _batch(cfg, models, step):
    inputs = unet_stage.step_inputs(cfg, random.key(0), step, range(B), unet_stage.latent_shape(cfg))
    return {"images": models["images"], "input_ids": models["input_ids"], **inputs}


def _train(cfg, models, steps, backend="inductor"):
    base = tree.tree_map(lambda x: x.clone(), models["params"])
    state, tx, lay, frozen = unet_stage.setup(cfg, base, random.key(9))
    fn = unet_stage.make_train_step(cfg, tx, lay, backend=backend)
    losses = []
    for s in range(steps):
        state, metrics = fn(state, frozen, _batch(cfg, models, s))
        losses.append(float(metrics["loss"]))
    return state, frozen, losses


@pytest.mark.parametrize("te", [False, True])
def test_only_lora_params_train_and_the_loss_falls(models, te):
    cfg = _cfg(train_text_encoder=te, target="attn,te_attn,conv")
    state, frozen, losses = _train(cfg, models, 12)
    sections = {"unet", "text_encoder"} if te else {"unet"}
    for name in ("params", "ema"):
        assert set(state[name]) == {lora.TREE} and set(state[name][lora.TREE]) == sections
    paths = tree.flatten(state["params"])
    assert all(p.rpartition("/")[2] in lora.WEIGHTS for p in paths)
    assert tree.flatten(state["opt"]["adamw"]["mu"]).keys() == paths.keys()
    assert tree.num_params(state["params"]) < tree.num_params(models["params"]["unet"]) / 4
    for name in ("unet", "vae", "text_encoder"):  # the frozen base: bit-identical after the steps
        for k, v in tree.flatten(models["params"][name]).items():
            assert torch.equal(tree.flatten(frozen[name])[k], v), (name, k)
    b = [v for p, v in paths.items() if p.endswith("lora_B")]
    assert all(v.abs().sum() > 0 for v in b)  # every B moved off zero (conv and text encoder too)
    print(f"LoRA (text encoder {te}) loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])


def test_compiled_lora_step_matches_eager(models):
    cfg = _cfg()
    eager, _, l_eager = _train(cfg, models, 2)
    cfg.train.compile = True
    compiled, _, l_comp = _train(cfg, models, 2, backend="aot_eager")
    assert l_comp == pytest.approx(l_eager, rel=1e-5)
    # AdamW moves an entry by lr * m / (sqrt(v) + eps): B starts at zero, so A's first
    # gradients are ~0 and their rounding shows at a small fraction of lr (see test_train_step)
    for name, tol in (("params", 2e-3 * cfg.train.lr), ("ema", 2e-3 * cfg.train.lr)):
        fe, fc = tree.flatten(eager[name]), tree.flatten(compiled[name])
        assert fe.keys() == fc.keys() and max(float((fe[k] - fc[k]).abs().max()) for k in fe) < tol, name
    mu_e, mu_c = tree.flatten(eager["opt"]["adamw"]["mu"]), tree.flatten(compiled["opt"]["adamw"]["mu"])
    scale = max(float(v.abs().max()) for v in mu_e.values())
    assert max(float((mu_e[k] - mu_c[k]).abs().max()) for k in mu_e) < 1e-4 * scale


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_lora_steps_stay_near_fp32(models, precision):
    cfg = _cfg()
    ref, _, l_ref = _train(cfg, models, 3)
    cfg.train.precision = precision
    got, _, l_got = _train(cfg, models, 3)
    assert l_got != l_ref and l_got == pytest.approx(l_ref, rel=2e-2)  # reduced precision really ran
    assert all(v.dtype == torch.float32 for v in tree.leaves(got["params"]))  # fp32 master weights
    flat = lambda s: torch.cat([v.reshape(-1) for v in tree.flatten(s["params"]).values()])
    p0 = flat(unet_stage.setup(cfg, models["params"], random.key(9))[0])
    cos = F.cosine_similarity(flat(got) - p0, flat(ref) - p0, dim=0)
    rel = (flat(got) - flat(ref)).norm() / (flat(ref) - p0).norm()
    print(f"LoRA {precision}: loss {l_got[-1]:.5f} vs fp32 {l_ref[-1]:.5f}; update cosine {cos:.4f}, rel {rel:.4f}")
    assert cos > 0.98 and rel < 0.2


def test_prior_preservation_loss_is_diffusers_formula(models):
    """diffusers' train_dreambooth.py: model_pred, model_pred_prior = chunk(model_pred, 2) (and
    the target), loss = mse(pred, target) + prior_loss_weight * mse(pred_prior, target_prior)."""
    cfg = _cfg()
    cfg.train.prior_loss_weight = 0.7
    params = models["params"]
    batch = _batch(cfg, models, 0)
    batch["prior"] = torch.tensor([False, True, False, True])  # as data.dreambooth alternates them
    frozen = {"vae": params["vae"], "text_encoder": params["text_encoder"],
              "alphas_cumprod": schedules.alphas_cumprod(cfg.diffusion)}
    ours, _ = unet_stage.loss_fn(cfg)({"unet": params["unet"]}, frozen, batch)
    mean, logvar = autoencoder.encode(params["vae"], batch["images"], cfg.vae)
    x0 = autoencoder.sample_latent(mean, logvar, batch["latent_noise"]) * cfg.vae.scaling_factor
    ab = frozen["alphas_cumprod"][batch["timesteps"]][:, None, None, None]
    noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * batch["noise"]
    ctx = text_encoder.apply(params["text_encoder"], batch["input_ids"], cfg.text_encoder)
    pred = unet.apply(params["unet"], noisy, batch["timesteps"], ctx, cfg.unet)
    order = torch.tensor([0, 2, 1, 3])  # diffusers' collate: instance examples first, then class ones
    pred, target = pred[order], batch["noise"][order]
    model_pred, model_pred_prior = torch.chunk(pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    ref = F.mse_loss(model_pred, target) + 0.7 * F.mse_loss(model_pred_prior, target_prior)
    print(f"prior preservation loss: ours {ours.item():.6f}, diffusers' formula {ref.item():.6f}")
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    plain, _ = unet_stage.loss_fn(cfg)({"unet": params["unet"]}, frozen, {k: v for k, v in batch.items()
                                                                          if k != "prior"})
    assert abs(plain.item() - ref.item()) > 1e-3  # the weights matter


def test_lora_run_resumes_exports_and_samples(tmp_path):
    workdir = str(tmp_path / "run")
    args = ["--config=configs/lora.py:tiny", "--config.train.batch_size=4", "--config.train.checkpoint_every=2",
            "--config.train.log_every=2"]
    runs.run(args, workdir, "--config.train.steps=2")
    p = runs.run(args, workdir, "--config.train.steps=4")
    assert "resumed from step 2" in p.stderr + p.stdout
    t = runs.trees(workdir)
    assert all(k.startswith("lora/unet/") for k in t["params"])
    # torchrun, 2 ranks x batch 2 == 1 process x batch 4: the moments to float32 summation
    # order (bounds and why: test_train_loop.py::test_two_processes_match_one)
    two = str(tmp_path / "two")
    runs.run(args, two, "--config.train.steps=4", nproc=2)
    t2 = runs.trees(two)
    for name in ("mu", "nu"):
        keys = [k for k in t["opt"] if k.startswith(f"adamw/{name}/")]
        err = max((t2["opt"][k] - t["opt"][k]).abs().max().item() for k in keys)
        assert err <= 1e-5 * max(t["opt"][k].abs().max().item() for k in keys), name
    assert max((t2["params"][k] - t["params"][k]).abs().max().item() for k in t["params"]) <= 1e-2 / 4
    assert any(k.startswith("lora_alpha/unet/") for k in t["frozen"])
    assert any(k.startswith("unet/") for k in t["frozen"])
    lora_file = os.path.join(workdir, "pytorch_lora_weights.safetensors")
    meta = json.loads(checkpoint.files.safetensors_header(lora_file)[1]["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 4.0
    frozen = tree.unflatten(t["frozen"])
    base = {k: frozen[k] for k in ("unet", "vae", "text_encoder")}
    lp = checkpoint.load_lora(lora_file, base)
    cfg = lora_config.get_config("tiny")
    merged, _ = checkpoint.load(workdir, ema=True)  # the workdir as a model: base + its LoRA (EMA, as exported)
    kw = dict(seeds=[0], steps=3, sampler="ddim", guidance_scale=2.0)
    a = pipelines.txt2img(merged, cfg, "a red circle", **kw)
    b = pipelines.txt2img(base, cfg, "a red circle", loras=[(lp, 1.0)], **kw)
    assert torch.equal(a, b) and not torch.equal(a, pipelines.txt2img(base, cfg, "a red circle", **kw))


def _instance_folder(path, n=3):
    os.makedirs(path)
    g = np.random.default_rng(0)
    for i in range(n):
        image_io.save_png(os.path.join(path, f"dog{i}.png"), torch.from_numpy(g.integers(0, 255, (40, 36, 3),
                                                                                        dtype=np.uint8)))
    return path


def test_dreambooth_class_images_and_batches(tmp_path):
    cfg = dreambooth_config.get_config("tiny")
    base = str(tmp_path / "base.safetensors")
    params = {"unet": unet.init(random.key(0), cfg.unet), "vae": autoencoder.init(random.key(1), cfg.vae),
              "text_encoder": text_encoder.init(random.key(2), cfg.text_encoder)}
    checkpoint.save(params, cfg, base)
    cfg.init_from = base
    cfg.data.instance_dir = _instance_folder(str(tmp_path / "dog"))
    cfg.sample.steps = 2
    workdir = str(tmp_path / "work")
    out = dreambooth.prepare(cfg, workdir, main=True)
    folder = os.path.join(workdir, dreambooth.CLASS_DIR)
    assert out.data.class_dir == folder and sorted(os.listdir(folder)) == [f"{i:05d}.png" for i in range(4)]
    first = image_io.read_png_text(os.path.join(folder, "00002.png"))
    pixels = np.array(pipelines.images.load_image(os.path.join(folder, "00002.png")))
    os.remove(os.path.join(folder, "00002.png"))
    mtime = os.path.getmtime(os.path.join(folder, "00001.png"))
    assert dreambooth.generate_class_images(cfg, folder) == 1  # resumable: only the missing one
    assert os.path.getmtime(os.path.join(folder, "00001.png")) == mtime
    assert np.array_equal(np.array(pipelines.images.load_image(os.path.join(folder, "00002.png"))), pixels)
    assert first["prompt"] == "a photo of dog"
    source = data.make_source(out.data, 0)
    batch = source.batch(3, 4)
    assert batch["prior"].tolist() == [False, True, False, True]
    assert batch["captions"] == ["a photo of sks dog", "a photo of dog"] * 2
    assert batch["images"].shape == (4, 3, 32, 32) and torch.equal(source.batch(3, 4)["images"], batch["images"])


def test_dreambooth_run(tmp_path):
    cfg = dreambooth_config.get_config("tiny")
    base = str(tmp_path / "base.safetensors")
    params = {"unet": unet.init(random.key(0), cfg.unet), "vae": autoencoder.init(random.key(1), cfg.vae),
              "text_encoder": text_encoder.init(random.key(2), cfg.text_encoder)}
    checkpoint.save(params, cfg, base)
    instance = _instance_folder(str(tmp_path / "dog"))
    workdir = str(tmp_path / "run")
    args = ["--config=configs/dreambooth.py:tiny", f"--config.init_from={base}",
            f"--config.data.instance_dir={instance}", "--config.sample.steps=2", "--config.lora.rank=2"]
    p = runs.run(args, workdir)
    assert "generated 4 class images" in p.stdout
    rows = runs.rows(workdir)
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    assert all(k.startswith("lora/") for k in runs.trees(workdir)["params"])


def test_shapes_new_colors_are_drawn_and_read():
    """The fine-tuning colors: only in data that asks for them, read back by the analyzer."""
    assert len(shapes_data.prompts()) == 90 and not any("orange" in p or "purple" in p for p in shapes_data.prompts())
    cfg = shapes_lora_config.get_config("smoke")
    source = data.make_source(cfg.data, 0)
    captions = [c for s in range(30) for c in source.batch(s, 4)["captions"]]
    assert all(c.startswith("a orange ") for c in captions)
    assert len(set(captions)) <= 18 and source.num_examples == shapes_lora_config.NUM_EXAMPLES
    for color in shapes_data.NEW_COLORS:
        imgs = [shapes_data.draw(color, s, b, 16.0, (32, 32)) for b in shapes_data.COLORS for s in shapes_data.SHAPES]
        reads = [shapes_eval.analyze(i) for i in imgs]
        assert [r["color"] for r in reads] == [color] * 18
        assert [r["shape"] for r in reads] == list(shapes_data.SHAPES) * 6


@pytest.mark.parametrize("override, message", [
    ("rank=-1", "config.lora.rank=-1: expected an integer >= 0"),
    ("alpha=0.0", "config.lora.alpha=0.0: expected a number > 0"),
    ("target=(", "config.lora.target='(': not target names"),
    ("format=peft", "config.lora.format='peft': expected one of"),
])
def test_bad_lora_config_is_one_line(override, message):
    cfg = lora_config.get_config("tiny")
    key, value = override.split("=")
    cfg.lora[key] = type(cfg.lora[key])(value)
    with pytest.raises(UserError, match=re.escape(message)):
        checks.validate(cfg)
    cfg = lora_config.get_config("tiny")
    cfg.lora.target = "unet/nothing/.*"
    with pytest.raises(UserError, match="config.lora: LoRA target 'unet/nothing/.*' matches no linear or conv"):
        unet_stage.setup(cfg, {"unet": unet.init(random.key(0), cfg.unet)}, 0)
