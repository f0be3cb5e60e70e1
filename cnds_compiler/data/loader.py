"""The epoch sampler and the loader: deterministic order per (seed, epoch), resumable mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError
from .common import Skipped, _Collate, mix_seed
from .datasets import _base_dataset, _CndsDataset

# ---- sampler --------------------------------------------------------------------------------------


def _per_replica(n: int, num_replicas: int, rank: int, pad: bool) -> int:
    if pad:
        return math.ceil(n / num_replicas) if n else 0
    return len(range(rank, n, num_replicas))


def epoch_order(
    n: int,
    seed: int,
    epoch: int,
    *,
    shuffle: bool = True,
    num_replicas: int = 1,
    rank: int = 0,
    pad: bool = True,
) -> list[int]:
    """The sample indices process ``rank`` of ``num_replicas`` visits in ``epoch``.

    With ``shuffle`` the full order is ``torch.randperm(n)`` from a generator seeded with
    ``mix_seed(seed, epoch)``; otherwise ``0..n-1``. For several replicas the order is padded by
    repeating its start up to a multiple of ``num_replicas`` (``pad``) and rank ``r`` takes positions
    ``r, r + R, r + 2R, ...`` (as ``DistributedSampler`` does), so every rank gets the same number.
    """
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
    if shuffle:
        g = torch.Generator()
        g.manual_seed(mix_seed(seed, epoch))
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    if num_replicas == 1:
        return order
    if pad and order:
        total = math.ceil(n / num_replicas) * num_replicas
        while len(order) < total:
            order += order[: total - len(order)]
    return order[rank::num_replicas]


epoch_sampler = epoch_order
"""Alias: ``epoch_sampler(dataset_len, seed, epoch, ...)`` is :func:`epoch_order`."""


class EpochSampler(Sampler[int]):
    """Yields :func:`epoch_order` of the current epoch, from position ``start`` on.

    ``set_epoch(e, start=k)`` selects epoch ``e`` and skips its first ``k`` indices (of this rank).
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        pad: bool = True,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.n, self.shuffle, self.seed = int(n), shuffle, int(seed)
        self.num_replicas, self.rank, self.pad = num_replicas, rank, pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if start < 0:
            raise ValueError("start must be >= 0")
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return max(0, _per_replica(self.n, self.num_replicas, self.rank, self.pad) - self.start)

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(
            self.n, self.seed, self.epoch, shuffle=self.shuffle, num_replicas=self.num_replicas,
            rank=self.rank, pad=self.pad,
        )
        return iter(order[self.start :])


# ---- loader ---------------------------------------------------------------------------------------


class EpochLoader(DataLoader):
    """A DataLoader that knows its epoch, skips batches on resume and reports unreadable samples.

    Iterating yields ``(images, labels, skipped)``. Each iteration runs one epoch: the one given to
    :meth:`set_epoch`, else the one after the previous iteration's (0 first).
    """

    def __init__(self, dataset: Dataset, *, seed: int, strict: bool, **kw: Any) -> None:
        super().__init__(dataset, **kw)
        self.seed = int(seed)
        self.strict = strict
        self.next_epoch = 0
        self._skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Make the next iteration epoch ``epoch`` without its first ``skip_batches`` batches.

        ``len(loader)`` then counts the batches that iteration will yield.
        """
        if skip_batches < 0:
            raise ValueError("skip_batches must be >= 0")
        self.next_epoch, self._skip_batches = int(epoch), int(skip_batches)
        if isinstance(self.sampler, EpochSampler):
            self.sampler.set_epoch(self.next_epoch, start=self._skip_batches * (self.batch_size or 1))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, Skipped]]:
        epoch, skip = self.next_epoch, self._skip_batches
        sampler = self.sampler
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(epoch, start=skip * (self.batch_size or 1))
            skip = 0
        elif hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.next_epoch, self._skip_batches = epoch + 1, 0
        base = _base_dataset(self.dataset)
        if isinstance(base, _CndsDataset):
            base.set_epoch(epoch, self.seed)
        if self.generator is not None:  # seeds the workers' torch RNGs
            self.generator.manual_seed(mix_seed(self.seed, epoch, 0x5EED))
        return self._batches(super().__iter__(), skip, base)

    def _batches(self, it, skip: int, base: Any):
        read = dropped = 0
        try:
            for batch in it:
                images, labels, skipped = batch
                if skip:
                    skip -= 1
                    continue
                if not isinstance(skipped, Skipped):
                    skipped = Skipped([("?", "unreadable")] * int(skipped))
                if skipped and self.strict:
                    path, reason = skipped.items[0]
                    raise DataError(f"cannot read image ({reason})", path=path)
                read += int(labels.shape[0])
                dropped += int(skipped)
                yield images, labels, skipped
        finally:
            it = None  # stop the workers now, not when the traceback that holds this frame goes  # noqa: F841
        if isinstance(self.sampler, EpochSampler) and self.sampler.start:
            self.sampler.set_epoch(self.next_epoch)  # len(loader): a whole epoch again
        if dropped and not read:
            where = getattr(base, "location", None)
            raise DataError(f"none of the {dropped} images of this epoch could be read", path=where)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    num_replicas: int = 1,
    rank: int = 0,
    pad: bool = True,
    strict: bool | None = None,
    pin_memory: bool = False,
    prefetch: int | None = None,
) -> EpochLoader:
    """A loader of ``(images, labels, skipped)`` batches over ``dataset``.

    Without ``sampler`` it uses an :class:`EpochSampler` (shuffled when ``shuffle``) seeded with
    ``seed`` and split over ``num_replicas``/``rank``. ``strict`` (default: the dataset's own, as
    :func:`load_source` set it) turns the first unreadable sample into a :class:`DataError` raised in
    the main process. ``workers`` > 0 loads in that many worker processes, each ``prefetch`` batches ahead
    (torch's default 2 when None). ``pin_memory`` returns page-locked batches (asynchronous copies to a GPU).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if sampler is None:
        sampler = EpochSampler(
            len(dataset), shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank, pad=pad
        )
    base = _base_dataset(dataset)
    if strict is None:
        strict = bool(getattr(base, "strict", False))
    shape = getattr(base, "sample_shape", None)
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, 0x5EED))
    return EpochLoader(
        dataset,
        seed=seed,
        strict=strict,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_Collate(shape),
        drop_last=drop_last,
        generator=g,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers > 0 else None,
    )
