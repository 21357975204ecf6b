"""Serve txt2img with NVIDIA Triton Inference Server (through PyTriton): flags only.

  python run_serve.py --ckpt=PATH [--config=configs/txt2img.py] [--host=127.0.0.1] \
      [--http_port=8000] [--grpc_port=8001] [--metrics_port=8002] [--max_batch_size=8] \
      [--max_steps=150] [--max_pixels=1048576] [--max_prompt_chars=1000] [--request_timeout_s=600]

Model `txt2img`: inputs per image `prompt` BYTES [1] (required), `negative_prompt` BYTES,
`seed` INT64, `steps` INT32, `guidance_scale` FP32, `sampler` BYTES, `height` INT32,
`width` INT32 (defaults from the config's `sample` section); output `image` UINT8 [H, W, 3].
The checkpoint and config are read as run_sample.py reads them, so the same prompt, seed
and settings give run_sample.py's image. Stops cleanly on SIGTERM / SIGINT. Bad flags end
with one line `run_serve.py: error: ...` (sd_func.cli).
"""

import os

from absl import flags
from ml_collections import config_flags

from sd_func import cli
from sd_func.deploy import requests, serve
from sd_func.pipelines import job, options

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "txt2img.py"),
                                "Config file; its `sample` section gives the request defaults.",
                                lock_config=False)
flags.DEFINE_string("ckpt", None, "Diffusers folder, CompVis file, native file or training workdir.")
flags.DEFINE_string("host", "127.0.0.1", "Address the HTTP, gRPC and metrics endpoints bind.")
flags.DEFINE_integer("http_port", 8000, "HTTP port.")
flags.DEFINE_integer("grpc_port", 8001, "gRPC port.")
flags.DEFINE_integer("metrics_port", 8002, "Prometheus metrics port.")
requests.define_limit_flags()
FLAGS = flags.FLAGS


def main(argv):
    cli.require(FLAGS.ckpt, "ckpt", "runs/shapes")
    limits = requests.limits_from_flags(FLAGS)
    options.resolve(FLAGS.config)  # bad sample defaults fail before the checkpoint loads
    params, cfg = job.load_model(FLAGS.ckpt, FLAGS.config)
    ports = serve.Ports(FLAGS.host, FLAGS.http_port, FLAGS.grpc_port, FLAGS.metrics_port)
    serve.serve(requests.Model(params, cfg, limits), ports)


if __name__ == "__main__":
    cli.run(main, "run_serve.py")
