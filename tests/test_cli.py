"""The entry points' error policy (sd_func.cli): bad input is one line, a bug keeps its traceback.

Each command line runs as a subprocess, as a user would type it; the bad inputs here fail
while the flags are parsed, before any model or data is touched, so each run is short.
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=120):
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "SD_FUNC_TRACEBACK": ""})
    return done.returncode, done.stderr.strip().splitlines()


@pytest.fixture(scope="module")
def bad_configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    files = {
        "syntax.py": "def get_config(arg=None):\n    return (\n",
        "raises.py": "def get_config(arg=None):\n    raise KeyError('data.path')\n",
        "import_error.py": "import no_such_module_here\n",
        "no_get_config.py": "x = 1\n",
        "returns_dict.py": "def get_config(arg=None):\n    return {}\n",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    return d


@pytest.mark.parametrize("prog", ["run_train.py", "run_sample.py"])
@pytest.mark.parametrize("name, expect", [
    ("syntax.py", "syntax.py: syntax error on line 2: '(' was never closed"),
    ("raises.py", "raises.py: get_config failed: KeyError: 'data.path'"),
    ("import_error.py", "import_error.py: does not load: ModuleNotFoundError: No module named 'no_such_module_here'"),
    ("no_get_config.py", "no_get_config.py: defines no get_config(arg=None) function"),
    ("returns_dict.py", "returns_dict.py: get_config returned a dict, expected a ConfigDict"),
])
def test_config_that_does_not_load_is_one_line(bad_configs, prog, name, expect):
    path = str(bad_configs / name)
    rc, err = run([prog, f"--config={path}", "--workdir=/nonexistent/never-made", "--ckpt=/nonexistent"])
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: {bad_configs}") and err[0].endswith(expect), err


@pytest.mark.parametrize("args, expect", [
    (["--config=configs/tiny.py:nonsense"], "configs/tiny.py:nonsense: get_config failed: "
                                            "ValueError: unknown variant 'nonsense': this config has no variants"),
    (["--config=configs/shapes.py:huge"], "configs/shapes.py:huge: get_config failed: ValueError: unknown variant"),
    (["--config=configs/nope.py"], "--config=configs/nope.py: no such config file 'configs/nope.py'"),
    (["--config=configs/tiny.py", "--config.train.nosuch=1"], "--config.train.nosuch: no such field in the config"),
    (["--config=configs/tiny.py", "--config.train.lr=fast"], "could not convert string to float: 'fast'"),
    (["--config=configs/tiny.py", "--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--config=configs/tiny.py"], "--workdir is required, e.g. --workdir=runs/tiny"),
    (["--workdir=/tmp/x"], "--config is required, e.g. --config=configs/tiny.py"),
    (["--config=configs/tiny.py", "--workdir=/tmp/x", "extra"], "unexpected arguments ['extra']"),
])
def test_run_train_flag_errors(args, expect):
    rc, err = run(["run_train.py", *args])
    assert rc == 1 and len(err) == 1 and err[0].startswith("run_train.py: error: ") and expect in err[0], err


def _program(tmp_path, raises: str) -> str:
    """A three-line entry point on sd_func.cli whose main raises `raises`."""
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from sd_func import cli
        from sd_func.errors import UserError

        def main(argv):
            raise {raises}

        cli.run(main, "prog.py")
    """))
    return str(script)


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only UserError becomes one line: any other exception is printed with its traceback."""
    rc, err = run([_program(tmp_path, 'RuntimeError("an actual bug")')])
    assert rc == 1 and err[0] == "Traceback (most recent call last):" and err[-1] == "RuntimeError: an actual bug", err


def test_user_error_is_one_line(tmp_path):
    script = _program(tmp_path, 'UserError("--x=3: expected\\n  an even number")')
    rc, err = run([script])
    assert rc == 1 and err == ["prog.py: error: --x=3: expected an even number"], err
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SD_FUNC_TRACEBACK": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr  # SD_FUNC_TRACEBACK=1 shows it
