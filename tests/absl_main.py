"""Run an entry point's absl main() in-process, under sd_func.cli's error policy.

`call(name, prog, argv)` loads the entry-point module `name` (see `load`), re-parses its
FLAGS from argv (dropping the previous call's `--config.*` override flags, which
config_flags finds in sys.argv), runs its main, turns a UserError into the one-line
`prog: error: ...` and returns the exit status.
"""

import importlib
import sys

from absl import flags as absl_flags

from sd_func import cli
from sd_func.errors import UserError


def load(name: str):
    """The entry-point module `name` (e.g. "run_sample") with its flags defined. The run_*.py
    programs define the same flags (--config, --ckpt, ...) in absl's one global FLAGS, so
    loading one removes the flags another run_* module defined, and re-imports `name` when
    its own flags were removed that way."""
    by_module = absl_flags.FLAGS.flags_by_module_dict()
    if name in sys.modules and by_module.get(name):
        return sys.modules[name]
    for other, defined in list(by_module.items()):
        if other.startswith("run_") and other != name:
            for flag in list(defined):
                if flag.name in absl_flags.FLAGS:
                    delattr(absl_flags.FLAGS, flag.name)
    return importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)


def call(name: str, prog: str, args) -> int:
    module = load(name)
    flags, argv, saved = module.FLAGS, [prog, *args], sys.argv
    flags.unparse_flags()
    for name in [k for k in flags if k.startswith("config.")]:  # the previous call's override flags
        delattr(flags, name)
    sys.argv = argv  # config_flags finds the --config.* overrides in sys.argv
    try:
        flags(argv)
        try:
            module.main([prog])
        except UserError as e:
            cli.fail(prog, e)
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = saved
    return 0
