"""The one exception type for bad input: a flag, a file, a config value the user gave.

`UserError` means "the input is wrong, and the message says how": the `run_*.py`
entry points print it as one line, `prog: error: <message>`, and exit with status 1.
Every other exception is a bug in sd_func (or in a library under it) and keeps its
traceback. A message names what is wrong (the flag, the file, the config key, the
shape) and what was expected. `UserError` is a `ValueError`, so code that caught
ValueError around a bad value keeps working; `MissingFileError` is also a
`FileNotFoundError`.
"""


class UserError(ValueError):
    """Bad input given by the user (flag, file, config value); reported in one line."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""
