"""The errors the command line reports on one line instead of a traceback.

They are raised by the library itself (loaders, run folders, writers), so a program
using the library can catch them the same way; any other exception is a bug and the
command line shows its traceback.
"""
from __future__ import annotations

import re

__all__ = ["InputError", "InputTypeError", "SaveError", "first_line", "load_failure"]


class InputError(ValueError):
    """Something a user supplied is wrong: a flag, a data file, a file in a run folder.
    The message names it and says what was expected (the command line exits with 2).
    The one base of the library's argument errors (:mod:`metadd_fast.argcheck`)."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type (a float where an int is needed, a bool for a count):
    a TypeError for programs, and an :class:`InputError` so that ``except InputError`` and
    the command line catch it like every other bad input."""


class SaveError(OSError):
    """A file could not be written (disk full, permission, read-only file system). No
    temporary file is left and the previous version of the file, if any, is kept
    (the command line exits with 1)."""


def first_line(err: BaseException) -> str:
    """An exception's message on one line (torch's load errors, for one, span many)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def load_failure(err: BaseException) -> tuple:
    """(refused, detail) of a ``torch.load(..., weights_only=True)`` failure: ``refused`` when
    the file names a global (code to call) that weights_only would not call, ``detail`` one
    line saying what is wrong."""
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. |\n|$)", str(err), re.S)
    detail = found.group(1) if found else f"{type(err).__name__}: {first_line(err)}"
    return detail.startswith("Unsupported global"), detail
