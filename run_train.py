"""Train a Stable Diffusion model: flags only, the work is in sd_func.train (recipe -> loop).

  python run_train.py --config=configs/tiny.py --workdir=/tmp/tiny
  python run_train.py --config=configs/txt2img.py --config.data.path=/data/laion \
      --config.train.batch_size=64 --workdir=runs/sd15
  torchrun --nproc_per_node=8 run_train.py --config=configs/txt2img.py ... --workdir=runs/sd15

`--config=configs/x.py:variant` passes `variant` to get_config; `--config.a.b=v`
overrides a field. `config.train.batch_size` is global (split over the ranks).
Starting again with the same --workdir resumes from its newest checkpoint.
Bad input (missing flag, unreadable config or data, a batch that does not split
over the ranks) ends with a one-line error and exit status 1; set
SD_FUNC_TRACEBACK=1 to see the traceback instead.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and samples.")

# Errors that mean "the input is wrong" (or the run diverged: FloatingPointError), reported
# in one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, FloatingPointError)


def _fail(msg: str) -> None:
    print(f"run_train.py: error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv):
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # an override of a field the config does not have
        name = str(e).strip("'\"")
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a.split("=")[0]]
        _fail(f"{', '.join(bad) or name}: no such field in the config (overrides can only set existing fields)")


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None:
        _fail("--config is required, e.g. --config=configs/tiny.py")
    try:
        cfg = _CONFIG.value
        _ = cfg.train  # a config that failed to load raises here
    except OSError as e:
        _fail(e)
    if not _WORKDIR.value:
        _fail("--workdir is required")
    from sd_func.train import recipe  # after flag checks: imports torch

    try:
        recipe.run(cfg, _WORKDIR.value)
    except USER_ERRORS as e:
        if os.environ.get("SD_FUNC_TRACEBACK"):
            raise
        _fail(e)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
