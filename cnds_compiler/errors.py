"""The one error hierarchy of cnds.

Every mistake a user can make ends in a :class:`CndsError`. An error that knows where it comes from
carries a :class:`~cnds_compiler.source.Span` and renders as ``file:line:col: message`` followed by the
source line and a caret, optional notes that point at other places ("first defined here") and an
optional hint ("did you mean ...?"). The CLIs print :meth:`CndsError.render` and exit with code 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from .source import Span


class CndsError(Exception):
    """Root of every error cnds reports to a user."""

    #: Short category shown after the location, e.g. ``syntax error``.
    kind = "error"
    #: The exit code of a command that stops on this error.
    exit_code = 1

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        hint: str | None = None,
        notes: tuple[tuple[Span, str], ...] = (),
        path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        self.notes = notes
        #: A file the error is about when there is no span (a missing checkpoint, a data folder).
        self.path = path

    @property
    def line(self) -> int | None:
        return self.span.location().line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.location().column if self.span else None

    def headline(self) -> str:
        """The first line: ``file:line:col: kind: message`` (or ``path: kind: message``)."""
        if self.span is not None:
            where = f"{self.span.location()}: "
        elif self.path is not None:
            where = f"{self.path}: "
        else:
            where = ""
        return f"{where}{self.kind}: {self.message}"

    def render(self) -> str:
        """Headline, the offending source line with carets, notes and the hint."""
        parts = [self.headline()]
        if self.span is not None:
            parts.append(self.span.excerpt())
        for span, note in self.notes:
            parts.append(f"{span.location()}: note: {note}")
            parts.append(span.excerpt())
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.headline()


class SpecSyntaxError(CndsError):
    """The text is not a well-formed .cnds spec."""

    kind = "syntax error"


class SpecIncludeError(CndsError):
    """An ``extends`` target cannot be read or forms a cycle."""

    kind = "error"


class UnknownNameError(CndsError):
    """A layer, block, op, parameter or setting name that does not exist."""

    kind = "unknown name"


class DuplicateNameError(CndsError):
    """A name defined twice."""

    kind = "duplicate name"


class ArgumentError(CndsError):
    """An op or block called with missing, extra or out-of-range arguments."""

    kind = "bad argument"


class ShapeError(CndsError):
    """Shape inference found an op that cannot apply to its input."""

    kind = "shape error"


class SupervisionError(CndsError):
    """A supervision point is placed or configured wrongly."""

    kind = "supervision error"


class IRFormatError(CndsError):
    """A serialised IR file does not match the schema or cannot be read."""

    kind = "invalid IR"


class UnsupportedError(CndsError):
    """Something that cannot be lowered or exported."""

    kind = "unsupported"


class ExportError(CndsError):
    """An export failed its own checks (ONNX checker, branch residue, onnxruntime vs torch parity)."""

    kind = "export error"


class CheckpointError(CndsError):
    """A checkpoint is missing, corrupt, or belongs to another spec."""

    kind = "checkpoint error"


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read back as written (truncated, bit-flipped, not a torch file):
    damage, as opposed to a readable checkpoint of another network. ``--resume`` repairs a run from its
    other checkpoint when one of them is damaged."""


class DataError(CndsError):
    """A data source is missing, malformed or does not fit the spec."""

    kind = "data error"


class OutputError(CndsError):
    """A result file or folder cannot be written."""

    kind = "output error"


class MemoryBudgetError(CndsError):
    """A network whose parameters (or training state and activations) would not fit in the memory budget."""

    kind = "too large"


class TrainingError(CndsError):
    """Training cannot go on (non-finite loss, bad configuration)."""

    kind = "training error"


class RunLockedError(CndsError):
    """Another live process is training into the same run folder."""

    kind = "run in use"


class Interrupted(CndsError):
    """The user pressed Ctrl-C (SIGINT) or the process got SIGTERM; what was saved stays valid."""

    kind = "interrupted"
    exit_code = 130


class OutputClosed(Interrupted):
    """The reader of a long run's output went away (``cnds-train … | head``): the run stops as on Ctrl-C,
    with 128 + SIGPIPE, the code a shell reports for a tool that signal ended."""

    kind = "output closed"
    exit_code = 141


class OutputFailed(Interrupted):
    """A long run's output could not be written (stdout on a full disk): the run stops as on Ctrl-C."""

    kind = "cannot write the output"
    exit_code = 1


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A "did you mean ...?" hint for a misspelt ``name``, or ``None`` when nothing is close."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    if not close:
        return None
    if len(close) == 1:
        return f"did you mean '{close[0]}'?"
    return "did you mean " + ", ".join(f"'{c}'" for c in close[:-1]) + f" or '{close[-1]}'?"


def report(error: CndsError, show_traceback: bool = False) -> int:
    """What every CLI does with a :class:`CndsError`: print it rendered to stderr and return its exit code
    (1; 130 for :class:`Interrupted`), or re-raise it, with its traceback, under ``--traceback``."""
    if show_traceback:
        raise error
    import sys

    print(error.render(), file=sys.stderr)
    return error.exit_code


def command(prog: str):
    """Decorate a CLI's ``main(argv) -> int`` so that Ctrl-C at any moment, also while torch is being
    imported or arguments are parsed, ends it with one line on stderr and exit code 130 (128 + SIGINT), as
    shells expect, never a traceback; a reader that stops reading (``cnds-compile … | head``) ends it
    quietly with 141 (128 + SIGPIPE), as it would a Unix tool, and output that cannot be written (stdout on
    a full disk) is one line and exit 1. The one place that decides this for every
    ``cnds-*`` command; a command that knows more (``cnds-train``: the epoch and step) raises
    :class:`Interrupted` itself."""
    import contextlib
    import functools
    import sys

    def decorate(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            # a stdout that cannot encode a character (PYTHONIOENCODING=ascii) escapes it, as stderr does
            with contextlib.suppress(AttributeError, ValueError):
                sys.stdout.reconfigure(errors="backslashreplace")
            try:
                code = main(argv)
                sys.stdout.flush()  # output still buffered for a pipe whose reader left fails here, not at exit
                return code
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return Interrupted.exit_code
            except OSError as e:
                from cnds_runtime.errors import end_on_output_error  # only now: the runtime loads numpy

                return end_on_output_error(prog, e)

        return run

    return decorate


class SpecWarning(UserWarning):
    """Something legal but probably unintended (a value nothing uses); issued with :func:`warnings.warn`.

    ``str()`` is the one-line headline; :meth:`render` adds the source line and caret, as errors do.
    """

    def __init__(self, message: str, span: Span | None = None, *, hint: str | None = None) -> None:
        self.diagnostic = CndsError(message, span, hint=hint)
        self.diagnostic.kind = "warning"
        super().__init__(self.diagnostic.headline())

    def render(self) -> str:
        return self.diagnostic.render()


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=None):
    """Print a :class:`SpecWarning` as ``file:line:col: warning: ...`` with its caret, like errors; other
    warnings as Python does."""
    if isinstance(message, SpecWarning):
        import sys

        print(message.render(), file=file if file is not None else sys.stderr)
        return
    _default(message, category, filename, lineno, file, line)


def install_warning_format() -> None:
    """Make Python's warning display render spec warnings the way errors render (done once, on import)."""
    import functools
    import warnings

    if getattr(warnings.showwarning, "_cnds", False):
        return
    show = functools.partial(_show_warning, _default=warnings.showwarning)
    show._cnds = True  # type: ignore[attr-defined]
    warnings.showwarning = show
