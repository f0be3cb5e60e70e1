"""Seeds, the splits of a source, and the markers and collation that every loader shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

# ---- seeds ----------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """:func:`_splitmix64` of every element of a uint64 array (numpy's uint64 arithmetic wraps modulo 2⁶⁴)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def mix_seed_array(prefix: int, values: np.ndarray, *suffix: int) -> np.ndarray:
    """``mix_seed(*prefix_parts, v, *suffix)`` for every ``v`` of a uint64 array, where ``prefix`` is
    ``mix_seed(*prefix_parts)``: per-sample seeds of a whole batch without a Python loop."""
    with np.errstate(over="ignore"):
        h = _splitmix64_array(np.uint64(prefix) ^ values.astype(np.uint64))
        for p in suffix:
            h = _splitmix64_array(h ^ np.uint64(int(p) & _M64))
    return h


def mix_seed(*parts: int) -> int:
    """A well-mixed unsigned 64-bit value of the integers ``parts`` (platform- and version-independent)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _M64))
    return h


# ---- the splits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSplits:
    """The train and val datasets of one source, fitted to a network."""

    train: Dataset
    val: Dataset
    class_names: tuple[str, ...]
    description: str
    """One line for logs, e.g. ``digits (1,438 train / 359 val, 8x8 grey)``."""
    source: str = ""
    """The ``--data`` string the splits came from."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---- markers and collation ------------------------------------------------------------------------


@dataclass(frozen=True)
class Unreadable:
    """What a dataset returns, instead of raising, for a sample it cannot read."""

    path: str
    reason: str


class Skipped(int):
    """How many samples of a batch were dropped as unreadable; ``.items`` holds their (path, reason)."""

    items: tuple[tuple[str, str], ...]

    def __new__(cls, items: Sequence[tuple[str, str]] = ()) -> Skipped:
        items = tuple((str(p), str(r)) for p, r in items)
        obj = super().__new__(cls, len(items))
        obj.items = items
        return obj

    def __reduce__(self):
        return (Skipped, (self.items,))


@dataclass(frozen=True)
class TensorBatch:
    """A batch an in-memory dataset built in one piece (``__getitems__``): nothing left to collate."""

    images: torch.Tensor
    labels: torch.Tensor


def collate_batch(samples: Sequence[Any] | TensorBatch, sample_shape: tuple[int, ...] | None = None):
    """``[(image, label) | Unreadable, ...]`` (or a :class:`TensorBatch`) → ``(images, labels, Skipped)``."""
    if isinstance(samples, TensorBatch):
        return samples.images, samples.labels, Skipped()
    good = [s for s in samples if not isinstance(s, Unreadable)]
    bad = [(s.path, s.reason) for s in samples if isinstance(s, Unreadable)]
    if good:
        # numpy's single-threaded copy: torch.stack goes through intra-op threads, which crawl when
        # the cores are busy (a training step in the same process, other processes)
        images = torch.from_numpy(np.stack([s[0].numpy() for s in good]))
        labels = torch.tensor([int(s[1]) for s in good], dtype=torch.int64)
    else:
        images = torch.empty((0, *(sample_shape or ())), dtype=torch.float32)
        labels = torch.empty((0,), dtype=torch.int64)
    return images, labels, Skipped(bad)


class _Collate:
    """Picklable collate function that knows the sample shape (for an all-unreadable batch)."""

    def __init__(self, sample_shape: tuple[int, ...] | None) -> None:
        self.sample_shape = sample_shape

    def __call__(self, samples):
        return collate_batch(samples, self.sample_shape)
