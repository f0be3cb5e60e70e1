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
