"""The one exception type for mistakes a user can make (bad file, wrong model, bad flag)."""

from __future__ import annotations


class PrefixTuneError(Exception):
    """A user-facing error: the message says what went wrong and what to do.

    The command line prints it on one line and exits with status 2; nothing on disk is changed when it is raised.
    """


def is_dropout_rate(value: object) -> bool:
    """A dropout probability as a user may give it: a real number (not a bool) in [0, 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


def first_line(error: BaseException) -> str:
    """An exception as one line for a PrefixTuneError message: its type and the first line of its text."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
