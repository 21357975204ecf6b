"""Export a checkpoint for serving: ONNX files, or a Triton model repository. Flags only.

  python run_export.py --ckpt=PATH --out=DIR [--dtype=float32|float16] [--opset=17]
  python run_export.py --ckpt=PATH --triton_repo=DIR [--max_batch_size=8 --max_steps=150 ...]

--out writes DIR/text_encoder.onnx, unet.onnx, vae_decoder.onnx, vae_encoder.onnx, the
tokenizer files and pipeline.json (sd_func.deploy.onnx_export). --triton_repo writes a
standard Triton model repository serving model `txt2img` with run_serve.py's inputs,
outputs and limits (sd_func.deploy.repository): `tritonserver --model-repository=DIR`.
The checkpoint is read as run_sample.py reads it (--config gives cfg.sample: the request
defaults, EMA, the tokenizer of a CompVis file). Bad input ends with one line
`run_export.py: error: ...` (sd_func.cli).
"""

import os

from absl import flags
from ml_collections import config_flags

from sd_func import cli
from sd_func.deploy import onnx_export, repository, requests
from sd_func.errors import UserError
from sd_func.pipelines import job

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "txt2img.py"),
                                "Config file; its `sample` section gives the defaults.", lock_config=False)
flags.DEFINE_string("ckpt", None, "Diffusers folder, CompVis file, native file or training workdir.")
flags.DEFINE_string("out", None, "Folder for the ONNX files, tokenizer/ and pipeline.json.")
flags.DEFINE_string("triton_repo", None, "Folder for a Triton model repository (model txt2img).")
flags.DEFINE_string("dtype", "float32", "ONNX weights and activations: float32 or float16.")
flags.DEFINE_integer("opset", onnx_export.DEFAULT_OPSET, "ONNX opset version.")
requests.define_limit_flags()
FLAGS = flags.FLAGS


def main(argv):
    cli.require(FLAGS.ckpt, "ckpt", "runs/shapes")
    if not FLAGS.out and not FLAGS.triton_repo:
        raise UserError("give --out=DIR (ONNX files) or --triton_repo=DIR (a Triton model repository)")
    onnx_export.torch_dtype(FLAGS.dtype)
    limits = requests.limits_from_flags(FLAGS)
    params, cfg = job.load_model(FLAGS.ckpt, FLAGS.config, device="cpu")
    if FLAGS.out:
        paths = onnx_export.export(params, cfg, FLAGS.out, dtype=FLAGS.dtype, opset=FLAGS.opset)
        print(f"wrote {', '.join(os.path.basename(p) for p in paths)} to {FLAGS.out}")
    if FLAGS.triton_repo:
        folder = repository.write(params, cfg, FLAGS.triton_repo, limits)
        print(f"wrote the Triton model {folder}; serve it with tritonserver --model-repository={FLAGS.triton_repo}")


if __name__ == "__main__":
    cli.run(main, "run_export.py")
