"""Encode a dataset once with the frozen VAE and text encoder: flags only, the work is in
sd_func.data.latents (`load_encoders`, `precache`).

  python -m sd_func.data.precache --config=configs/txt2img.py --ckpt=PATH --out=DIR \
      [--num_examples=N] [--batch_size=32] [--shard_size=4096] [--dtype=float32]

reads config.data (folder, webdataset, or shapes, which needs --num_examples) once, in
its natural order, and writes the latents folder that `config.data.kind = "latents"`
trains on. Without --ckpt the encoders are random-initialised from the config (for
tests and smoke runs). Bad input ends with one line `precache: error: ...`, exit 1.
"""

import torch
from absl import flags
from ml_collections import config_flags

from sd_func import cli
from sd_func.data import latents

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/x.py[:arg])", lock_config=False)
_CKPT = flags.DEFINE_string("ckpt", "", "checkpoint with the VAE and text encoder; empty = random init")
_OUT = flags.DEFINE_string("out", None, "output folder (must not exist)")
_NUM = flags.DEFINE_integer("num_examples", 0, "examples to encode (0 = the whole dataset; needed for shapes)",
                            lower_bound=0)
_BATCH = flags.DEFINE_integer("batch_size", 32, "encoder batch size", lower_bound=1)
_SHARD = flags.DEFINE_integer("shard_size", 4096, "examples per safetensors shard", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"], "stored dtype")
_DEVICE = flags.DEFINE_string("device", "", "cpu or cuda (default: cuda when available)")


def main(argv):
    cli.require(_CONFIG.value, "config", "configs/txt2img.py")
    cli.require(_OUT.value, "out", "/data/imgs-latents")
    device = _DEVICE.value or ("cuda" if torch.cuda.is_available() else "cpu")
    params, cfg = latents.load_encoders(_CONFIG.value, _CKPT.value, device)
    index = latents.precache(params, cfg, _OUT.value, seed=cfg.seed, num_examples=_NUM.value or None,
                             batch_size=_BATCH.value, shard_size=_SHARD.value,
                             dtype=getattr(torch, _DTYPE.value), device=device)
    print(f"precache: wrote {index['num_examples']} examples in {len(index['shards'])} shards to {_OUT.value} "
          f"({index['skipped']} corrupt samples skipped)")


if __name__ == "__main__":
    cli.run(main, "precache")
