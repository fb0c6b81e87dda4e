"""The errors embedforge reports to users as one line (what, where, what to do).

Every error a user can act on derives from :class:`EmbedforgeError`. The CLI prints its message on one line and
exits with its ``exit_code``:

- 2 (:class:`UsageError`) for problems found before any work starts: a bad recipe, config, data file or model
  directory, an output location embedforge refuses or cannot write (:class:`OutputError`);
- 1 (:class:`RunError`) for failures while a stage runs: a NaN loss, a failed parity check, a full disk;
- 130 (:class:`Interrupted`) when a run stops on Ctrl-C or SIGTERM, the shell convention for a run ended by
  SIGINT. A training stage that saved a checkpoint first says so; a rerun resumes from it.

The traceback is shown only with ``--debug``. The older error classes of the workflows (``RecipeError``,
``ConfigError``, ``DataError``, ``SourceError``, ``NanLossError``, ``TrainingInterrupted``, ``ParityError``,
``ExportError`` ...) derive from these and keep their builtin bases (``ValueError`` / ``RuntimeError``), so code
that catches those still works. Import-light: no torch here.
"""

from __future__ import annotations

import errno
import os


class EmbedforgeError(Exception):
    """A failure the user can act on; its message is one line: what, where, what to do."""

    exit_code = 1


class UsageError(EmbedforgeError):
    """Bad input found before any work started (recipe, config, data, model directory, output path)."""

    exit_code = 2


class OutputError(UsageError):
    """An output location embedforge refuses to write: not its own, locked by another run, unwritable, full."""


class RunError(EmbedforgeError):
    """A failure while a stage runs (training diverged, parity failed, disk full)."""


class Interrupted(RunError):
    """The run stopped on a signal (Ctrl-C, SIGTERM); exit status 130 as for any SIGINT-ended program."""

    exit_code = 130


#: advice per errno for failures to write (the path comes first in the message)
_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space or write the output to a bigger disk",
    errno.EDQUOT: "disk quota exceeded; free some space or write the output elsewhere",
    errno.EACCES: "permission denied; choose an output directory you can write, or fix its permissions",
    errno.EPERM: "operation not permitted; choose an output directory you can write, or fix its permissions",
    errno.EROFS: "read-only file system; write the output to a writable location",
}


def one_line(text: str) -> str:
    """``text`` with its lines joined by single spaces (messages are printed on one line)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def os_reason(exc: OSError) -> str:
    """What went wrong and what to do, for an ``OSError`` (without the path)."""
    return _OS_ADVICE.get(exc.errno or -1) or one_line(exc.strerror or str(exc)) or type(exc).__name__


def describe_os_error(exc: OSError, where: str | None = None, path: str | os.PathLike[str] | None = None) -> str:
    """One line for an ``OSError``: the path it concerns, the problem and advice.

    A failed write (disk full, permission denied) often names no file; ``path`` (the output being written) is
    named instead. ``where`` (e.g. ``"stage 'onnx'"``) is put first when given.
    """
    if exc.filename is not None:
        target: str | None = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes)) else str(exc.filename)
    elif path is not None and exc.errno in _OS_ADVICE:  # a failed write names no file: name the output
        target = os.fspath(path)
    else:
        target = None
    parts = [p for p in (where, target) if p]
    return ": ".join([*parts, os_reason(exc)])


def from_os_error(exc: OSError, where: str | None = None, path: str | os.PathLike[str] | None = None) -> RunError:
    """A :class:`RunError` that reports ``exc`` as one line (see :func:`describe_os_error`)."""
    return RunError(describe_os_error(exc, where, path))
