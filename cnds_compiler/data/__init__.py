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

The package's modules, in the order data flows: ``common`` (seeds, the splits of a source, the markers and
collation every loader shares), ``datasets`` (in-memory tensors and image folders through one pipeline),
``sources`` (:func:`load_source` for each ``--data`` string) and ``loader`` (the epoch sampler and
:func:`make_loader`).
"""

from .common import DataSplits, Skipped, TensorBatch, Unreadable, collate_batch, mix_seed, mix_seed_array
from .datasets import PRECOMPUTE_BYTES, ImageFolderDataset, TensorImageDataset
from .loader import EpochLoader, EpochSampler, epoch_order, epoch_sampler, make_loader
from .sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    IMAGE_EXTENSIONS,
    SOURCES,
    _fit,
    _idx_file,
    digits_split,
    hold_out,
    load_source,
    read_idx,
)

__all__ = [
    "DataSplits", "load_source", "make_loader", "epoch_order", "epoch_sampler", "EpochSampler",
    "EpochLoader", "Skipped", "Unreadable", "TensorBatch", "collate_batch", "TensorImageDataset",
    "ImageFolderDataset", "SOURCES", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS",
    "PRECOMPUTE_BYTES", "mix_seed", "mix_seed_array", "digits_split", "hold_out", "read_idx",
    "_fit", "_idx_file",  # used by the benchmarks (the same fitting and file lookup as training)
]
