"""The one exception type for mistakes a user can make (bad file, wrong model, bad flag)."""

from __future__ import annotations


class PrefixTuneError(Exception):
    """A user-facing error: the message says what went wrong and what to do.

    The command line prints it on one line and exits with status 2; nothing on disk is changed when it is raised.
    """
