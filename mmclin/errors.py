"""Errors that name the file, row, record or setting at fault, and the one-line report every entry point gives."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


class DataError(ValueError):
    """Input data does not match what the reader expects; the message names the file/row and the problem."""


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting, its value and what it needs."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, foreign (not one of ours, or of another model class) or unsafe
    (objects that ``torch.load(weights_only=True)`` refuses); the message names the file and which."""


USER_ERRORS = (DataError, ConfigError, CheckpointError, FileNotFoundError)


def error_line(err: BaseException) -> str:
    """The one line of an error, also when a DataLoader worker raised it: the worker's re-raise wraps the message
    in "Caught DataError in DataLoader worker process 0. Original Traceback ..."; its last line is ours."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.partition(f"{type(err).__name__}: ")[2] or last
    if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {err.strerror or text}"
    return text


def run_entry_point(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Run a command's `main(argv)`; bad input or settings (:data:`USER_ERRORS`) end it with one line on stderr,
    ``error: <file/record/setting>: <problem>``, and exit code 2.

    ``--debug`` anywhere in the arguments (removed before `main` sees them), or ``MMCLIN_DEBUG=1``, shows the full
    traceback instead. Other exceptions are bugs and keep their traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("MMCLIN_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except Exception as err:
        found = user_error(err)
        if found is None or debug:
            raise
        print(f"error: {error_line(found)}", file=sys.stderr)
        sys.exit(2)


def user_error(err: BaseException) -> BaseException | None:
    """`err` if it is one of :data:`USER_ERRORS`, else the first such error it was raised from: jsonargparse
    reports an error raised in the constructor of a ``class_path`` argument (a model's ``init_from`` checkpoint
    refused) as a ValueError "Does not validate against any of the Union subtypes" raised from it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None
