"""Sample images from a Stable Diffusion checkpoint: flags only, sd_func.pipelines does the work.

  python run_sample.py --config=configs/txt2img.py --ckpt=PATH --prompt="a photo of a cat" \
      [--prompt=... | --prompts_file=FILE] [--negative_prompt=...] [--seed=0] [--num_images=4] \
      [--lora=FILE[:SCALE] ...] [--latents=FILE.safetensors] [--init_image=IMG [--mask=MASK] [--strength=0.8]] \
      [--config.sample.sampler=dpmpp_2m --config.sample.steps=25 ...] --outdir=out/

--ckpt: a diffusers folder, CompVis .safetensors/.ckpt, sd_func native .safetensors, or a
training workdir (its newest checkpoint, EMA weights). The architecture comes from the
checkpoint; --config gives cfg.sample (sampler, steps, guidance_scale, guidance_rescale,
eta, height, width, batch_size, dtype, compile, clip_skip). Writes <outdir>/00000.png, ...
(image k uses seed --seed + k) and grid.png. Bad input ends with one line
`run_sample.py: error: ...` and exit status 1, before any model loads (sd_func.cli).
"""

import os

from absl import flags
from ml_collections import config_flags

from sd_func import cli
from sd_func.pipelines import job

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "txt2img.py"),
                                "Config file; its `sample` section gives the sampling options.",
                                lock_config=False)
flags.DEFINE_string("ckpt", None, "Diffusers folder, CompVis file, native file or training workdir.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line.")
flags.DEFINE_string("negative_prompt", "", "Negative prompt (the unconditional branch of guidance).")
flags.DEFINE_integer("seed", 0, "Image k of the run uses seed + k.")
flags.DEFINE_integer("num_images", 1, "Images per prompt.")
flags.DEFINE_string("latents", None, "safetensors file with a tensor `latents` [N,4,h,w]: the initial noise.")
flags.DEFINE_string("init_image", None, "Init image: img2img, or inpaint with --mask.")
flags.DEFINE_string("mask", None, "Inpainting mask, the init image's size (white = repaint).")
flags.DEFINE_float("strength", None, "How far to noise the init image (default 0.8 img2img, 1.0 inpaint).")
flags.DEFINE_multi_string("lora", [], "A LoRA file (diffusers or kohya .safetensors), optionally :SCALE "
                          "(default 1.0); repeatable, merged in order.")
flags.DEFINE_string("outdir", "out", "Output folder.")
FLAGS = flags.FLAGS


def main(argv):
    prompts = job.read_prompts(FLAGS.prompt, FLAGS.prompts_file)
    paths = job.run(FLAGS.config, FLAGS.ckpt, prompts, FLAGS.outdir, negative_prompt=FLAGS.negative_prompt,
                    seed=FLAGS.seed, num_images=FLAGS.num_images, latents=FLAGS.latents,
                    init_image=FLAGS.init_image, mask=FLAGS.mask, strength=FLAGS.strength,
                    loras=FLAGS.lora)
    print(f"wrote {len(paths) - 1} images and {paths[-1]}")


if __name__ == "__main__":
    cli.run(main, "run_sample.py")
