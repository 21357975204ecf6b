"""What every entry point shares: flag parsing, config loading and the error policy.

`run(main, prog)` is `absl.app.run(main)` with sd_func's rule for errors: bad input
(an unknown flag, a config file that does not load, an override of a field the config
lacks, a `sd_func.errors.UserError` raised anywhere below) is printed as one line,
`prog: error: <message>`, with exit status 1; any other exception is a bug and keeps
its traceback (`SD_FUNC_TRACEBACK=1` shows the traceback of user errors too).

Config files are `path.py[:arg]` with `get_config(arg=None) -> ConfigDict`, read by
ml_collections' `config_flags` (which also applies `--config.a.b=value` overrides).
Before absl parses the flags, `load_config` loads the named file once itself, so that
a syntax error, an exception in `get_config` or an unknown variant (`configs/tiny.py:
nonsense`) becomes one line naming the file and the problem, not a traceback inside
config_flags. This module imports nothing of sd_func but the error types, so that
`--help` and flag errors never wait for torch.
"""

import importlib.util
import os
import sys

import ml_collections
from absl import app, flags

from sd_func.errors import UserError

CONFIG_FLAG = "config"


def fail(prog: str, message) -> None:
    """Print `prog: error: message` on one line and exit with status 1."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(1)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The ConfigDict of `path.py[:arg]`, or a UserError naming the file and the problem."""
    path, *arg = spec.split(":", 1)
    if not os.path.isfile(path):
        raise UserError(f"--{CONFIG_FLAG}={spec}: no such config file {path!r}")
    try:
        module_spec = importlib.util.spec_from_file_location("sd_func_config_check", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"{path}: syntax error on line {e.lineno}: {e.msg}") from e
    except Exception as e:  # the config file is the user's code: its failure is bad input
        raise UserError(f"{path}: does not load: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"{path}: defines no get_config(arg=None) function")
    try:
        cfg = module.get_config(*arg)
    except Exception as e:  # an unknown variant, or any other failure of the user's get_config
        where = f"{path}:{arg[0]}" if arg else path
        raise UserError(f"{where}: get_config failed: {type(e).__name__}: {e}") from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise UserError(f"{path}: get_config returned a {type(cfg).__name__}, expected a ConfigDict")
    return cfg


def _config_spec(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(f"--{CONFIG_FLAG}="):
            return a.split("=", 1)[1]
        if a == f"--{CONFIG_FLAG}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _parser(prog: str):
    def parse(argv):
        try:
            spec = _config_spec(argv)
            if spec is not None:
                load_config(spec)
            return flags.FLAGS(argv)
        except UserError as e:
            fail(prog, e)
        except flags.Error as e:
            fail(prog, e)
        except (AttributeError, KeyError) as e:  # config_flags: an override of a field the config lacks
            name = str(e).strip("'\"")
            bad = [a.split("=")[0] for a in argv if a.startswith(f"--{CONFIG_FLAG}.") and name in a.split("=")[0]]
            fail(prog, f"{', '.join(bad) or name}: no such field in the config "
                       "(overrides can only set existing fields)")
    return parse


def run(main, prog: str) -> None:
    """absl.app.run(main) with one-line errors for bad input (see the module docstring)."""
    def guarded(argv):
        if len(argv) > 1:
            fail(prog, f"unexpected arguments {argv[1:]} (every option is a --flag=value)")
        try:
            return main(argv)
        except UserError as e:
            if os.environ.get("SD_FUNC_TRACEBACK"):
                raise
            fail(prog, e)

    app.run(guarded, flags_parser=_parser(prog))


def require(value, flag: str, example: str = "") -> None:
    """A UserError unless the required flag was given."""
    if value is None or value == "":
        raise UserError(f"--{flag} is required" + (f", e.g. --{flag}={example}" if example else ""))
