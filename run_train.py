"""Train a Stable Diffusion model: flags only, the work is in sd_func.recipe (-> sd_func.train).

  python run_train.py --config=configs/tiny.py --workdir=/tmp/tiny
  python run_train.py --config=configs/txt2img.py --config.data.path=/data/laion \
      --config.train.batch_size=64 --workdir=runs/sd15
  torchrun --nproc_per_node=8 run_train.py --config=configs/txt2img.py ... --workdir=runs/sd15

`--config=configs/x.py:variant` passes `variant` to get_config; `--config.a.b=v`
overrides a field. `config.train.batch_size` is global (split over the ranks).
Starting again with the same --workdir resumes from its newest checkpoint.
Bad input (a missing flag, a config that does not load, a bad config value, missing
data) ends with one line `run_train.py: error: ...` and exit status 1, before any
model is built; any other exception is a bug and shows its traceback (sd_func.cli).
"""

from absl import flags
from ml_collections import config_flags

from sd_func import cli, recipe

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and samples.")


def main(argv):
    cli.require(_CONFIG.value, "config", "configs/tiny.py")
    cli.require(_WORKDIR.value, "workdir", "runs/tiny")
    recipe.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main, "run_train.py")
