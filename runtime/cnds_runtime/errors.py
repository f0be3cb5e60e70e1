"""Errors of the deployment runtime (independent of ``cnds_compiler``: the runtime ships alone).

Every mistake a user can make ends in a :class:`RuntimeCndsError`; the CLIs print ``str(error)`` (one
line naming the file) and exit with code 1.
"""

from __future__ import annotations


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


BROKEN_PIPE_EXIT = 141
"""Exit code of a command whose output's reader went away (``cnds-predict … | head``): 128 + SIGPIPE, what a
shell reports for a tool the signal ended."""


def quiet_closed_streams() -> int:
    """After a :class:`BrokenPipeError`: flush what can still be written and point a closed stdout or stderr
    at ``/dev/null``, so that the interpreter's flush at exit does not print the same error with a
    traceback. Returns :data:`BROKEN_PIPE_EXIT`. Nothing is printed: the reader asked for no more."""
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
    return BROKEN_PIPE_EXIT
