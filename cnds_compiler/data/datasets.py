"""The datasets: in-memory tensors and image folders, through one augmentation pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from torch.utils.data import Dataset

from .common import TensorBatch, Unreadable, mix_seed, mix_seed_array

PRECOMPUTE_BYTES = 1 << 30
"""In-memory sources keep every resized, normalised sample ready when that takes at most this much."""


def _eight_bit(img):
    """16-bit grey images scaled to 8 bits (Pillow's conversion clips them to white): the runtime's rule, so
    training and deployment see the same pixels."""
    from cnds_runtime.preprocess import eight_bit

    return eight_bit(img)


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
