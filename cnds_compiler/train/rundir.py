"""The run folder of ``cnds-train``: who may write it (a lock), in which order its files are written, and
how ``--resume`` puts them back in agreement after a kill.

Files and the order an epoch writes them (each write atomic: temp file, fsync, rename; see
:func:`cnds_compiler.io.atomic_write_bytes`):

1. ``last.pt``       the commit point: it holds the epoch count, the whole metrics history and the best
                     validation error so far; everything below can be rebuilt from it
2. ``best.pt``       when this epoch is the best: the same bytes as ``last.pt``
3. ``metrics.jsonl`` one line appended (not atomic: a kill can tear the line); then ``metrics.csv``
                     rewritten whole from the history (atomic), and ``curves.png`` when a minute has
                     passed since it was last drawn (atomic)
4. ``curves.png``, ``gradients.json`` at the end of a run, from ``last.pt``'s history

A kill before 1 leaves the previous epoch's files, all consistent (a half-written temp file is deleted on
the next start). A kill between 1 and 2 leaves ``best.pt`` one best epoch behind: ``last.pt`` says its own
epoch is the best, so :func:`repair_run` copies it to ``best.pt``. A kill in 3 leaves a torn or missing last
line, and a kill anywhere leaves ``metrics.jsonl`` at most one line short or, after an earlier resume, with
lines beyond the checkpoint: :func:`repair_run` rewrites the log from the history. A checkpoint damaged by
other means (a truncated copy, a flipped bit: found by the content digest) is moved aside as ``*.corrupt``,
never deleted, and the run continues from the newest intact one of ``last.pt`` and ``best.pt``; a resumed run
replays the lost epochs exactly, so its results do not depend on where it was killed.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import checkpoint_bytes, load_checkpoint
from ..errors import CheckpointError, CorruptCheckpointError, OutputError, RunLockedError
from ..io import atomic_write_bytes, atomic_write_text
from ..ir import Network, TrainConfig

LOCK_NAME = "train.lock"


# ---- the lock ----------------------------------------------------------------------------------------


class RunLock:
    """``DIR/train.lock`` holding ``pid host start``, so two trainings never write the same run folder. It is
    created whole or not at all: written to a temp file made with ``O_EXCL``, then hard-linked to its name,
    which fails when the name exists (the classic lock recipe that also holds on NFS, and no one ever
    reads a half-written lock). A lock whose process is gone (same host, pid not alive: a SIGKILLed run) is
    stale and taken over with a note. ``start`` is the holder's start time (``/proc/PID/stat``, clock ticks
    since boot; ``-`` where unknown): a pid that now belongs to another process started at another time —
    a restarted container's training gets the same small pid as the killed one — is stale too. A live
    lock, or one from another host (whose pid cannot be checked here), is a :class:`RunLockedError`
    naming the holder. Use as a context manager: released on every way out."""

    def __init__(self, folder: Path, note=print) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.note = note
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        me = f"{os.getpid()} {socket.gethostname()} {_start_time(os.getpid()) or '-'}\n"
        mine = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.new")  # not *.tmp: a run deletes those
        try:
            fd = os.open(mine, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(me)
        except OSError as e:
            raise OutputError(f"cannot create the run lock ({e.strerror or e})", path=str(self.path)) from None
        try:
            self._take(mine)
        finally:
            mine.unlink(missing_ok=True)

    def _take(self, mine: Path) -> None:
        for _ in range(5):  # a few rounds: another process may take over or release between our steps
            try:
                os.link(mine, self.path)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released just now
                pid, host, start = holder
                if host != socket.gethostname() or _alive(pid, start):
                    where = "" if host == socket.gethostname() else f" on host {host}"
                    raise RunLockedError(
                        f"another cnds-train (pid {pid}{where}) is training into this folder; wait for it to "
                        f"finish, or delete {self.path} if that process is gone", path=str(self.path.parent)) from None
                self._break_stale(pid)
                continue
            except OSError as e:
                raise OutputError(f"cannot create the run lock ({e.strerror or e})", path=str(self.path)) from None
            self.held = True
            return
        raise RunLockedError("the run lock keeps changing hands; is another cnds-train starting here?",
                             path=str(self.path.parent))

    def _read(self) -> tuple[int, str, str | None] | None:
        """(pid, host, start time or None), or None when the lock is gone; locks written before the start
        time was recorded have two fields."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            text = ""
        parts = text.split()
        if len(parts) in (2, 3) and parts[0].isdigit():
            start = parts[2] if len(parts) == 3 and parts[2] != "-" else None
            return int(parts[0]), parts[1], start
        # not a lock this code writes (locks appear whole): a stray file, taken over as a dead holder's
        return 0, socket.gethostname(), None

    def _break_stale(self, pid: int) -> None:
        """Move the dead holder's lock aside under a name only we use, then check it really was that one
        (two processes breaking the same stale lock at once: the second must not remove the first's new
        lock); put a live lock we moved by mistake back."""
        aside = self.path.with_name(f".{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        text = aside.read_text(errors="replace").split()
        moved_pid = int(text[0]) if text and text[0].isdigit() else 0
        moved_start = text[2] if len(text) == 3 and text[2] != "-" else None
        if moved_pid != pid and _alive(moved_pid, moved_start):
            try:
                os.link(aside, self.path)  # fails if yet another lock appeared: then that one stands
            except OSError:
                pass
        else:
            if not pid:
                holder = "whose holder it does not name"
            elif _alive(pid):  # the pid runs, but _take found it is not the process that wrote the lock
                holder = f"of process {pid}, which is no longer running (the pid now belongs to a later process)"
            else:
                holder = f"of process {pid}, which is no longer running"
            self.note(f"note: took over the stale run lock {holder} ({self.path})")
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.path.unlink(missing_ok=True)


def _start_time(pid: int) -> str | None:
    """Process ``pid``'s start time in clock ticks since boot (field 22 of ``/proc/PID/stat``), or None
    where there is no such file (not Linux, or no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name, in parentheses, may hold spaces
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` runs — and, when the lock recorded its start time, is still the same
    process (not a later one that was given the same pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _start_time(pid) if start is not None else None
    return now is None or now == start


# ---- writing an epoch ------------------------------------------------------------------------------------


def write_epoch_checkpoints(folder: Path, state: dict[str, Any], is_best: bool, committed=lambda: None) -> None:
    """Steps 1 and 2 of the module's order: ``last.pt``, then (when best) ``best.pt``, one serialisation;
    ``committed()`` is called the moment ``last.pt`` holds the new state."""
    data = checkpoint_bytes(state)
    atomic_write_bytes(folder / "last.pt", data)
    committed()
    if is_best:
        atomic_write_bytes(folder / "best.pt", data)


def append_metrics(folder: Path, record: dict) -> None:
    """Step 3: one line of ``metrics.jsonl`` (a line torn by a full disk is repaired on ``--resume``)."""
    path = folder / "metrics.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise OutputError(f"cannot write ({e.strerror or e})", path=str(path)) from None


def saved_train_config(folder: Path) -> TrainConfig | None:
    """The solver settings a run was trained with (epochs, batch, lr, … after its flags), read from its newest
    readable checkpoint without loading the tensors (memory-mapped), so ``--resume`` alone continues it with
    them; ``None`` when no checkpoint tells (none yet, or damaged: the full load on resume reports that)."""
    import torch

    from ..serialize import train_config_from_dict

    for name in ("last.pt", "best.pt"):
        if not (folder / name).is_file():  # a FIFO would block the read; the full load names what it is
            continue
        try:
            state = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
            return train_config_from_dict(json.loads(state["train_config"]))
        except Exception:  # missing, damaged or older: the next candidate, then the spec's settings
            continue
    return None


# ---- repairing on --resume -----------------------------------------------------------------------------


@dataclass
class Resumed:
    """What ``--resume`` continues from, and what it had to put right first."""

    checkpoint: dict[str, Any]
    path: Path
    notes: list[str] = field(default_factory=list)
    best_lost: bool = False
    """``best.pt`` of an earlier epoch was damaged: the best weights are gone (the next best epoch rewrites it)."""


def repair_run(folder: Path, net: Network, write: bool = True) -> Resumed:
    """Read ``last.pt`` and ``best.pt``, continue from the newest intact one and (when ``write``: the main
    process only) bring the other files into agreement with it, as the module docstring lays out. A
    checkpoint of another network or a malformed one is an error, not damage: nothing is moved then."""
    found: dict[str, dict[str, Any]] = {}
    damaged: dict[str, CorruptCheckpointError] = {}
    for name in ("last.pt", "best.pt"):
        path = folder / name
        if not path.exists():
            continue
        try:
            found[name] = load_checkpoint(path, net, need="training")
        except CorruptCheckpointError as e:
            damaged[name] = e
        except CheckpointError:
            if path.exists():
                raise
            # moved aside as damaged by the main process while this one (another rank) was reading
            damaged[name] = CorruptCheckpointError("moved aside while being read", path=str(path))
    if not found:
        if damaged:
            raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(
                e.headline() for e in damaged.values()), path=str(folder))
        raise CheckpointError("no such checkpoint", path=str(folder / "last.pt"))
    source = max(found, key=lambda name: (found[name]["epoch"], name == "last.pt"))
    ckpt = found[source]
    resumed = Resumed(ckpt, folder / source)
    notes = resumed.notes
    epoch = ckpt["epoch"]
    for name, error in damaged.items():
        aside = _free_name(folder / f"{name}.corrupt")
        notes.append(f"{folder / name} is damaged ({error.message}); kept as {aside.name}")
        if write and (folder / name).exists():
            os.replace(folder / name, aside)
    data = None
    if source != "last.pt":
        notes.append(f"continuing from {source} (epoch {epoch}); last.pt rewritten from it")
        if write:
            data = (folder / source).read_bytes()
            atomic_write_bytes(folder / "last.pt", data)
    best_epoch = _best_epoch(ckpt)
    best = found.get("best.pt")
    if best_epoch is not None and (best is None or best["epoch"] != best_epoch):
        if best_epoch == epoch:  # killed between writing last.pt and best.pt: they are the same state
            was = f"epoch {best['epoch']}" if best else "missing"
            notes.append(f"best.pt ({was}) lagged behind epoch {epoch}, the best so far; rewritten from {source}")
            if write:
                atomic_write_bytes(folder / "best.pt", data or (folder / source).read_bytes())
        else:
            resumed.best_lost = True
            notes.append(f"best.pt does not hold the best epoch ({best_epoch}) and its weights are gone; best.pt "
                         "will hold the best of the epochs still to come")
    if write:
        history = ckpt.get("metrics", [])
        log = folder / "metrics.jsonl"
        text = "".join(json.dumps(m) + "\n" for m in history)
        if not log.exists() or log.read_text(errors="replace") != text:
            if log.exists():
                notes.append(f"metrics.jsonl rewritten to the checkpoint's {len(history)} epochs")
            atomic_write_text(log, text)
    return resumed


def _free_name(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``, … : an earlier damaged copy is never overwritten."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _best_epoch(ckpt: dict[str, Any]) -> int | None:
    """The epoch whose weights ``best.pt`` should hold: as recorded, or (checkpoints from before the
    record) the first with the lowest main-head error."""
    if "best_epoch" in ckpt:
        return ckpt["best_epoch"]
    best = None
    for record in ckpt.get("metrics", []):
        error = record["val_top1_error"]["main"]
        if best is None or error < best[1]:
            best = (record["epoch"], error)
    return best[0] if best else None
