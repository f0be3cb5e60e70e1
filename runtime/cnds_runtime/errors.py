"""Errors of the deployment runtime (independent of ``cnds_compiler``: the runtime ships alone).

Every mistake a user can make ends in a :class:`RuntimeCndsError`; the CLIs print ``str(error)`` (one
line naming the file) and exit with code 1.
"""

from __future__ import annotations

import errno


class RuntimeCndsError(Exception):
    """Root of every error the runtime reports to a user."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The file the error is about (a model, an image), when there is one.
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def __reduce__(self):
        # keep the path when the error crosses a process boundary (loader processes, Ray actors)
        return (self.__class__, (self.message, self.path))


class ModelError(RuntimeCndsError):
    """A model file is missing, is not ONNX, is not a cnds export, or cannot give what was asked."""


class ImageError(RuntimeCndsError):
    """An image cannot be read or does not fit the model."""


class OutputError(RuntimeCndsError):
    """An output cannot be written: unknown format, unwritable place, or it would overwrite an input."""


OUTPUT_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT})
"""A full disk or a failing device under the command's output."""


def output_write_failed(error: OSError) -> bool:
    """Whether ``error`` is a failed write of a command's own output (stdout redirected to a full disk, say):
    no file is named (every named file's errors are reported with their path where they happen) and the
    errno is one of :data:`OUTPUT_WRITE_ERRNOS`. Anything else is left to show its traceback: a bug."""
    return error.filename is None and error.errno in OUTPUT_WRITE_ERRNOS


BROKEN_PIPE_EXIT = 141
"""Exit code of a command whose output's reader went away (``cnds-predict … | head``): 128 + SIGPIPE, what a
shell reports for a tool the signal ended."""


def quiet_closed_streams() -> None:
    """After a failed write to stdout or stderr (a :class:`BrokenPipeError`, a full disk): flush what can
    still be written and point a stream that cannot take it at ``/dev/null``, so that the interpreter's
    flush at exit does not print the same error with a traceback."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the closed one; ValueError: already closed by the caller
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
            except (OSError, ValueError):
                pass


def end_on_output_error(prog: str, error: OSError) -> int:
    """What a command does when writing its own output failed: a reader that went away ends it quietly
    (:data:`BROKEN_PIPE_EXIT`), a full disk or a failing device is one line and exit 1. Any other
    :class:`OSError` is raised again: it is not about the output. Shared by every ``cnds-*`` command."""
    import contextlib
    import sys

    if not isinstance(error, BrokenPipeError) and not output_write_failed(error):
        raise error
    quiet_closed_streams()
    if isinstance(error, BrokenPipeError):
        return BROKEN_PIPE_EXIT  # nothing printed: the reader asked for no more
    with contextlib.suppress(OSError):  # stderr may be on the same full disk
        print(f"{prog}: error: cannot write the output ({error.strerror})", file=sys.stderr)
    return 1
