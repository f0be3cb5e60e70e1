"""Images → model input, exactly as the training evaluation transform prepares them.

The steps are those of ``cnds_compiler.data`` for image files, which equal torchvision's
``Resize((RH, RW))`` (PIL bilinear) → ``CenterCrop((H, W))`` → ``ToTensor()`` → ``Normalize(mean, std)``:
the image is converted to grey ("L") for 1-channel models or RGB for 3-channel ones, resized to the
metadata's ``resize`` (a cnds export always has one: the spec's ``data.resize``, else the input size),
centre-cropped to the input size, scaled to [0, 1] and normalised. Only Pillow and numpy are used.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError
from .metadata import ModelMetadata

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

ImageLike = str | os.PathLike | Image.Image | np.ndarray
"""A path, a PIL image, or an array: ``H x W`` or ``H x W x C`` (C = 1, 3, 4), uint8 or floats in [0, 1]."""


WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""Pillow's modes for 16-bit (and 32-bit integer) grey images, which ``convert("L"/"RGB")`` would clip."""


def eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit grey image scaled to 8 bits (0-65535 → 0-255); Pillow's own conversion clips every value
    above 255 to white. Other images are returned as they are."""
    if img.mode not in WIDE_GREY_MODES:
        return img
    a = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(a * (255.0 / 65535.0) + 0.5, 0, 255).astype(np.uint8), mode="L")


def _pixel_limit(default: int = 89_478_485) -> int:
    text = os.environ.get("CNDS_MAX_IMAGE_PIXELS", "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        warnings.warn(f"CNDS_MAX_IMAGE_PIXELS={text!r} is not a positive integer; using {default:,}", stacklevel=2)
        return default
    return int(text)


MAX_IMAGE_PIXELS = _pixel_limit()
"""Largest image (width x height) decoded, read from the file's header before any pixel is: Pillow's own
default (a quarter GiB of 24-bit pixels), set explicitly so a decompression bomb (a few KiB of PNG that
decodes to gigabytes) is one line naming the file, never a memory blow-up. ``CNDS_MAX_IMAGE_PIXELS`` raises it."""

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Pillow warns (DecompressionBombWarning) between its limit and twice it, and raises above. Every image it
# would warn about is refused by open_image's own header check with a message naming the file, so the
# warning would only add an anonymous second line.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _bomb(width: int, height: int, path) -> ImageError:
    return ImageError(
        f"image is {width}x{height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,} "
        "(a decompression bomb?); set CNDS_MAX_IMAGE_PIXELS to allow more", str(path))


def check_image_file(path: str | os.PathLike) -> None:
    """Refuse, before opening it, a path that is not a regular file: reading a FIFO blocks forever and
    ``/dev/zero`` never ends, whatever the name says. One :class:`ImageError` naming the path."""
    try:
        info = os.stat(path)  # follows symlinks: what the name leads to is what would be read
    except FileNotFoundError:
        broken = os.path.islink(path)
        raise ImageError("broken symlink" if broken else "no such image file", str(path)) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError("symlink loop (the link leads back to itself)", str(path)) from None
        raise ImageError(f"cannot read image ({e.strerror or e})", str(path)) from None
    except ValueError as e:  # a NUL byte in the name
        raise ImageError(f"cannot read image ({e})", str(path)) from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError("is a folder, not an image", str(path))
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                                             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
                     if test(info.st_mode)), "not a plain file")
        raise ImageError(f"not a regular file ({kind}); only image files are read", str(path))


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file fully (so a truncated file fails here, naming the file). Only regular files are
    opened, and only images whose header gives at most :data:`MAX_IMAGE_PIXELS` pixels are decoded."""
    check_image_file(path)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise ImageError("no such image file", str(path)) from None
    except IsADirectoryError:
        raise ImageError("is a folder, not an image", str(path)) from None
    except UnidentifiedImageError:
        raise ImageError("not an image file Pillow can read", str(path)) from None
    except Image.DecompressionBombError as e:  # over twice the limit: Pillow refuses it in open()
        size = re.search(r"\((\d+) pixels\)", str(e))  # Pillow names the header's pixel count
        what = f"image is {int(size.group(1)):,} pixels," if size else "image is"
        raise ImageError(f"{what} over the limit of {MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?); "
                         "set CNDS_MAX_IMAGE_PIXELS to allow more", str(path)) from None
    except (OSError, ValueError, SyntaxError) as e:  # corrupt header, permissions
        raise ImageError(f"cannot read image: {e}", str(path)) from None
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise _bomb(width, height, path)
    try:
        # load() reads the pixels and, for a single-frame file opened by name, closes the file itself, so
        # no copy is needed; multi-frame formats keep their file open: copy that frame and close it
        img.load()
        if getattr(img, "fp", None) is not None:
            with img:
                return img.copy()
        return img
    except Image.DecompressionBombError:  # a frame or tile larger than the header said
        img.close()
        raise ImageError(f"image decodes to over {MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?)", str(path)) from None
    except (OSError, ValueError, SyntaxError, MemoryError) as e:  # truncated or corrupt data
        img.close()
        raise ImageError(f"cannot read image: {e}", str(path)) from None


def array_to_image(a: np.ndarray) -> Image.Image:
    """An ``H x W`` or ``H x W x C`` array as a PIL image (floats are taken as [0, 1] and rounded to 8 bits)."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"an image array must be HxW or HxWxC with C in 1, 3, 4; got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
            raise ImageError(f"unsupported image array dtype {a.dtype}")
        if np.issubdtype(a.dtype, np.floating):
            a = np.rint(np.clip(a, 0.0, 1.0) * 255.0)
        a = np.clip(a, 0, 255).astype(np.uint8)
    mode = "L" if a.ndim == 2 else ("RGB" if a.shape[2] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(a), mode=mode)


@dataclass(frozen=True, slots=True)
class Preprocessor:
    """The evaluation transform of one model (build it with :meth:`from_metadata`)."""

    channels: int
    size: tuple[int, int]
    """Crop size (H, W): the model's input size."""
    resize: tuple[int, int] | int | None = None
    """``(H, W)`` to resize to before the crop; an ``int`` resizes the shorter side to it, keeping the aspect
    ratio (torchvision's ``Resize(int)``); ``None`` keeps the image's size."""
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"images can feed 1- or 3-channel models only, not {self.channels}-channel ones")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (0, 1, self.channels):
                raise ValueError(f"{name} has {len(values)} values for a {self.channels}-channel model")

    @classmethod
    def from_metadata(cls, md: ModelMetadata) -> Preprocessor:
        return cls(md.input_shape[0], md.crop, md.resize, md.mean, md.std)

    def to_image(self, item: ImageLike) -> Image.Image:
        """Any accepted input as a PIL image in the model's colour mode."""
        if isinstance(item, Image.Image):
            img = item
        elif isinstance(item, np.ndarray):
            img = array_to_image(item)
        elif isinstance(item, (str, os.PathLike)):
            img = open_image(item)
        else:
            raise ImageError(f"cannot use a {type(item).__name__} as an image (give a path, a PIL image or an array)")
        mode = "L" if self.channels == 1 else "RGB"
        img = eight_bit(img)
        return img if img.mode == mode else img.convert(mode)

    def load(self, item: ImageLike) -> np.ndarray:
        """Decode, convert, resize and centre-crop one image: ``(H, W)`` or ``(H, W, 3)`` uint8.

        The expensive half of the transform (Pillow releases the GIL for it, so threads run it in
        parallel); :meth:`normalise_into` does the rest.
        """
        img = self.to_image(item)
        if isinstance(self.resize, int):
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            # torchvision's Resize(int): the shorter side becomes `resize`, the longer one is truncated
            new_short, new_long = self.resize, int(self.resize * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            if size != img.size:
                img = img.resize(size, Image.BILINEAR)
        elif self.resize is not None:
            h, w = self.resize
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
        img = center_crop(img, self.size)
        return np.asarray(img, dtype=np.uint8)

    def normalise_into(self, pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Scale :meth:`load`'s ``pixels`` to [0, 1] and normalise them straight into ``out`` (``(C, H, W)``
        float32, e.g. one row of a batch buffer): in place, no temporaries, and bit for bit the values of
        torchvision's ``ToTensor`` → ``Normalize`` (divide by 255, subtract the mean, divide by the std)."""
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        np.divide(chw, np.float32(255.0), out=out, dtype=np.float32)
        for c in range(out.shape[0]):
            if self.mean:
                out[c] -= np.float32(self.mean[c if len(self.mean) > 1 else 0])
            if self.std:
                out[c] /= np.float32(self.std[c if len(self.std) > 1 else 0])
        return out

    def __call__(self, item: ImageLike) -> np.ndarray:
        """One image → ``(C, H, W)`` float32, resized, centre-cropped, scaled to [0, 1] and normalised."""
        return self.normalise_into(self.load(item), np.empty((self.channels, *self.size), np.float32))

    def batch(self, items: Sequence[ImageLike]) -> np.ndarray:
        """Several images → ``(N, C, H, W)`` float32."""
        return np.stack([self(item) for item in items]) if items else np.zeros((0, self.channels, *self.size),
                                                                             np.float32)


def center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torchvision's ``CenterCrop``: zero-pad a smaller image, then cut the centre ``size`` (H, W)."""
    th, tw = size
    w, h = img.size
    if tw > w or th > h:
        left, top = max(tw - w, 0) // 2, max(th - h, 0) // 2
        canvas = Image.new(img.mode, (max(w, tw), max(h, th)), 0)
        canvas.paste(img, (left, top))
        img, (w, h) = canvas, canvas.size
    if (w, h) == (tw, th):
        return img
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


MAX_WALK_FOLDERS = 100_000
"""Most folders one walk enters (symlinks may reach one folder many times; a loop is refused outright)."""


def image_files_under(folder: str | os.PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Every file with an image extension under ``folder``, recursively: names starting with ``.`` are left
    out, a folder's own files come before its subfolders', each sorted by name. Symlinked folders are
    followed, but a link back to a folder on the way down (a loop) is an :class:`ImageError` naming it, so
    a walk always ends. Files are listed by name only: a FIFO or device named ``x.png`` is listed and then
    refused by :func:`open_image` (or skipped, under ``skip_bad``)."""
    found: list[str] = []
    extensions = frozenset(extensions)
    root = os.fspath(folder)
    try:
        info = os.stat(root)
    except OSError as e:
        raise ImageError(f"cannot list folder ({e.strerror or e})", root) from None
    # the folders above the root count as ancestors too: a link back to one of them is a loop as well
    above: dict[tuple[int, int], str] = {}
    for parent in Path(os.path.realpath(root)).parents:
        try:
            p = os.stat(parent)
        except OSError:
            break
        above[(p.st_dev, p.st_ino)] = str(parent)
    # depth first, iteratively (a deep tree never nears Python's recursion limit), in os.walk's order
    pending: list[tuple[str, dict[tuple[int, int], str]]] = [(root, {**above, (info.st_dev, info.st_ino): root})]
    entered = 0
    while pending:
        path, ancestors = pending.pop()
        entered += 1
        if entered > MAX_WALK_FOLDERS:
            raise ImageError(f"more than {MAX_WALK_FOLDERS:,} folders to walk (symlinks reaching the same folders "
                             "again and again?)", root)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            raise ImageError(f"cannot list folder ({e.strerror or e})", path) from None
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks; False for a broken or self-referring link
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in extensions:
                found.append(entry.path)
        for sub in reversed(subfolders):
            try:
                info = os.stat(sub)
            except OSError as e:
                raise ImageError(f"cannot list folder ({e.strerror or e})", sub) from None
            key = (info.st_dev, info.st_ino)
            if key in ancestors:
                raise ImageError(f"symlink loop: leads back to {ancestors[key]}", sub)
            pending.append((sub, {**ancestors, key: sub}))
    return found


def expand_paths(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders replaced by the image files under them (:func:`image_files_under`, sorted)."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(Path(f) for f in image_files_under(p)))
        else:
            paths.append(p)
    return paths
