"""Run an entry point's absl main() in-process, under sd_func.cli's error policy.

`call(module, prog, argv)` re-parses module.FLAGS from argv (dropping the previous call's
`--config.*` override flags, which config_flags finds in sys.argv), runs module.main,
turns a UserError into the one-line `prog: error: ...` and returns the exit status.
"""

import sys

from sd_func import cli
from sd_func.errors import UserError


def call(module, prog: str, args) -> int:
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
