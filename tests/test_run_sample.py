"""run_sample.py end to end on tiny diffusers folders made here, against diffusers'
StableDiffusionPipeline / StableDiffusionInpaintPipeline from the same latents; seeds,
PNG metadata, a training workdir as --ckpt, and each bad input's one-line error.

main() runs in-process (absl flags re-parsed per call); one test runs the script as a
subprocess to check the real exit status and that no traceback is printed.
"""

import os
import subprocess
import sys

import absl_main
import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from test_pipelines import MAX_MEAN_ERR_U8, tiny_sd_folder, with_scheduler

from sd_func import checkpoint, pipelines, random, tree
from sd_func.checkpoint import training as checkpointing
from sd_func.pipelines import images, job, unet_call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=" + os.path.join(ROOT, "configs", "tiny.py"), "--config.sample.batch_size=2"]
PROMPTS = ["a red circle on a blue background", "a green square"]


def cli(*args):
    """run_sample.main with these flags under sd_func.cli's error policy (a UserError is one
    line and exit status 1); returns the exit status."""
    return absl_main.call("run_sample", "run_sample.py", [*TINY, *args])


def read_pngs(outdir, n):
    return np.stack([np.array(PIL.Image.open(os.path.join(outdir, f"{k:05d}.png"))) for k in range(n)])


@pytest.fixture(scope="module")
def sd4(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd4"))
    return path, tiny_sd_folder(path, seed=1)


@pytest.fixture(scope="module")
def sd9(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd9"))
    return path, tiny_sd_folder(path, in_channels=9, seed=2)


def _latents_file(tmp_path, n, seed=5, shape=(4, 16, 16)):
    lat = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    path = str(tmp_path / "latents.safetensors")
    safetensors.torch.save_file({"latents": lat}, path)
    return path, lat


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_txt2img_matches_diffusers(sd4, tmp_path, sampler):
    path, pipe = sd4
    lat_file, lat = _latents_file(tmp_path, 2)
    out = str(tmp_path / "out")
    assert cli(f"--ckpt={path}", *(f"--prompt={p}" for p in PROMPTS), "--negative_prompt=a dark corner",
               f"--latents={lat_file}", f"--config.sample.sampler={sampler}", "--config.sample.steps=6",
               "--config.sample.guidance_scale=6.0", "--seed=40", f"--outdir={out}") == 0
    ours = read_pngs(out, 2)
    ref = with_scheduler(pipe, sampler)(PROMPTS, negative_prompt=["a dark corner"] * 2, latents=lat,
                                        num_inference_steps=6, guidance_scale=6.0, output_type="np").images
    ref_u8 = (ref * 255).round().astype(np.uint8)
    d = np.abs(ours.astype(np.int32) - ref_u8.astype(np.int32))
    print(f"run_sample txt2img {sampler}: mean abs diff {d.mean():.2e} u8 levels, max {d.max()}")
    assert ours.shape == (2, 32, 32, 3) and ref_u8.std() > 10
    assert d.mean() < MAX_MEAN_ERR_U8 and d.max() <= 1
    meta = images.read_png_text(os.path.join(out, "00001.png"))
    assert meta["prompt"] == PROMPTS[1] and meta["negative_prompt"] == "a dark corner"
    assert meta["seed"] == "41" and meta["sampler"] == sampler and meta["steps"] == "6"
    assert meta["guidance_scale"] == "6.0" and meta["checkpoint"] == path
    grid = np.array(PIL.Image.open(os.path.join(out, "grid.png")))
    assert grid.shape == (64, 32, 3) and (grid[32:] == ours[1]).all()  # 2 prompts x 1 image: a column


def test_inpaint_9channel_matches_diffusers(sd9, tmp_path):
    path, pipe = sd9
    g = torch.Generator().manual_seed(7)
    image = (torch.rand(32, 32, 3, generator=g) * 255).round().to(torch.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[6:26, 10:30] = 255
    PIL.Image.fromarray(image.numpy()).save(tmp_path / "init.png")
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    lat_file, lat = _latents_file(tmp_path, 1)
    out, seed = str(tmp_path / "out"), 9
    assert cli(f"--ckpt={path}", f"--prompt={PROMPTS[0]}", f"--latents={lat_file}", f"--seed={seed}",
               f"--init_image={tmp_path / 'init.png'}", f"--mask={tmp_path / 'mask.png'}",
               "--config.sample.sampler=ddim", "--config.sample.steps=5", f"--outdir={out}") == 0
    ours = read_pngs(out, 1)
    # With latents given and strength 1, diffusers' only generator draw is the masked image's VAE
    # sample; ours comes from image_keys(seed)["vae"] fold 1.
    gen = random.generator(random.fold_in(pipelines.image_keys(seed)["vae"], 1))
    ref = with_scheduler(pipe, "ddim")(
        PROMPTS[0], image=PIL.Image.open(tmp_path / "init.png"), mask_image=PIL.Image.open(tmp_path / "mask.png"),
        latents=lat, num_inference_steps=5, generator=gen, output_type="np").images
    ref_u8 = (ref * 255).round().astype(np.uint8)
    d = np.abs(ours.astype(np.int32) - ref_u8.astype(np.int32))
    print(f"run_sample inpaint (9-channel) ddim: mean abs diff {d.mean():.2e} u8 levels, max {d.max()}")
    assert ref_u8.std() > 10 and d.mean() < MAX_MEAN_ERR_U8 and d.max() <= 1
    meta = images.read_png_text(os.path.join(out, "00000.png"))
    assert meta["mode"] == "inpaint" and meta["strength"] == "1.0"


def test_seeds_follow_image_index(sd4, tmp_path):
    """Image k of --seed=S is the image of seed S + k, whatever the batch it ran in."""
    path, _ = sd4
    out = str(tmp_path / "out")
    assert cli(f"--ckpt={path}", "--prompt=a red circle", "--num_images=3", "--seed=100",
               "--config.sample.steps=3", "--config.sample.batch_size=2", f"--outdir={out}") == 0
    ours = read_pngs(out, 3)
    assert [images.read_png_text(os.path.join(out, f"{k:05d}.png"))["seed"] for k in range(3)] == ["100", "101", "102"]
    params, cfg = checkpoint.load(path)
    alone = pipelines.txt2img(params, cfg, "a red circle", seeds=[102], steps=3, sampler="ddim", batch_size=1)
    assert np.abs(ours[2].astype(int) - alone[0].numpy().astype(int)).max() <= 1


def test_training_workdir_uses_ema(sd4, tmp_path):
    """--ckpt=<workdir>: the newest training checkpoint, with its EMA UNet weights."""
    path, _ = sd4
    params, cfg = checkpoint.load(path)
    raw = tree.tree_map(lambda x: x + 0.05 * torch.randn_like(x), params["unet"])
    wd = str(tmp_path / "run")
    trees = {"params": {"unet": raw}, "ema": {"unet": params["unet"]},
             "frozen": {"vae": params["vae"], "text_encoder": params["text_encoder"]}}
    meta = {"config": checkpointing.config_json(cfg)}
    checkpointing.save(wd, 1, {"params": {"unet": raw}, "frozen": trees["frozen"]}, meta)
    checkpointing.save(wd, 2, trees, {"config": checkpointing.config_json(cfg)})
    common = ("--prompt=a red circle", "--config.sample.steps=2", "--seed=3")
    assert cli(f"--ckpt={wd}", *common, f"--outdir={tmp_path / 'a'}") == 0
    assert cli(f"--ckpt={path}", *common, f"--outdir={tmp_path / 'b'}") == 0
    a, b = read_pngs(str(tmp_path / "a"), 1), read_pngs(str(tmp_path / "b"), 1)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize("fmt", ["compvis", "native"])
def test_single_file_checkpoints(sd4, tmp_path, fmt):
    """--ckpt=<CompVis or native file> gives the diffusers folder's image."""
    path, _ = sd4
    params, cfg = checkpoint.load(path)
    f = str(tmp_path / f"{fmt}.safetensors")
    checkpoint.save(params, cfg, f, format=fmt)
    common = ("--prompt=a red circle", "--config.sample.steps=1", "--seed=5")
    assert cli(f"--ckpt={f}", *common, f"--outdir={tmp_path / 'a'}") == 0
    ref = pipelines.txt2img(params, cfg, "a red circle", seeds=[5], steps=1, sampler="ddim")
    assert np.abs(read_pngs(str(tmp_path / "a"), 1).astype(int) - ref.numpy().astype(int)).max() <= 1


def _bad_cases(tmp_path, ckpt):
    lat_file, _ = _latents_file(tmp_path, 1, shape=(4, 8, 8))
    lat_file2 = str(tmp_path / "lat2.safetensors")
    safetensors.torch.save_file({"latents": torch.zeros(2, 3, 16, 16)}, lat_file2)
    PIL.Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "init.png")
    PIL.Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "mask.png")
    p = "--prompt=a red circle"
    return {
        "checkpoint not found": ((f"--ckpt={tmp_path / 'nope'}", p), "checkpoint not found"),
        "unknown sampler": ((f"--ckpt={ckpt}", p, "--config.sample.sampler=dpm_fast"),
                            ("unknown sampler 'dpm_fast': expected one of ddim, plms, euler, euler_ancestral, "
                             "heun, lms, dpmpp_2m, dpmpp_2m_karras, ddpm")),
        "steps < 1": ((f"--ckpt={ckpt}", p, "--config.sample.steps=0"), "steps=0: expected an integer >= 1"),
        "height": ((f"--ckpt={ckpt}", p, "--config.sample.height=30"), "height=30: expected a positive multiple of 8"),
        "width": ((f"--ckpt={ckpt}", p, "--config.sample.width=20"), "width=20: expected a positive multiple of 8"),
        "latents count": ((f"--ckpt={ckpt}", p, "--num_images=2", f"--latents={lat_file}"),
                          "latents have shape (1, 4, 8, 8), expected [2, 4, h, w]"),
        "latents channels": ((f"--ckpt={ckpt}", p, "--num_images=2", f"--latents={lat_file2}"),
                             "latents have shape (2, 3, 16, 16), expected [2, 4, h, w]"),
        "mask size": ((f"--ckpt={ckpt}", p, f"--init_image={tmp_path / 'init.png'}", f"--mask={tmp_path / 'mask.png'}"),
                      "is 16x16 but --init_image"),
        "no prompt": ((f"--ckpt={ckpt}",), "no prompt"),
    }


@pytest.mark.parametrize("case", ["checkpoint not found", "unknown sampler", "steps < 1", "height", "width",
                                  "latents count", "latents channels", "mask size", "no prompt"])
def test_bad_input_one_line_error(sd4, tmp_path, capsys, case):
    args, message = _bad_cases(tmp_path, sd4[0])[case]
    capsys.readouterr()
    assert cli(*args, f"--outdir={tmp_path / 'out'}") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("run_sample.py: error: ") and "\n" not in err, err
    assert message in err, err
    assert not os.path.exists(tmp_path / "out")


def test_bad_input_subprocess_exit_status(tmp_path):
    """As a real process: exit status 1, one line on stderr, no traceback."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "run_sample.py"), *TINY, "--prompt=a red circle",
                        f"--ckpt={tmp_path / 'missing'}", f"--outdir={tmp_path / 'out'}"],
                       check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and lines[-1].startswith("run_sample.py: error: --ckpt="), r.stderr
    assert "checkpoint not found" in lines[-1]


def test_outdir_that_is_a_file_fails_before_any_model_loads(sd4, tmp_path, capsys, monkeypatch):
    path, _ = sd4
    (tmp_path / "out").write_text("not a folder")

    def no_load(*a, **kw):
        raise AssertionError("the checkpoint was loaded")
    monkeypatch.setattr(job, "load_model", no_load)
    capsys.readouterr()
    assert cli(f"--ckpt={path}", "--prompt=a red circle", f"--outdir={tmp_path / 'out'}") == 1
    err = capsys.readouterr().err.strip()
    assert err == f"run_sample.py: error: --outdir={tmp_path / 'out'}: exists and is not a folder", err


def test_compile_setting_builds_the_unet_call_once(sd4, tmp_path, monkeypatch):
    """cfg.sample.compile goes to unet_call.make_unet_fn, once per run; the pipeline uses that call."""
    path, _ = sd4
    built, calls, eager = [], [], unet_call.make_unet_fn

    def make(cfg_unet, compile=False):
        built.append(compile)
        inner = eager(cfg_unet)

        def call(*a):
            calls.append(1)
            return inner(*a)
        return call
    monkeypatch.setattr(unet_call, "make_unet_fn", make)
    assert cli(f"--ckpt={path}", "--prompt=a red circle", "--num_images=3", "--config.sample.steps=2",
               "--config.sample.compile=True", f"--outdir={tmp_path / 'out'}") == 0
    assert built == [True] and len(calls) == 2 * 2  # 2 chunks (batch_size 2) x 2 steps
