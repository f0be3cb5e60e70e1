"""Data sources of ``cnds-train --data SOURCE``: datasets, the epoch sampler and the loader.

Sources (the ``--data`` strings)
--------------------------------
``digits``
    scikit-learn's bundled 8x8 digits (1,797 images, values 0..16 scaled to [0, 1]) with a fixed,
    stratified 80/20 train/val split that never depends on the seed. Works offline everywhere.
``fashion-mnist`` / ``fashion-mnist:DIR``
    The IDX ``.gz`` files of the Debian package ``dataset-fashion-mnist`` (default DIR
    ``/usr/share/datasets/fashion-mnist``); train (60,000) is the training set, t10k (10,000) the
    validation set.
``imagefolder:DIR``
    A class-per-folder tree ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/...`` (ImageNet, Places).

Every sample goes through the same pipeline, whatever its source: resize to ``data.resize`` (when the
spec gives no ``resize``, straight to the input HxW, so nothing is cropped), then crop to the spec's
input HxW — a random crop in training, the centre crop for evaluation, or with ``ten_crop`` the four
corners and the centre plus their mirrors — then a random horizontal flip in training when
``data.mirror`` is true, grey→C channels by repetition (in-memory sources), and normalisation
``(x - mean) / std`` in [0, 1] pixel units (empty mean/std mean 0/1). In-memory sources resize with
bilinear (antialiased) tensor interpolation; image trees with PIL's bilinear resize, so their eval
transform equals torchvision's ``Resize → CenterCrop → ToTensor → Normalize``.

Batches
-------
A loader from :func:`make_loader` yields ``(images, labels, skipped)``: ``images`` float32
``(B, C, H, W)`` (``(B, 10, C, H, W)`` for a ten-crop val set), ``labels`` int64 ``(B,)`` and
``skipped`` a :class:`Skipped` — an ``int`` counting the samples of this batch that could not be read
(always 0 for in-memory sources) whose ``.items`` lists their ``(path, reason)``. ``B`` is the batch
size minus ``skipped``, so it can be 0 when every image of a batch was unreadable.
An unreadable image never raises in a worker: the dataset returns an :class:`Unreadable` marker, the
collate function drops and counts it, and the loader (in the main process) raises :class:`DataError`
naming the image when the dataset is strict, or when a whole epoch had no readable image.

Determinism
-----------
The sample order of epoch ``e`` is :func:`epoch_order` ``(n, seed, e)`` — a function of
(seed, epoch) only, split across ``num_replicas`` processes like ``DistributedSampler`` (padded to equal
length). The random crop and flip of sample ``i`` in epoch ``e`` are a function of (seed, e, i), so
neither depends on the worker count, the process count or on where a run was resumed.
``loader.set_epoch(e, skip_batches=k)`` makes the next iteration be epoch ``e`` without its first ``k``
batches; iterating again without calling it runs the following epoch.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError, did_you_mean
from .ir import Network

__all__ = [
    "DataSplits", "load_source", "make_loader", "epoch_order", "epoch_sampler", "EpochSampler",
    "EpochLoader", "Skipped", "Unreadable", "TensorBatch", "collate_batch", "TensorImageDataset",
    "ImageFolderDataset", "SOURCES", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS",
    "mix_seed", "mix_seed_array", "digits_split", "read_idx",
]

SOURCES = ("digits", "fashion-mnist", "fashion-mnist:DIR", "imagefolder:DIR")
"""The forms ``--data`` accepts."""

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)
PRECOMPUTE_BYTES = 1 << 30
"""In-memory sources keep every resized, normalised sample ready when that takes at most this much."""

_DIGITS_VAL_FRACTION = 0.2
_DIGITS_SPLIT_KEY = 0xD161_75


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


# ---- datasets -------------------------------------------------------------------------------------


class _CndsDataset(Dataset):
    """Common state: the pipeline's geometry and the (seed, epoch) that drives augmentation."""

    def __init__(
        self,
        *,
        out_shape: tuple[int, int, int],
        resize: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool,
        mirror: bool,
        ten_crop: bool,
        strict: bool,
        location: str,
    ) -> None:
        self.out_shape = out_shape
        self.resize = resize
        self.mean = mean
        self.std = std
        self.train = train
        self.mirror = mirror and train
        self.ten_crop = ten_crop and not train
        self.strict = strict
        self.location = location
        """Where the data lives (for errors that concern the whole set)."""
        self._augment: tuple[int, int] | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (10, *self.out_shape) if self.ten_crop else self.out_shape

    @property
    def augments(self) -> bool:
        return self.train and (self.mirror or self.resize != self.out_shape[1:])

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        """Make sample ``i``'s random crop and flip a function of (seed, epoch, i).

        Until this is called, augmentation draws from torch's global RNG instead.
        """
        self._augment = (int(seed), int(epoch))

    def _bits(self, index: int) -> int:
        if self._augment is None:
            return int(torch.randint(0, 1 << 62, ()).item())
        seed, epoch = self._augment
        return mix_seed(seed, epoch, index, 0xA06)

    def _crop_boxes(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top, left, flip) of many training samples at once: the same values as :meth:`_crop_box`."""
        if self._augment is None:
            boxes = [self._crop_box(int(i)) for i in indices]
            top, left, flip = zip(*boxes, strict=True) if boxes else ((), (), ())
            return torch.tensor(top, dtype=torch.int64), torch.tensor(left, dtype=torch.int64), torch.tensor(
                flip, dtype=torch.bool)
        seed, epoch = self._augment
        bits = mix_seed_array(mix_seed(seed, epoch), indices.numpy().astype(np.uint64), 0xA06)
        rh, rw = self.resize
        _, h, w = self.out_shape
        top = ((bits >> np.uint64(1)) & np.uint64(0x7FFFFFFF)) % np.uint64(rh - h + 1)
        left = (bits >> np.uint64(32)) % np.uint64(rw - w + 1)
        flip = (bits & np.uint64(1)).astype(bool) & self.mirror
        return (torch.from_numpy(top.astype(np.int64)), torch.from_numpy(left.astype(np.int64)),
                torch.from_numpy(flip))

    def _crop_box(self, index: int) -> tuple[int, int, bool]:
        """(top, left, flip) of a training sample."""
        bits = self._bits(index)
        rh, rw = self.resize
        _, h, w = self.out_shape
        top = ((bits >> 1) & 0x7FFFFFFF) % (rh - h + 1)
        left = (bits >> 32) % (rw - w + 1)
        return top, left, self.mirror and bool(bits & 1)


def _centre(size: int, crop: int) -> int:
    return int(round((size - crop) / 2.0))  # torchvision's center_crop rule


def _five_boxes(H: int, W: int, h: int, w: int) -> tuple[tuple[int, int], ...]:
    """(top, left) of torchvision's five crops: top-left, top-right, bottom-left, bottom-right, centre."""
    return ((0, 0), (0, W - w), (H - h, 0), (H - h, W - w), (_centre(H, h), _centre(W, w)))


def _ten_crop_tensor(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """torchvision's ten-crop order: the five crops, then the five crops of the mirrored image."""
    boxes = _five_boxes(x.shape[-2], x.shape[-1], h, w)
    out = []
    for img in (x, x.flip(-1)):
        out.extend(img[..., t : t + h, left : left + w] for t, left in boxes)
    return torch.stack(out)


class TensorImageDataset(_CndsDataset):
    """Images held in memory (digits, Fashion-MNIST).

    ``raw`` is ``(N, c, h, w)``, uint8 (0..255) or float in [0, 1]; ``labels`` ``(N,)``; ``indices`` are
    the samples' positions in the source (for tests and logs). Resizing, channel repetition and
    normalisation happen once up front when the result fits in :data:`PRECOMPUTE_BYTES`.
    """

    def __init__(self, raw: torch.Tensor, labels: torch.Tensor, indices: Sequence[int], **kw: Any) -> None:
        super().__init__(**kw)
        if raw.ndim != 4 or raw.shape[0] != labels.shape[0]:
            raise ValueError("raw must be (N, c, h, w) with one label per image")
        c = self.out_shape[0]
        if raw.shape[1] not in (1, c):
            raise ValueError(f"cannot make {c} channels from {raw.shape[1]}")
        self.labels = labels.to(torch.int64)
        self.indices = tuple(int(i) for i in indices)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        n = raw.shape[0]
        if n * c * self.resize[0] * self.resize[1] * 4 <= PRECOMPUTE_BYTES:
            self._raw = None
            self._data = torch.empty((n, c, *self.resize), dtype=torch.float32)
            for i in range(0, n, 4096):
                self._prepare(raw[i : i + 4096], out=self._data[i : i + 4096])
        else:
            self._raw, self._data = raw, None

    def _prepare(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n, c, h, w) raw → (n, C, RH, RW) float32 normalised, written into ``out``."""
        c = self.out_shape[0]
        if out is None:
            out = torch.empty((x.shape[0], c, *self.resize), dtype=torch.float32)
        unit = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
        if tuple(x.shape[-2:]) != self.resize:
            x = nnf.interpolate(x.float(), size=self.resize, mode="bilinear", align_corners=False, antialias=True)
        out.copy_(x.expand(-1, c, -1, -1))
        return out.mul_(unit / self._std).sub_(self._mean / self._std)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int):
        i = int(i)
        x = self._data[i] if self._data is not None else self._prepare(self._raw[i : i + 1])[0]
        _, h, w = self.out_shape
        if self.ten_crop:
            x = _ten_crop_tensor(x, h, w)
        elif self.augments:
            top, left, flip = self._crop_box(i)
            x = x[:, top : top + h, left : left + w]
            if flip:
                x = x.flip(-1)
        elif tuple(x.shape[-2:]) != (h, w):
            t, left = _centre(x.shape[-2], h), _centre(x.shape[-1], w)
            x = x[:, t : t + h, left : left + w]
        return x.contiguous(), int(self.labels[i])

    def __getitems__(self, indices: Sequence[int]) -> TensorBatch:
        """The samples ``indices`` as one batch: one gather from the prepared tensor and the crops and
        flips as index arithmetic — the values ``[self[i] for i in indices]`` stacked would have, without
        a per-sample call and collate (the DataLoader calls this for a whole batch)."""
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        if self._data is not None:
            x = self._data.index_select(0, idx)
        else:
            x = self._prepare(self._raw.index_select(0, idx))
        _, h, w = self.out_shape
        if self.ten_crop:
            crops = [_ten_crop_tensor(s, h, w) for s in x]
            x = torch.stack(crops) if crops else x.new_empty((0, *self.sample_shape))
        elif self.augments:
            top, left, flip = self._crop_boxes(idx)
            if tuple(x.shape[-2:]) == (h, w):  # nothing to crop: mirror only
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            else:
                # each sample's crop (and flip) as positions in its flattened image, read with one gather
                cols = torch.arange(w)
                cols = left.view(-1, 1) + torch.where(flip.view(-1, 1), w - 1 - cols, cols)  # (B, w)
                rows = top.view(-1, 1) + torch.arange(h)  # (B, h)
                where = (rows.view(-1, h, 1) * x.shape[-1] + cols.view(-1, 1, w)).view(-1, 1, h * w)
                b, ch = x.shape[:2]
                x = x.reshape(b, ch, -1).gather(2, where.expand(b, ch, h * w)).view(b, ch, h, w)
        elif tuple(x.shape[-2:]) != (h, w):
            t, left = _centre(x.shape[-2], h), _centre(x.shape[-1], w)
            x = x[:, :, t : t + h, left : left + w]
        return TensorBatch(x.contiguous(), self.labels.index_select(0, idx))


class ImageFolderDataset(_CndsDataset):
    """Image files decoded with PIL (in DataLoader workers); unreadable ones come back as :class:`Unreadable`.

    The transforms are written with PIL directly (no torchvision import in workers) and equal
    torchvision's ``Resize((RH, RW))`` (bilinear), ``CenterCrop``/``TenCrop``, ``ToTensor`` and
    ``Normalize`` operation for operation.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], **kw: Any) -> None:
        super().__init__(**kw)
        self._import_readers()
        self.samples = list(samples)
        self.mode = {1: "L", 3: "RGB"}[self.out_shape[0]]
        self._mean_np = np.asarray(self.mean, dtype=np.float32)
        self._std_np = np.asarray(self.std, dtype=np.float32)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_Image", "_open_image", "_ImageError"):
            state.pop(name, None)  # modules and their functions are imported again in spawned workers
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._import_readers()

    def _import_readers(self) -> None:
        """Pillow and the runtime's image reader, imported here so that forked workers inherit them."""
        from cnds_runtime.errors import ImageError
        from cnds_runtime.preprocess import open_image
        from PIL import Image

        self._Image, self._open_image, self._ImageError = Image, open_image, ImageError

    def __len__(self) -> int:
        return len(self.samples)

    def _to_tensor(self, img) -> torch.Tensor:
        # numpy, not torch: per-image torch ops in the main process would go through intra-op threads
        # (slow when cores are busy); the float32 operations are the same as ToTensor + Normalize.
        x = np.asarray(img, dtype=np.uint8).astype(np.float32)
        if x.ndim == 2:
            x = x[:, :, None]
        x /= np.float32(255)
        x -= self._mean_np
        x /= self._std_np
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def __getitem__(self, i: int):
        Image = self._Image
        i = int(i)
        path, label = self.samples[i]
        try:
            # the runtime's reader: regular files only (a FIFO named x.png would block), the pixel limit
            # checked from the header (a decompression bomb is refused, not decoded)
            img = _eight_bit(self._open_image(path)).convert(self.mode)  # 16-bit grey scaled, not clipped
        except self._ImageError as e:
            return Unreadable(path, e.message)
        except Exception as e:  # noqa: BLE001 - any failure to decode makes the sample unreadable
            reason = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
            return Unreadable(path, reason)
        _, h, w = self.out_shape
        rh, rw = self.resize
        if img.size != (rw, rh):
            img = img.resize((rw, rh), Image.Resampling.BILINEAR)
        if self.ten_crop:
            crops = []
            for im in (img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
                crops.extend(im.crop((left, t, left + w, t + h)) for t, left in _five_boxes(rh, rw, h, w))
            return torch.stack([self._to_tensor(c) for c in crops]), label
        if self.augments:
            top, left, flip = self._crop_box(i)
        else:
            top, left, flip = _centre(rh, h), _centre(rw, w), False
        if (top, left, h, w) != (0, 0, rh, rw):
            img = img.crop((left, top, left + w, top + h))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self._to_tensor(img), label


def _base_dataset(ds: Any) -> Any:
    """Unwrap ``Subset``-style wrappers (anything with a ``.dataset``)."""
    seen = 0
    while not isinstance(ds, _CndsDataset) and hasattr(ds, "dataset") and seen < 16:
        ds, seen = ds.dataset, seen + 1
    return ds


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


# ---- load_source ----------------------------------------------------------------------------------


def _fit(net: Network) -> dict[str, Any]:
    """The pipeline settings that ``net`` asks for."""
    c, h, w = net.input.dims
    d = net.data
    resize = tuple(d.resize) if d.resize else (h, w)
    if resize[0] < h or resize[1] < w:
        raise DataError(
            f"data.resize {resize[0]}x{resize[1]} is smaller than the input {h}x{w}; nothing to crop from"
        )

    def per_channel(values: tuple[float, ...], default: float, what: str) -> tuple[float, ...]:
        if not values:
            return (default,) * c
        if len(values) == 1:
            return tuple(values) * c
        if len(values) != c:
            raise DataError(f"data.{what} has {len(values)} values for {c} input channels")
        return tuple(float(v) for v in values)

    std = per_channel(d.std, 1.0, "std")
    if any(s == 0 for s in std):
        raise DataError("data.std must not be 0")
    return dict(out_shape=(c, h, w), resize=resize, mean=per_channel(d.mean, 0.0, "mean"), std=std,
                mirror=d.mirror)


def _by_spec_names(names: tuple[str, ...], folders: list[str], train_dir: Path) -> list[str]:
    """Class folders in the order of the spec's ``classes [...]``, so label k is the spec's k-th name — the
    name a deployed model gives prediction k. Every name needs its folder and every folder its name."""
    unnamed = [f for f in folders if f not in names]
    missing = [n for n in names if n not in folders]
    if unnamed or missing:
        parts = ([f"no folder for the spec's classes {missing}"] if missing else []) + (
            [f"folders the spec does not name {unnamed}"] if unnamed else [])
        raise DataError(f"the spec's class names and the class folders differ: {'; '.join(parts)} "
                        f"(class folders map to the spec's classes by name)", path=str(train_dir),
                        hint=did_you_mean(missing[0], unnamed) if missing and unnamed else None)
    return list(names)


def _eight_bit(img):
    """16-bit grey images scaled to 8 bits (Pillow's conversion clips them to white): the runtime's rule, so
    training and deployment see the same pixels."""
    from cnds_runtime.preprocess import eight_bit

    return eight_bit(img)


def _check_classes(net: Network, found: int, what: str, where: str | None) -> None:
    if net.num_classes != found:
        raise DataError(f"the spec declares {net.num_classes} classes but {what} has {found}", path=where)


def _limit(n: int, limit: int | None, seed: int, what: str) -> list[int]:
    """Indices of a seeded random subset of ``limit`` of ``n`` samples (all when ``limit`` is None)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise DataError(f"{what} must be at least 1, got {limit}")
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, n, 0x117))
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())


def hold_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions ``(kept, held_out)`` of a seeded random split of ``n`` training samples.

    ``round(fraction * n)`` samples are held out (``--val-split``); which ones depends only on ``seed``
    and ``n`` (not on the training seed), so every run with the same split seed sees the same split.
    """
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise DataError(f"--val-split must be a fraction between 0 and 1 (exclusive), got {fraction}")
    held = int(round(fraction * n))
    if held < 1 or held >= n:
        raise DataError(f"--val-split {fraction:g} of {n:,} training samples leaves "
                        + ("no validation sample" if held < 1 else "no training sample"))
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, n, 0x5A1D))
    order = torch.randperm(n, generator=g).tolist()
    return sorted(order[held:]), sorted(order[:held])


def _held_out_note(val_split: float | None, split_seed: int) -> str:
    return "" if val_split is None else f", val = {val_split:g} of train held out (split seed {split_seed})"


def _shape_note(fit: dict[str, Any], native: tuple[int, int]) -> str:
    c, h, w = fit["out_shape"]
    native_s = f"{native[0]}x{native[1]} grey"
    if (c, h, w) == (1, *native) and fit["resize"] == native:
        return native_s
    if fit["resize"] != (h, w):
        return f"{native_s} -> {c}x{h}x{w} crops of {fit['resize'][0]}x{fit['resize'][1]}"
    return f"{native_s} -> {c}x{h}x{w}"


def _memory_splits(
    name: str, net: Network, fit: dict[str, Any], train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor], train_idx: Sequence[int], val_idx: Sequence[int],
    classes: tuple[str, ...], ten_crop: bool, limit_train: int | None, limit_val: int | None, seed: int,
    location: str, prefix: str, val_split: float | None = None, split_seed: int = 0,
) -> DataSplits:
    if val_split is not None:  # the source's own val set is left out: it stays the test set
        keep, held = hold_out(len(train_idx), val_split, split_seed)
        k, h = torch.tensor(keep, dtype=torch.int64), torch.tensor(held, dtype=torch.int64)
        images, labels = train
        val, val_idx = (images[h], labels[h]), [train_idx[i] for i in held]
        train, train_idx = (images[k], labels[k]), [train_idx[i] for i in keep]
    sets = []
    for (images, labels), idx, limit, is_train, what in (
        (train, train_idx, limit_train, True, "limit_train"), (val, val_idx, limit_val, False, "limit_val"),
    ):
        keep = _limit(len(idx), limit, seed, what)
        if len(keep) < len(idx):
            sel = torch.tensor(keep, dtype=torch.int64)
            images, labels, idx = images[sel], labels[sel], [idx[k] for k in keep]
        sets.append(TensorImageDataset(
            images, labels, idx, train=is_train, ten_crop=ten_crop,
            strict=False, location=location, **fit,
        ))
    tr, va = sets
    native = tuple(train[0].shape[-2:])
    desc = f"{prefix} ({len(tr):,} train / {len(va):,} val, {_shape_note(fit, native)}{_held_out_note(val_split, split_seed)})"
    return DataSplits(tr, va, classes, desc, name)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as (N, 8, 8) values 0..16 and labels, from scikit-learn's bundled file.

    Reads ``sklearn/datasets/data/digits.csv.gz`` directly (importing ``sklearn.datasets`` costs about
    a second of CPU); falls back to ``load_digits``.
    """
    spec = importlib.util.find_spec("sklearn")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        f = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if f.is_file():
            data = np.loadtxt(f, delimiter=",", dtype=np.float32)
            if data.shape == (1797, 65):
                return data[:, :64].reshape(-1, 8, 8), data[:, 64].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits source needs scikit-learn (pip install scikit-learn)") from None
    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


def _load_digits(name: str, net: Network, fit, ten_crop, limit_train, limit_val, seed, val_split=None,
                 split_seed=0) -> DataSplits:
    _check_classes(net, 10, "digits", None)
    images, targets = _digits_arrays()
    x = torch.from_numpy(images / 16.0).unsqueeze(1)
    y = torch.from_numpy(targets)
    train_idx, val_idx = digits_split(y.tolist())
    ti, vi = torch.tensor(train_idx), torch.tensor(val_idx)
    return _memory_splits(
        name, net, fit, (x[ti], y[ti]), (x[vi], y[vi]), train_idx, val_idx,
        tuple(str(d) for d in range(10)), ten_crop, limit_train, limit_val, seed, "digits", "digits",
        val_split, split_seed,
    )


def digits_split(labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """The fixed stratified split of the digits: per class, ``round(0.2 n)`` samples go to val.

    Within a class the samples are ordered by a fixed hash of their index, so the split never changes.
    """
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, val = [], []
    for members in by_class.values():
        ranked = sorted(members, key=lambda i: mix_seed(_DIGITS_SPLIT_KEY, i))
        k = int(round(_DIGITS_VAL_FRACTION * len(ranked)))
        val.extend(ranked[:k])
        train.extend(ranked[k:])
    return sorted(train), sorted(val)


_IDX_CACHE: dict[tuple[str, int, int], np.ndarray] = {}


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """A uint8 IDX file (``.gz`` or plain) with ``ndim`` dimensions as an array; DataError when malformed."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"cannot read IDX file: {e.strerror or e}", path=str(path)) from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _IDX_CACHE:
        return _IDX_CACHE[key]
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except EOFError:
        raise DataError("truncated file (the compressed data ends early)", path=str(path)) from None
    except (OSError, zlib.error) as e:
        raise DataError(f"cannot read IDX file: {e}", path=str(path)) from None
    head = 4 + 4 * ndim
    if len(raw) < head or raw[0:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(
            f"not an IDX file of unsigned bytes with {ndim} dimension{'s' if ndim > 1 else ''} "
            "(bad header)", path=str(path)
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    need = math.prod(dims)
    if len(raw) - head != need:
        raise DataError(
            f"truncated or malformed IDX file: the header promises {need:,} bytes of data "
            f"({'x'.join(map(str, dims))}), the file has {len(raw) - head:,}", path=str(path)
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims).copy()
    while len(_IDX_CACHE) >= 4:  # the four Fashion-MNIST files at most
        _IDX_CACHE.pop(next(iter(_IDX_CACHE)))
    _IDX_CACHE[key] = arr
    return arr


def _idx_file(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}.gz is missing", path=str(root / (stem + ".gz")))


def _load_fmnist(name: str, root: Path, net: Network, fit, ten_crop, limit_train, limit_val, seed, val_split=None,
                 split_seed=0):
    if not root.is_dir():
        raise DataError(
            "Fashion-MNIST not found: no such directory; install it with "
            "`apt-get install -y dataset-fashion-mnist` or pass --data fashion-mnist:DIR",
            path=str(root),
        )
    parts = {}
    for split, (img_stem, lab_stem) in _FMNIST_FILES.items():
        img_path, lab_path = _idx_file(root, img_stem), _idx_file(root, lab_stem)
        images = read_idx(img_path, 3)
        labels = read_idx(lab_path, 1)
        if labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{labels.shape[0]:,} labels for {images.shape[0]:,} images in {img_path.name}",
                path=str(lab_path),
            )
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"label {int(labels.max())} is out of range 0..9", path=str(lab_path))
        parts[split] = (images, labels)
    if parts["train"][0].shape[1:] != parts["val"][0].shape[1:]:
        raise DataError("train and t10k images differ in size", path=str(root))
    _check_classes(net, len(FASHION_MNIST_CLASSES), "Fashion-MNIST", str(root))
    tensors = {s: (torch.from_numpy(im).unsqueeze(1), torch.from_numpy(lab.astype(np.int64)))
               for s, (im, lab) in parts.items()}
    prefix = "fashion-mnist" if root == FASHION_MNIST_DIR else f"fashion-mnist {root}"
    return _memory_splits(
        name, net, fit, tensors["train"], tensors["val"], range(len(parts["train"][1])),
        range(len(parts["val"][1])), FASHION_MNIST_CLASSES, ten_crop, limit_train, limit_val, seed,
        str(root), prefix, val_split, split_seed,
    )


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    """The runtime's walk (symlinked folders followed, loops refused, dot names left out), so training and
    ``cnds-extract DIR`` see the same files."""
    from cnds_runtime.errors import ImageError
    from cnds_runtime.preprocess import image_files_under

    try:
        return image_files_under(folder, IMAGE_EXTENSIONS)
    except ImageError as e:
        raise DataError(e.message, path=e.path) from None


def _load_imagefolder(name, root: Path, net: Network, fit, strict, ten_crop, limit_train, limit_val, seed,
                      val_split=None, split_seed=0):
    if not root.is_dir():
        raise DataError("image folder not found: no such directory", path=str(root))
    c = fit["out_shape"][0]
    if c not in (1, 3):
        raise DataError(f"image folders give grey or RGB images, but the spec's input has {c} channels")
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir) if val_split is None else (train_dir,):  # val/ is not read with --val-split
        if not d.is_dir():
            raise DataError(
                f"missing {d.name}/ folder (an image folder needs train/<class>/ and val/<class>/)",
                path=str(d),
            )
    classes = _subdirs(train_dir)
    if not classes:
        raise DataError("no class folders in train/", path=str(train_dir))
    if net.class_names:
        classes = _by_spec_names(net.class_names, classes, train_dir)
    index = {cls: k for k, cls in enumerate(classes)}
    for cls in _subdirs(val_dir) if val_split is None else ():
        if cls not in index:
            raise DataError(
                f"val class '{cls}' is not a train class", path=str(val_dir / cls),
                hint=did_you_mean(cls, classes),
            )
    _check_classes(net, len(classes), "the image folder", str(train_dir))
    def scan(split_dir: Path, is_train: bool) -> list[tuple[str, int]]:
        samples = []
        for cls in _subdirs(split_dir):
            files = _image_files(split_dir / cls)
            if not files and is_train:
                raise DataError("class folder has no images", path=str(split_dir / cls))
            samples.extend((f, index[cls]) for f in files)
        if not samples:
            raise DataError("no images", path=str(split_dir))
        return samples

    train_samples = scan(train_dir, True)
    if val_split is None:
        val_samples = scan(val_dir, False)
    else:
        keep, held = hold_out(len(train_samples), val_split, split_seed)
        train_samples, val_samples = [train_samples[k] for k in keep], [train_samples[k] for k in held]
    sets = []
    for samples, split_dir, limit, is_train, what in (
        (train_samples, train_dir, limit_train, True, "limit_train"),
        (val_samples, train_dir if val_split is not None else val_dir, limit_val, False, "limit_val"),
    ):
        samples = [samples[k] for k in _limit(len(samples), limit, seed, what)]
        sets.append(ImageFolderDataset(
            samples, train=is_train, ten_crop=ten_crop, strict=strict, location=str(split_dir), **fit,
        ))
    tr, va = sets
    ch, h, w = fit["out_shape"]
    rh, rw = fit["resize"]
    kind = "RGB" if ch == 3 else "grey"
    crops = f"{h}x{w} {kind}" + (f" crops of {rh}x{rw}" if (rh, rw) != (h, w) else "")
    desc = (f"imagefolder {root} ({len(tr):,} train / {len(va):,} val, {len(classes)} classes, {crops}"
            f"{_held_out_note(val_split, split_seed)})")
    return DataSplits(tr, va, tuple(classes), desc, name)


def load_source(
    source: str,
    net: Network,
    *,
    strict: bool = False,
    ten_crop: bool = False,
    limit_train: int | None = None,
    limit_val: int | None = None,
    seed: int = 0,
    val_split: float | None = None,
    split_seed: int = 0,
) -> DataSplits:
    """The train/val datasets of ``source`` (a ``--data`` string), fitted to ``net``'s input and data.

    ``strict``: an unreadable image stops the run (DataError naming it) instead of being skipped.
    ``ten_crop``: val samples are the 10 crops ``(10, C, H, W)``. ``limit_*``: keep a random subset of
    that many samples (chosen by ``seed``; the digits split itself never depends on the seed).
    ``val_split``: hold out this fraction of the *training* set as the val set (chosen by ``split_seed``,
    see :func:`hold_out`); the source's own val set is then not used, so it stays an untouched test set.
    ``limit_*`` apply after the split.
    """
    fit = _fit(net)
    kind, sep, arg = source.partition(":")
    common = dict(ten_crop=ten_crop, limit_train=limit_train, limit_val=limit_val, seed=seed,
                  val_split=val_split, split_seed=split_seed)
    if kind == "digits":
        if sep:
            raise DataError("the digits source takes no argument; use --data digits")
        return _load_digits(source, net, fit, **common)
    if kind == "fashion-mnist":
        root = Path(arg).expanduser() if arg else FASHION_MNIST_DIR
        return _load_fmnist(source, root, net, fit, **common)
    if kind == "imagefolder":
        if not arg:
            raise DataError("imagefolder needs a directory: --data imagefolder:DIR")
        return _load_imagefolder(source, Path(arg).expanduser(), net, fit, strict, **common)
    known = ("digits", "fashion-mnist", "imagefolder")
    raise DataError(
        f"unknown data source '{source}'; known sources: " + ", ".join(SOURCES),
        hint=did_you_mean(kind, known),
    )
