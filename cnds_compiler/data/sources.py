"""``load_source``: each ``--data`` source read and fitted to a network."""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, did_you_mean
from ..ir import Network
from .common import DataSplits, mix_seed
from .datasets import ImageFolderDataset, TensorImageDataset

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
_DIGITS_VAL_FRACTION = 0.2
_DIGITS_SPLIT_KEY = 0xD161_75


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
        found = "a file, not a directory" if root.exists() else "no such directory"
        raise DataError(
            f"Fashion-MNIST not found: {found}; install it with "
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
        what = "is a file, not a folder" if root.exists() else "not found: no such directory"
        raise DataError(f"image folder {what} (it needs train/<class>/ and val/<class>/)", path=str(root))
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
