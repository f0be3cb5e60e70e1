"""Feature extraction to files, on this machine or on a Ray cluster.

* :func:`extract_local` — the images are cut into shards; each shard runs through the parallel pipeline
  (:mod:`cnds_runtime.pipeline`) and is written whole (:class:`~cnds_runtime.output.ShardStore`); at the
  end the ``.npy`` / ``.npz`` / ``.parquet`` output is assembled from the shards a shard at a time. A rerun
  of a killed run skips the shards it finished.
* :func:`extract_ray` — Ray Data reads the shards' path lists and ``map_batches`` runs
  :class:`ShardExtractor`, a callable class holding one onnxruntime session per actor, which writes each
  shard as one Parquet file in the output folder (atomically); finished shards are skipped on a rerun.
  ``ray`` is imported only here, only when this engine is used.

Both engines compute a shard with :func:`extract_part`, so they give the same features.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ImageError, ModelError, OutputError, RuntimeCndsError
from .metadata import LOGITS, OutputInfo
from .model import CndsModel, softmax
from .output import (
    MANIFEST,
    PARTS_SUFFIX,
    Layout,
    Part,
    ShardStore,
    assemble,
    atomic_file,
    output_format,
    remove_quietly,
    require_pyarrow,
    write_parquet_part,
)
from .pipeline import default_workers

SHARD_BYTES = 32 * 2**20
"""Default shard size: as many images as give about this many bytes of features (at least 64)."""


@dataclass(frozen=True)
class Summary:
    """What an extraction wrote."""

    out: Path
    images: int
    skipped: int
    layers: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    shards: int
    resumed: int
    """Shards found finished by an earlier run and skipped."""
    seconds: float
    actor_rates: tuple[float, ...] = ()
    """Ray engine: images/s of each shard on its actor (model + preprocessing, one actor)."""


# ---- what to extract ---------------------------------------------------------------------------------


def feature_outputs(model: CndsModel, layers: Sequence[str] | None) -> list[OutputInfo]:
    """The outputs for ``layers`` (default: the export's only feature output)."""
    if layers:
        outs = [model.output(name) for name in layers]
        names = [o.name for o in outs]
        if len(set(names)) != len(names):
            raise ModelError(f"a layer is asked for twice: {', '.join(layers)}", str(model.path))
        return outs
    features = [o for o in model.outputs if o.name != LOGITS] or list(model.outputs)
    if len(features) != 1:
        names = ", ".join(o.name for o in model.outputs)
        raise ModelError(f"this export has several outputs ({names}); choose with --layer (several: --layer a,b)",
                         str(model.path))
    return features


def make_layout(model: CndsModel, outs: Sequence[OutputInfo], top_k: int) -> Layout:
    md = model.metadata
    if top_k and md.logits_output is None:
        raise ModelError("--top-k needs the classifier's logits, and this export has only features; re-export "
                         f"with --features {','.join(o.name for o in outs)},logits", str(model.path))
    top_k = min(top_k, md.num_classes) if top_k else 0
    return Layout(tuple(o.name for o in outs), tuple(o.shape for o in outs), top_k,
                  tuple(md.class_name(i) for i in range(md.num_classes)) if top_k else (),
                  {"spec": md.spec_name, "ir_hash": md.ir_hash, "precision": md.precision, "weights": md.weights})


def extract_part(model: CndsModel, paths: Sequence[str], layout: Layout, *, batch_size: int = 32, workers: int = 0,
                 loader: str = "threads", skip_bad: bool = False,
                 on_batch: Callable[[int, list], None] | None = None) -> Part:
    """Features (flattened) and top-k of ``paths``; ``on_batch(images done, skipped errors)`` after each batch."""
    names = list(layout.layers) + ([LOGITS] if layout.top_k and LOGITS not in layout.layers else [])
    parts: list[Part] = []
    for batch in model.iter_batches(list(paths), names, batch_size=batch_size, skip_bad=skip_bad, workers=workers,
                                    loader=loader):
        n = len(batch.items)
        part = Part([os.fspath(p) for p in batch.items],
                    {lay: batch.outputs[lay].reshape(n, -1) for lay in layout.layers},
                    skipped=[os.fspath(item) for item, _ in batch.skipped])
        if layout.top_k:
            probs = softmax(batch.outputs[LOGITS].astype(np.float32))
            order = np.argsort(-probs, axis=1, kind="stable")[:, :layout.top_k]
            part.top_index = order.astype(np.int32)
            part.top_prob = np.take_along_axis(probs, order, axis=1).astype(np.float32)
        parts.append(part)
        if on_batch:
            on_batch(n + len(batch.skipped), [e for _, e in batch.skipped])
    return Part.concat(parts, layout.layers, layout.dims, layout.top_k)


def shard_size_for(layout: Layout, shard_size: int | None) -> int:
    if shard_size is not None:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        return shard_size
    row = 4 * sum(layout.dims) + 8 * layout.top_k + 256
    return max(64, min(65536, SHARD_BYTES // row))


def plan_for(model: CndsModel, paths: Sequence[str], layout: Layout, shard_size: int, fmt: str) -> dict:
    """What identifies a run: finished shards are reused only by a run with the same plan."""
    digest = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()
    size = model.path.stat().st_size if model.path.is_file() else None
    return {"cnds_extract": 1, "format": fmt, "spec": model.metadata.spec_name, "ir_hash": model.metadata.ir_hash,
            "weights": model.metadata.weights, "precision": model.metadata.precision, "model_bytes": size,
            "layers": list(layout.layers), "top_k": layout.top_k, "images": len(paths), "paths_sha256": digest,
            "shard_size": shard_size, "shards": -(-len(paths) // shard_size)}


def check_output(out: Path, model_path: Path, paths: Sequence[str], extra: Sequence[Path] = ()) -> None:
    """Refuse an output that would overwrite the model or an input image, or that is a folder."""
    targets = {os.path.realpath(p) for p in (out, *extra)}
    if os.path.realpath(model_path) in targets:
        raise OutputError("the output would overwrite the model file; choose another --out", str(out))
    images = {os.path.abspath(p) for p in paths}
    if targets & images or {os.path.abspath(t) for t in (out, *extra)} & images:
        raise OutputError("the output would overwrite one of the input images; choose another --out", str(out))
    if out.suffix.lower() == ".npy":  # the paths go one per line into OUT.paths.txt
        broken = next((p for p in paths if p.splitlines() != [p]), None)
        if broken is not None:
            raise OutputError(f"the image {broken!r} has a line break in its name, so {out.name}.paths.txt "
                              "could not list it on one line (every later row would get the wrong name); rename "
                              "it, or write .npz or .parquet, which keep each path whole", str(out))


# ---- the local engine --------------------------------------------------------------------------------


def extract_local(model: CndsModel, paths: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  layers: Sequence[str] | None = None, top_k: int = 0, batch_size: int = 32,
                  workers: int | None = None, loader: str = "threads", skip_bad: bool = False,
                  shard_size: int | None = None, on_progress: Callable[[int], None] | None = None,
                  on_skip: Callable[[ImageError], None] | None = None) -> Summary:
    """Extract ``layers`` of every image in ``paths`` into ``out`` (``.npy``, ``.npz`` or ``.parquet``).

    Resumable: finished shards are kept in ``OUT.parts/`` until the output is complete, and a rerun with
    the same model, images, layers and shard size skips them. Raises :class:`ImageError` at an unreadable
    image unless ``skip_bad`` (finished shards stay for the rerun), :class:`OutputError` for outputs that
    cannot be written.
    """
    start = time.perf_counter()
    out = Path(out)
    paths = [os.fspath(p) for p in paths]
    check_output(out, model.path, paths, [out.with_name(out.name + PARTS_SUFFIX), Path(str(out) + ".paths.txt")])
    fmt = output_format(out)
    if fmt == "parquet":
        require_pyarrow()
    outs = feature_outputs(model, layers)
    layout = make_layout(model, outs, top_k)
    if fmt == "npy" and (len(outs) > 1 or layout.top_k):
        raise OutputError("a .npy file holds one array: one layer and no --top-k (use .npz or .parquet for more)",
                          str(out))
    size = shard_size_for(layout, shard_size)
    store = ShardStore(out, plan_for(model, paths, layout, size, fmt))
    if out.is_dir():
        raise OutputError("is a folder; name an output file", str(out))
    workers = default_workers() if workers is None else workers
    done = set(store.open())
    for i in done:
        if on_progress:
            on_progress(len(paths[i * size:(i + 1) * size]))

    def on_batch(n: int, errors: list) -> None:
        if on_progress:
            on_progress(n)
        for e in errors:
            if on_skip:
                on_skip(e)

    for i in range(store.plan["shards"]):
        if i not in done:
            part = extract_part(model, paths[i * size:(i + 1) * size], layout, batch_size=batch_size,
                                workers=workers, loader=loader, skip_bad=skip_bad, on_batch=on_batch)
            store.write(i, part)
    rows, skipped = assemble(out, fmt, store, layout)
    store.remove()
    return Summary(out, rows, skipped, layout.layers, layout.shapes, store.plan["shards"], len(done),
                   time.perf_counter() - start)


# ---- the Ray engine ----------------------------------------------------------------------------------


class ShardExtractor:
    """Ray Data callable class: one onnxruntime session per actor, one shard per call, written as Parquet.

    ``__call__`` receives a batch of shard rows (``shard``, ``paths``), extracts each shard with
    :func:`extract_part` and writes ``part-NNNNN.parquet`` in the output folder atomically; it returns one
    summary row per shard (images written, skipped, seconds).
    """

    def __init__(self, model: str, *, out: str, layers: Sequence[str], top_k: int, batch_size: int,
                 threads: int, skip_bad: bool) -> None:
        self.out, self.batch_size, self.skip_bad = Path(out), batch_size, skip_bad
        self.error: RuntimeCndsError | None = None
        try:  # e.g. the model is not at this path on this node: reported by __call__, as data
            self.model = CndsModel(model, device="cpu", threads=threads, spinning=False)
            self.layout = make_layout(self.model, feature_outputs(self.model, layers), top_k)
        except RuntimeCndsError as e:
            self.error = e

    def __call__(self, batch: dict) -> dict:
        shards, rows, skipped, seconds, errors = [], [], [], [], []
        for shard, paths in zip(batch["shard"], batch["paths"], strict=True):
            start = time.perf_counter()
            try:
                if self.error is not None:
                    raise self.error
                # one loader thread: it prepares the next batch while this actor's session runs
                part = extract_part(self.model, [str(p) for p in paths], self.layout, batch_size=self.batch_size,
                                    workers=1, skip_bad=self.skip_bad)
                write_parquet_part(self.out / part_name(int(shard)), part, self.layout)
                error = ""
            except RuntimeCndsError as e:  # back to the driver as data: Ray's wrappers would lose its class
                part, error = Part([], {}), json.dumps([type(e).__name__, e.message, e.path])
            shards.append(int(shard))
            rows.append(part.rows)
            skipped.append(json.dumps(part.skipped))
            seconds.append(time.perf_counter() - start)
            errors.append(error)
        return {"shard": np.array(shards), "rows": np.array(rows), "skipped": np.array(skipped, dtype=object),
                "seconds": np.array(seconds), "error": np.array(errors, dtype=object)}


def _no_restarts(map_batches) -> dict:
    """Keyword arguments that stop Ray from restarting a failed actor: its shard is redone by rerunning the
    command (finished shards are kept). Ray Data's default (restart forever) also makes Ray log a warning line
    per actor, because the actors' constructor arguments live in the object store (ray-project/ray#53727).

    Ray takes ``max_restarts`` only through ``map_batches``' catch-all remote arguments, deprecated in 2.60
    and announced to go in 2.64; where they are gone, Ray's default applies (failures still reach the driver,
    as data, through :class:`ShardExtractor`'s error column)."""
    takes_remote_args = any(p.kind is inspect.Parameter.VAR_KEYWORD
                            for p in inspect.signature(map_batches).parameters.values())
    return {"max_restarts": 0} if takes_remote_args else {}


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RuntimeCndsError("the Ray engine needs Ray Data: pip install 'ray[data]' pyarrow "
                               "(or pip install 'cnds[scale]')") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail fast, in one line, when ``host:port`` does not answer (ray.init would wait a long time)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except ValueError:
        raise RuntimeCndsError(f"--ray-address must be HOST:PORT (or ray://HOST:PORT, auto), not {address!r}") \
            from None
    except OSError as e:
        raise RuntimeCndsError(f"cannot reach a Ray cluster at {address}: {e.strerror or e}") from None


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at ``address`` or start a local one (unless this process is already connected);
    True when this call started Ray (so it should stop it)."""
    import logging

    if address:
        _check_reachable(address)
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                  configure_logging=True)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(**kwargs)
    except Exception as e:  # ConnectionError, RuntimeError, ...: one line, the first of Ray's message
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise RuntimeCndsError(f"cannot start or join Ray{f' at {address}' if address else ''}: {first[:200]}") \
            from None
    return True


@contextlib.contextmanager
def _quiet_ray_data(ray):
    """Ray Data's own progress bars and INFO lines off while it runs (the CLI draws one progress bar)."""
    import logging

    ctx = ray.data.DataContext.get_current()
    old_bars = ctx.enable_progress_bars
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [lg.level for lg in loggers]
    ctx.enable_progress_bars = False
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        ctx.enable_progress_bars = old_bars
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _user_error(exc: BaseException) -> RuntimeCndsError | None:
    """The runtime's own error inside Ray's wrappers (RayTaskError, UserCodeException, ...)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RuntimeCndsError) and type(e).__module__ == RuntimeCndsError.__module__:
            return e  # the original (Ray also raises classes derived from it, with its own long message)
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def extract_ray(model_path: str | os.PathLike, paths: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                address: str | None = None, workers: int | None = None, threads: int = 1,
                layers: Sequence[str] | None = None, top_k: int = 0, batch_size: int = 32,
                skip_bad: bool = False, shard_size: int | None = None,
                on_progress: Callable[[int], None] | None = None,
                on_skip: Callable[[str], None] | None = None) -> Summary:
    """Extract with Ray Data into the folder ``out`` (``NAME.parquet/part-NNNNN.parquet``).

    ``address``: an existing cluster (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``); default: a local Ray
    started for this call (or the one this process is already connected to). ``workers``: actors (default:
    the cluster's CPUs / ``threads``), each with one onnxruntime session of ``threads`` threads. The model,
    the images and ``out`` must be paths every node can read (and write: ``out``), e.g. a shared filesystem.
    """
    start = time.perf_counter()
    out = Path(out)
    paths = [os.fspath(p) for p in paths]
    check_output(out, Path(model_path), paths)
    if output_format(out) != "parquet":
        raise OutputError("the Ray engine writes a folder of Parquet shards: name the output NAME.parquet", str(out))
    require_pyarrow("the Ray engine")
    ray = _import_ray()
    if threads < 1 or (workers is not None and workers < 1):
        raise ValueError("workers and threads must be >= 1")
    model = CndsModel(model_path, device="cpu", threads=1)  # on the driver: metadata and checks only
    outs = feature_outputs(model, layers)
    layout = make_layout(model, outs, top_k)
    size = shard_size_for(layout, shard_size)
    plan = plan_for(model, paths, layout, size, "parquet-shards")
    if address:
        _check_reachable(address)  # before anything is written
    done = _open_folder(out, plan)
    if on_progress:
        on_progress(sum(len(paths[i * size:(i + 1) * size]) for i in done))
    todo = [{"shard": i, "paths": paths[i * size:(i + 1) * size]} for i in range(plan["shards"]) if i not in done]
    started = _connect(ray, address) if todo else False
    rates: list[float] = []
    rows = skipped = 0
    try:
        if todo:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            actors = min(workers or max(1, cpus // threads), len(todo))
            with warnings.catch_warnings():  # Ray 2.60 deprecates remote args given as keywords (max_restarts)
                warnings.simplefilter("ignore")
                results = ray.data.from_items(todo).map_batches(
                    ShardExtractor, batch_size=1, batch_format="numpy", num_cpus=threads,
                    compute=ray.data.ActorPoolStrategy(size=actors), **_no_restarts(ray.data.Dataset.map_batches),
                    fn_constructor_kwargs=dict(model=os.path.abspath(model_path), out=os.path.abspath(out),
                                               layers=list(layout.layers), top_k=layout.top_k,
                                               batch_size=batch_size, threads=threads, skip_bad=skip_bad))
            try:
                with _quiet_ray_data(ray):
                    for row in results.iter_rows():
                        if row["error"]:
                            kind, message, path = json.loads(row["error"])
                            cls = {c.__name__: c for c in (ImageError, ModelError, OutputError)}.get(kind,
                                                                                               RuntimeCndsError)
                            raise cls(message + f" (finished shards kept in {out}; rerun"
                                      f"{' with --skip-bad' if cls is ImageError else ''} to resume)", path)
                        n, bad = int(row["rows"]), json.loads(row["skipped"])
                        rows, skipped = rows + n, skipped + len(bad)
                        rates.append((n + len(bad)) / max(float(row["seconds"]), 1e-9))
                        for p in bad:
                            if on_skip:
                                on_skip(p)
                        if on_progress:
                            on_progress(n + len(bad))
            except RuntimeCndsError:
                raise
            except Exception as e:
                user = _user_error(e)
                if user is None:
                    # Ray's messages start with a coloured "ray::Actor..." header and end with the cause
                    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
                    raise RuntimeCndsError(f"the Ray job failed: {(lines[-1] if lines else type(e).__name__)[:300]}") \
                        from None
                raise user from None
    finally:
        if started:
            ray.shutdown()
    _finish_folder(out, plan)
    return Summary(out, _count_rows(out, plan), skipped, layout.layers, layout.shapes, plan["shards"], len(done),
                   time.perf_counter() - start, tuple(rates))


def _open_folder(out: Path, plan: dict) -> set[int]:
    """Create ``out/`` (or reuse it for the same plan); the shards already there."""
    manifest = out / MANIFEST
    try:
        if out.exists() and not out.is_dir():
            raise OutputError("exists and is not a folder; the Ray engine writes a folder of Parquet shards", str(out))
        if out.is_dir():
            try:
                same = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "complete"} == plan
            except (OSError, ValueError):
                same = False
            if not same:
                if any(f for f in out.iterdir() if f.name != MANIFEST and not f.name.startswith("part-")
                       and not f.name.startswith(".")):
                    raise OutputError("is a folder with other files in it; choose another --out", str(out))
                for f in out.iterdir():
                    remove_quietly(f)
        out.mkdir(parents=True, exist_ok=True)
        if not manifest.exists():
            with atomic_file(manifest) as tmp:
                tmp.write_text(json.dumps(plan, indent=1))
    except OSError as e:
        raise OutputError(f"cannot write output: {e.strerror or e}", str(out)) from None
    return {i for i in range(plan["shards"]) if (out / part_name(i)).is_file()}


def _finish_folder(out: Path, plan: dict) -> None:
    missing = [i for i in range(plan["shards"]) if not (out / part_name(i)).is_file()]
    if missing:
        raise RuntimeCndsError(f"{len(missing)} shards were not written (first: {part_name(missing[0])}); rerun "
                               "the same command to finish them", str(out))
    with atomic_file(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps({**plan, "complete": True}, indent=1))


def _count_rows(out: Path, plan: dict) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(out / part_name(i)).metadata.num_rows for i in range(plan["shards"]))
