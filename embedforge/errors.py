"""The errors embedforge reports to users as one line (what, where, what to do).

Every error a user can act on derives from :class:`EmbedforgeError`. The CLI prints its message on one line and
exits with its ``exit_code``: 2 for usage errors found before any work starts (bad recipe, bad data, an output
embedforge refuses to replace), 1 for failures while a stage runs (a NaN loss, an interruption, a full disk).
The traceback is shown only with ``--debug``. Import-light: no torch here.
"""

from __future__ import annotations


class EmbedforgeError(Exception):
    """A failure the user can act on; its message is one line: what, where, what to do."""

    exit_code = 1


class UsageError(EmbedforgeError):
    """Bad input found before any work started (recipe, config, data, model directory, output path)."""

    exit_code = 2


class OutputError(UsageError):
    """An output location embedforge refuses to write: not its own, locked by another run, unwritable, full."""


class RunError(EmbedforgeError):
    """A failure while a stage runs (training diverged, interrupted, disk full, parity failed)."""
