"""Images → batches for onnxruntime, prepared on a bounded pool of workers while the model runs.

Decoding and resizing are the expensive part of preparing an image (~1 ms each for a 500x375 JPEG), and
Pillow releases the GIL for both, so worker *threads* run them in parallel with each other and with
``InferenceSession.run`` (which releases the GIL too). Each thread also normalises its image straight
into its row of a preallocated batch buffer (:meth:`Preprocessor.normalise_into`: in place, no
temporaries), so the main thread only hands finished batches to onnxruntime. Worker *processes* are the
alternative where Python work dominates (many tiny images): they return uint8 crops and the main thread
normalises them into the buffer.

The pool is bounded: at most ``prefetch`` batches are being prepared while one is run, so memory does
not grow with the number of images, and batch buffers are recycled. Batches come out in input order.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from .errors import ImageError, RuntimeCndsError
from .preprocess import Preprocessor

LOADERS = ("threads", "processes")


def default_workers(cpus: int | None = None) -> int:
    """Loader threads that share the machine with onnxruntime: two, or one per four cores on larger machines
    (measured on 2 cores: two threads beat one, as a decode less often waits for the model's threads)."""
    cpus = cpus or os.cpu_count() or 1
    return max(2, cpus // 4)


def label(item) -> str:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"<{type(item).__name__}>"


@dataclass
class Prepared:
    """One prepared batch. ``array`` is a view into a recycled buffer: valid until the next batch is asked for."""

    items: list
    array: np.ndarray
    skipped: list[tuple[object, ImageError]] = field(default_factory=list)


def _fill(pre: Preprocessor, item, out: np.ndarray) -> None:
    """Thread task: decode, resize, crop and normalise one image into its row of the batch buffer."""
    pre.normalise_into(pre.load(item), out)


def _load_many(pre: Preprocessor, items: Sequence) -> list:
    """Process task: uint8 crops of several images (an :class:`ImageError` in place of an unreadable one)."""
    out: list = []
    for item in items:
        try:
            out.append(pre.load(item))
        except ImageError as e:
            out.append(e)
    return out


class BatchLoader:
    """Prepares ``items`` in batches of ``batch_size`` on ``workers`` threads or processes.

    Args:
        pre: the model's :class:`Preprocessor`.
        workers: 0 prepares in the calling thread (no pool).
        loader: ``"threads"`` (default) or ``"processes"``.
        prefetch: batches prepared ahead of the one being used (bounds memory).
        skip_bad: list unreadable images in :attr:`Prepared.skipped` instead of raising :class:`ImageError`.
    """

    def __init__(self, pre: Preprocessor, *, batch_size: int = 32, workers: int = 0, loader: str = "threads",
                 prefetch: int = 2, skip_bad: bool = False) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if workers < 0:
            raise ValueError("workers must be >= 0")
        if loader not in LOADERS:
            raise ValueError(f"loader must be one of {', '.join(LOADERS)}, not {loader!r}")
        self.pre, self.batch_size, self.workers, self.loader = pre, batch_size, workers, loader
        self.prefetch, self.skip_bad = max(1, prefetch), skip_bad
        self._free: list[np.ndarray] = []

    def _buffer(self) -> np.ndarray:
        return self._free.pop() if self._free else np.empty((self.batch_size, self.pre.channels, *self.pre.size),
                                                              np.float32)

    def __call__(self, items: Sequence) -> Iterator[Prepared]:
        chunks = [list(items[i:i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        if self.workers == 0:
            yield from self._serial(chunks)
            return
        if self.loader == "threads":
            pool: Executor = ThreadPoolExecutor(self.workers, thread_name_prefix="cnds-loader")
            submit: Callable = self._submit_threads
        else:
            # spawn, not fork: the parent holds onnxruntime's threads, which a forked child must not inherit
            pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            submit = self._submit_processes
        pending: deque = deque()
        try:
            for chunk in chunks:
                pending.append(submit(pool, chunk))
                if len(pending) > self.prefetch:
                    yield self._collect(*pending.popleft())
            while pending:
                yield self._collect(*pending.popleft())
        except BrokenProcessPool:
            raise RuntimeCndsError("an image loader process died (out of memory?); rerun with --loader threads") \
                from None
        finally:
            for _, _, futures in pending:
                for f in futures:
                    f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    # ---- the three ways to prepare a chunk ------------------------------------------------------------
    def _serial(self, chunks: list[list]) -> Iterator[Prepared]:
        for chunk in chunks:
            buf = self._buffer()
            errors: list = []
            for i, item in enumerate(chunk):
                try:
                    _fill(self.pre, item, buf[i])
                    errors.append(None)
                except ImageError as e:
                    errors.append(e)
            yield self._finish(chunk, buf, errors)

    def _submit_threads(self, pool: Executor, chunk: list):
        buf = self._buffer()
        return chunk, buf, [pool.submit(_fill, self.pre, item, buf[i]) for i, item in enumerate(chunk)]

    def _submit_processes(self, pool: Executor, chunk: list):
        # a few tasks per batch: enough to spread over the workers, few enough to keep IPC cheap
        step = max(1, -(-len(chunk) // self.workers))
        return chunk, None, [pool.submit(_load_many, self.pre, chunk[i:i + step]) for i in range(0, len(chunk), step)]

    def _collect(self, chunk: list, buf: np.ndarray | None, futures: list[Future]) -> Prepared:
        errors: list = []
        if buf is None:  # process results: uint8 crops, normalised here into a buffer
            buf = self._buffer()
            loaded = [x for f in futures for x in f.result()]
            for i, x in enumerate(loaded):
                if isinstance(x, ImageError):
                    errors.append(x)
                else:
                    self.pre.normalise_into(x, buf[i])
                    errors.append(None)
        else:
            for f in futures:
                try:
                    f.result()
                    errors.append(None)
                except ImageError as e:
                    errors.append(e)
        return self._finish(chunk, buf, errors)

    def _finish(self, chunk: list, buf: np.ndarray, errors: list) -> Prepared:
        self._free.append(buf)  # reused once the caller asks for the batch after next
        if len(self._free) > self.prefetch + 2:
            self._free.pop(0)
        bad = [i for i, e in enumerate(errors) if e is not None]
        for i in bad:
            if errors[i].path is None:
                errors[i].path = label(chunk[i])
        if bad and not self.skip_bad:
            raise errors[bad[0]]
        if not bad:
            return Prepared(chunk, buf[:len(chunk)])
        keep = [i for i, e in enumerate(errors) if e is None]
        return Prepared([chunk[i] for i in keep], buf[keep], [(chunk[i], errors[i]) for i in bad])
