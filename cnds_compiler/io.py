"""File writes that never leave a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def refuse_unsafe_output(output: str | Path | None, option: str,
                         inputs: Iterable[tuple[str, str | Path | None]] = (), *, kind: str = "",
                         suffixes: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, an output option (``-o``, ``--plot``, ``--json``, ``--write``) that names one
    of the command's own ``inputs`` (``(what, path)`` pairs), or whose name does not end as the ``kind`` of
    file it writes does (``suffixes``): a PNG written over ``last.pt``, JSON over the spec. One
    :class:`~cnds_compiler.errors.OutputError` naming the path; nothing is written."""
    from .errors import OutputError

    if output is None:
        return
    out = Path(output)
    if suffixes and out.suffix.lower() not in suffixes:
        raise OutputError(f"{option} writes {kind}: give it a file name ending in {' or '.join(suffixes)}",
                          path=str(out))
    for what, value in inputs:
        if value is not None and Path(value).resolve() == out.resolve():
            raise OutputError(f"{option} would overwrite {what}, an input of this command; choose another file",
                              path=str(out))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename over ``path``.

    A file that cannot be written (a missing or read-only folder, a path below a file) is a
    :class:`~cnds_compiler.errors.OutputError` naming it; nothing half-written is left behind.
    """
    try:
        _atomic_write(Path(path), data)
    except OSError as e:
        from .errors import OutputError

        blocker = next((p for p in Path(path).parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise OutputError(f"cannot write: {blocker} is a file, not a folder", path=str(path)) from None
        raise OutputError(f"cannot write ({e.strerror or e})", path=str(path)) from None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable, so that after a power cut the files of a folder show the order in
    which they were written (``cnds-train`` relies on ``last.pt`` being committed before ``best.pt``)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the data itself is synced
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


MAX_TEXT_BYTES = 16 * 1024 * 1024
"""Largest text input (spec, IR JSON, prototxt) read: far above any real network (GoogLeNet's spec is a few
KiB, its IR JSON under 1 MiB), far below what would exhaust memory."""


def read_bounded_text(path: str | Path, what: str, error: type, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path``, refused before reading when it is not a regular file (a FIFO would block,
    ``/dev/zero`` never ends) or is larger than ``limit`` bytes. Every failure is one ``error`` (a
    :class:`~cnds_compiler.errors.CndsError` subclass) naming the path; ``what`` names the file's role."""
    import stat

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens at once, unread
    except FileNotFoundError:
        raise error(f"no such {what}", path=str(path)) from None
    except OSError as e:  # permissions, a symlink loop (ELOOP), a NUL byte in the name
        import errno

        reason = "a symlink loop" if e.errno == errno.ELOOP else e.strerror or e
        raise error(f"cannot read {what} ({reason})", path=str(path)) from None
    except ValueError as e:
        raise error(f"cannot read {what} ({e})", path=str(path)) from None
    info = os.fstat(fd)  # the opened file itself: no window for a swap between check and read
    problem = None
    if stat.S_ISDIR(info.st_mode):
        problem = f"cannot read {what}: is a folder"
    elif not stat.S_ISREG(info.st_mode):
        problem = f"cannot read {what}: not a regular file ({file_kind(info.st_mode)})"
    elif info.st_size > limit:
        problem = f"{what} is {info.st_size:,} bytes, over the limit of {limit:,}"
    if problem is not None:
        os.close(fd)
        raise error(problem, path=str(path))
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)  # the size may have grown since fstat
        except OSError as e:
            raise error(f"cannot read {what} ({e.strerror or e})", path=str(path)) from None
    if len(data) > limit:
        raise error(f"{what} is over the limit of {limit:,} bytes", path=str(path))
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as Windows editors write, is not text
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise error(f"cannot read {what}: not UTF-8 text (line {line}, column {column}: byte 0x{data[e.start]:02x}; "
                    "save it as UTF-8)", path=str(path)) from None


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: "a FIFO", "a socket", a device, …"""
    import stat

    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"
