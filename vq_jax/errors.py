"""The one exception type for mistakes a user can fix (config, data, workdir, files).

The library raises `UserError` (or a subclass) with a message that names the field, the value,
what is valid and the fix; the entry points (train.py, sample.py) print it as one line and exit
with status 2 (a usage error, as for argparse), without a traceback (`--verbosity=1` shows it).
Anything else is a bug and keeps its traceback.

`UserError` is a `ValueError` and `MissingFileError` also a `FileNotFoundError`, so code that
caught those before keeps working.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class UserError(ValueError):
    """A mistake in the config, the data, the workdir or a file that the user can fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the run needs does not exist (the message says how to make it)."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (whitespace, newlines included, collapsed)."""
    return " ".join(str(error).split()) or type(error).__name__


def traceback_requested() -> bool:
    """Whether the user asked for tracebacks of user errors too (absl's --verbosity=1 or more)."""
    from absl import logging as absl_logging

    return absl_logging.get_verbosity() >= 1


def exit_with(program: str, error: BaseException) -> NoReturn:
    """Prints `program: [Kind: ]message` on stderr as one line and exits with status 2 (the
    kind is named for subclasses, e.g. NonFiniteError, CheckpointError, unless the subclass
    itself sets `plain = True`: its messages already say what kind of mistake they are).
    With --verbosity=1 (or more) the error is raised again instead, so its traceback shows."""
    if traceback_requested():
        raise error
    plain = type(error) in (UserError, MissingFileError) or vars(type(error)).get("plain", False)
    kind = "" if plain else f"{type(error).__name__}: "
    print(f"{program}: {kind}{one_line(error)}", file=sys.stderr, flush=True)
    sys.exit(2)
