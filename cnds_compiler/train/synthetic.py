"""Small synthetic image trees for tests and loader benchmarks (no downloads).

:func:`make_imagefolder` writes ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` in the
ImageNet/Places layout that ``--data imagefolder:DIR`` reads. Each class has its own colour and stripe
orientation (plus noise), so a small network can learn them; ``corrupt`` adds unreadable files.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

__all__ = ["make_imagefolder", "class_name"]


def class_name(k: int) -> str:
    """Folder name of class ``k`` (sorted order equals numeric order)."""
    return f"class_{k:03d}"


def _draw(k: int, classes: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """An (H, W, 3) uint8 image of class ``k``: stripes at a class angle in a class colour, plus noise."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = math.pi * k / max(1, classes)
    period = max(4.0, min(h, w) / 4.0)
    phase = rng.uniform(0, 2 * math.pi)
    wave = 0.5 + 0.5 * np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * (2 * math.pi / period) + phase)
    hue = 2 * math.pi * k / max(1, classes)
    colour = 0.5 + 0.45 * np.array([math.cos(hue), math.cos(hue - 2.094), math.cos(hue + 2.094)], np.float32)
    img = wave[..., None] * colour[None, None, :] * 255.0
    img += rng.normal(0.0, 12.0, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_imagefolder(
    root: str | Path,
    classes: int = 3,
    per_class: int = 8,
    size: tuple[int, int] = (64, 64),
    corrupt: int = 0,
    seed: int = 0,
    *,
    val_per_class: int | None = None,
) -> Path:
    """Write a class-per-folder JPEG tree under ``root`` and return ``root``.

    ``size`` is (H, W). ``train/`` holds ``per_class`` images per class, ``val/`` ``val_per_class``
    (default ``max(1, per_class // 2)``). ``corrupt`` extra files named ``corrupt_NNN.jpg`` go to
    ``train/`` (spread over the classes): even ones are truncated JPEGs, odd ones garbage bytes.
    Same arguments → same bytes.
    """
    if classes < 1 or per_class < 0 or corrupt < 0:
        raise ValueError("classes must be >= 1; per_class and corrupt >= 0")
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_val = max(1, per_class // 2) if val_per_class is None else val_per_class
    for split, n in (("train", per_class), ("val", n_val)):
        for k in range(classes):
            folder = root / split / class_name(k)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:05d}.jpg").write_bytes(_jpeg_bytes(_draw(k, classes, size, rng)))
    for j in range(corrupt):
        folder = root / "train" / class_name(j % classes)
        if j % 2 == 0:
            good = _jpeg_bytes(_draw(j % classes, classes, size, rng))
            data = good[: len(good) // 2]  # cut in the middle of the scan data
        else:
            data = rng.integers(0, 256, size=512, dtype=np.uint8).tobytes()
        (folder / f"corrupt_{j:03d}.jpg").write_bytes(data)
    return root
