"""Feature files: ``.npy``, ``.npz`` and ``.parquet``, written from shards so memory stays flat.

An extraction is cut into *shards* of consecutive images. Each finished shard is written at once, whole
or not at all (temp file, fsync, rename), so a run that is killed keeps every finished shard and a rerun
skips them. When every shard is there, the output is assembled from them one shard at a time (never the
whole array in memory) into a temp file that is renamed into place, and the shards are removed.

What each format holds (features are flattened to one row per image, ``D = prod(layer shape)``):

* ``.npz``: ``paths`` (N,); ``features`` (N, D) for one layer, or one ``(N, D)`` array per layer under the
  layer's name; ``layer`` (the first), ``layers``, ``shapes`` (JSON), ``spec``, ``ir_hash``; with top-k
  also ``top_k_index`` / ``top_k_prob`` (N, k).
* ``.npy``: the ``(N, D)`` features of one layer; the image paths, one per line in row order, beside it
  in ``NAME.npy.paths.txt``.
* ``.parquet``: one row per image: ``path``, a fixed-size list of floats per layer, and with top-k
  ``top_k_index``, ``top_k_prob``, ``top_k_label``; shapes and model identity in the schema metadata.
  pyarrow is imported only when a Parquet file is written.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import OutputError

FORMATS = {".npy": "npy", ".npz": "npz", ".parquet": "parquet"}
PARTS_SUFFIX = ".parts"
MANIFEST = "_cnds_extract.json"


def output_format(path: str | os.PathLike) -> str:
    """``npy``, ``npz`` or ``parquet`` from the file name; anything else is an :class:`OutputError`."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise OutputError(f"unknown output format '{suffix or '(no extension)'}': name the output .npy, .npz or "
                          ".parquet", os.fspath(path))
    return FORMATS[suffix]


def require_pyarrow(what: str = "Parquet output"):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise OutputError(f"{what} needs pyarrow: pip install pyarrow (or pip install 'cnds[scale]')") from None
    return pyarrow


@dataclass
class Part:
    """The results of one shard (or one batch): rows in input order."""

    paths: list[str]
    features: dict[str, np.ndarray]
    """Layer → ``(n, D)`` float32."""
    top_index: np.ndarray | None = None
    top_prob: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.paths)

    @staticmethod
    def concat(parts: Sequence[Part], layers: Sequence[str], dims: Sequence[int], top_k: int) -> Part:
        def cat(arrays, shape, dtype):
            arrays = [a for a in arrays if a is not None]
            return np.concatenate(arrays) if arrays else np.zeros(shape, dtype)

        return Part(
            [p for part in parts for p in part.paths],
            {lay: cat([p.features[lay] for p in parts], (0, d), np.float32) for lay, d in zip(layers, dims, strict=True)},
            cat([p.top_index for p in parts], (0, top_k), np.int32) if top_k else None,
            cat([p.top_prob for p in parts], (0, top_k), np.float32) if top_k else None,
            [s for part in parts for s in part.skipped],
        )


# ---- atomic writes -----------------------------------------------------------------------------------


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def tmp_name(path: Path) -> Path:
    """A hidden temp name beside ``path`` (Parquet readers skip names starting with '.')."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


class atomic_file:
    """``with atomic_file(path) as tmp:`` write ``tmp``; on success it replaces ``path``, on error it is removed."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = Path(path), tmp_name(Path(path))

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                _fsync_replace(self.tmp, self.path)
                return
            except OSError as e:
                remove_quietly(self.tmp)
                raise OutputError(f"cannot write output: {e.strerror or e}", str(self.path)) from None
        remove_quietly(self.tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write output: {exc.strerror or exc}", str(self.path)) from None


# ---- shards of a local run ---------------------------------------------------------------------------


class ShardStore:
    """``OUT.parts/``: one ``part-NNNNN.npz`` per finished shard and the plan they belong to."""

    def __init__(self, out: Path, plan: dict) -> None:
        self.folder = out.with_name(out.name + PARTS_SUFFIX)
        self.plan = plan

    def open(self) -> list[int]:
        """Create the folder (or reuse it for the same plan); the indices of the shards already finished.
        Parts from a different run (other model, inputs, layers or shard size) are removed."""
        manifest = self.folder / MANIFEST
        try:
            if self.folder.is_dir():
                try:
                    same = json.loads(manifest.read_text()) == self.plan
                except (OSError, ValueError):
                    same = False
                if not same:
                    shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)
            if not manifest.exists():
                with atomic_file(manifest) as tmp:
                    tmp.write_text(json.dumps(self.plan, indent=1))
        except OSError as e:
            raise OutputError(f"cannot write output: {e.strerror or e}", str(self.folder)) from None
        return sorted(i for i in range(self.plan["shards"]) if self.part_path(i).is_file())

    def part_path(self, index: int) -> Path:
        return self.folder / f"part-{index:05d}.npz"

    def write(self, index: int, part: Part) -> None:
        arrays = {"paths": np.array(part.paths, dtype=str), "skipped": np.array(part.skipped, dtype=str)}
        arrays.update({f"f.{layer}": a for layer, a in part.features.items()})
        if part.top_index is not None:
            arrays.update(top_k_index=part.top_index, top_k_prob=part.top_prob)
        path = self.part_path(index)
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def read(self, index: int, members: Sequence[str] | None = None) -> Part:
        with np.load(self.part_path(index)) as z:
            def get(key):
                return z[key] if members is None or key in members else None

            names = [k[2:] for k in z.files if k.startswith("f.")]
            paths = z["paths"].tolist()
            return Part(paths, {n: get("f." + n) for n in names},
                        get("top_k_index") if "top_k_index" in z.files else None,
                        get("top_k_prob") if "top_k_prob" in z.files else None,
                        z["skipped"].tolist())

    def parts(self, members: Sequence[str] | None = None) -> Iterator[Part]:
        for i in range(self.plan["shards"]):
            yield self.read(i, members)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ---- assembling the output ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What goes into the output file."""

    layers: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    top_k: int
    class_names: tuple[str, ...]
    meta: dict

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s)) for s in self.shapes)


def _npy_header(f, shape: tuple[int, ...], dtype: np.dtype) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_2_0(f, header)


def _stream_array(f, store: ShardStore, rows: int, pick, width: tuple[int, ...], dtype) -> None:
    """One ``.npy`` stream of ``(rows, *width)`` built from each part's ``pick(part)``, a part at a time."""
    _npy_header(f, (rows, *width), dtype)
    for part in store.parts():
        f.write(np.ascontiguousarray(pick(part), dtype=dtype).tobytes())


def assemble(out: Path, fmt: str, store: ShardStore, layout: Layout) -> tuple[int, int]:
    """Write ``out`` from the finished shards; returns (images written, images skipped)."""
    rows, skipped, longest = 0, 0, 1
    for part in store.parts(members=()):  # paths only: counts and the widest path
        rows += part.rows
        skipped += len(part.skipped)
        longest = max([longest, *(len(p) for p in part.paths)])
    if fmt == "npy":
        _write_npy(out, store, rows, layout)
    elif fmt == "npz":
        _write_npz(out, store, rows, longest, layout)
    else:
        _write_parquet(out, store, layout)
    return rows, skipped


def _write_npy(out: Path, store: ShardStore, rows: int, layout: Layout) -> None:
    (layer,), (dim,) = layout.layers, layout.dims
    paths_file = out.with_name(out.name + ".paths.txt")
    with atomic_file(paths_file) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for part in store.parts(members=()):
            f.writelines(p + "\n" for p in part.paths)
    with atomic_file(out) as tmp, open(tmp, "wb") as f:
        _stream_array(f, store, rows, lambda p: p.features[layer], (dim,), np.float32)


def _write_npz(out: Path, store: ShardStore, rows: int, longest: int, layout: Layout) -> None:
    with atomic_file(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        def member(name: str, pick, width, dtype) -> None:
            with z.open(name + ".npy", "w", force_zip64=True) as f:
                _stream_array(f, store, rows, pick, width, dtype)

        def small(name: str, value) -> None:
            with z.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(value))

        member("paths", lambda p: np.array(p.paths, dtype=f"<U{longest}").reshape(-1), (), f"<U{longest}")
        for layer, dim in zip(layout.layers, layout.dims, strict=True):
            name = "features" if len(layout.layers) == 1 else layer
            member(name, lambda p, layer=layer: p.features[layer], (dim,), np.float32)
        if layout.top_k:
            member("top_k_index", lambda p: p.top_index, (layout.top_k,), np.int32)
            member("top_k_prob", lambda p: p.top_prob, (layout.top_k,), np.float32)
        small("layers", np.array(layout.layers, dtype=str))
        small("layer", np.array(layout.layers[0]))
        small("shapes", json.dumps({lay: list(s) for lay, s in zip(layout.layers, layout.shapes, strict=True)}))
        small("spec", np.array(layout.meta.get("spec", "")))
        small("ir_hash", np.array(layout.meta.get("ir_hash", "")))


def parquet_schema(layout: Layout):
    pa = require_pyarrow()
    fields = [pa.field("path", pa.string())]
    fields += [pa.field(lay, pa.list_(pa.float32(), d)) for lay, d in zip(layout.layers, layout.dims, strict=True)]
    if layout.top_k:
        fields += [pa.field("top_k_index", pa.list_(pa.int32(), layout.top_k)),
                   pa.field("top_k_prob", pa.list_(pa.float32(), layout.top_k)),
                   pa.field("top_k_label", pa.list_(pa.string(), layout.top_k))]
    meta = {"cnds.layers": json.dumps(list(layout.layers)),
            "cnds.shapes": json.dumps({lay: list(s) for lay, s in zip(layout.layers, layout.shapes, strict=True)}),
            **{f"cnds.{k}": json.dumps(v) for k, v in layout.meta.items()}}
    return pa.schema(fields, metadata=meta)


def part_table(part: Part, layout: Layout):
    """One part as a pyarrow Table with :func:`parquet_schema` (features are not copied)."""
    pa = require_pyarrow()
    schema = parquet_schema(layout)

    def fixed(a: np.ndarray, width: int, typ):
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).reshape(-1), typ), width)

    cols = [pa.array(part.paths, pa.string())]
    cols += [fixed(part.features[lay], d, pa.float32()) for lay, d in zip(layout.layers, layout.dims, strict=True)]
    if layout.top_k:
        names = [layout.class_names[i] if layout.class_names else str(i) for i in part.top_index.reshape(-1)]
        cols += [fixed(part.top_index.astype(np.int32), layout.top_k, pa.int32()),
                 fixed(part.top_prob, layout.top_k, pa.float32()), fixed(np.array(names, object), layout.top_k, pa.string())]
    return pa.Table.from_arrays(cols, schema=schema)


def _parquet_options(layout: Layout) -> dict:
    """Dictionary-encode only the class labels: features and paths are (nearly) all distinct, and trying a
    dictionary on them costs memory and time for nothing."""
    return {"use_dictionary": ["top_k_label"] if layout.top_k else False}


def write_parquet_part(path: Path, part: Part, layout: Layout) -> None:
    """One Parquet file holding ``part``, written atomically."""
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(part_table(part, layout), tmp, **_parquet_options(layout))


def _write_parquet(out: Path, store: ShardStore, layout: Layout) -> None:
    require_pyarrow()
    import pyarrow.parquet as pq

    with atomic_file(out) as tmp:
        with pq.ParquetWriter(tmp, parquet_schema(layout), **_parquet_options(layout)) as writer:
            for part in store.parts():
                if part.rows:
                    writer.write_table(part_table(part, layout))


def read_features(path: str | os.PathLike, layer: str | None = None) -> tuple[list[str], np.ndarray]:
    """``(paths, (N, D) features)`` from any of the three formats (a Parquet file or folder of shards)."""
    path = Path(path)
    fmt = output_format(path)
    if fmt == "npy":
        paths = Path(str(path) + ".paths.txt").read_text(encoding="utf-8").splitlines()
        return paths, np.load(path)
    if fmt == "npz":
        with np.load(path) as z:
            return z["paths"].tolist(), z[layer if layer in z.files else "features"]
    require_pyarrow()
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if layer is None:
        layer = json.loads(table.schema.metadata[b"cnds.layers"])[0]
    col = table.column(layer).combine_chunks()
    width = col.type.list_size
    return table.column("path").to_pylist(), col.flatten().to_numpy().reshape(-1, width)
