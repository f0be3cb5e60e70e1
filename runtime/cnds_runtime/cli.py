"""``cnds-extract`` and ``cnds-predict``: thin CLIs over :mod:`cnds_runtime.model`.

User errors (a missing model, a file that is not a cnds export, an unreadable image) print one line,
``cnds-extract: error: PATH: message``, and exit with code 1; tracebacks only with ``--traceback``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from .errors import ImageError, ModelError, RuntimeCndsError, end_on_output_error
from .extract import extract_local, extract_ray
from .model import Batch, Classifier, CndsModel, softmax
from .output import PARTS_SUFFIX
from .pipeline import default_workers
from .preprocess import expand_paths


class Progress:
    """A one-line progress bar on stderr (drawn only on a terminal unless forced)."""

    def __init__(self, total: int, label: str, enabled: bool | None = None, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.label, self.done, self.start, self.last = total, label, 0, time.perf_counter(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.1 or self.done >= self.total):
            self.last = now
            frac = self.done / self.total if self.total else 1.0
            bar = "#" * int(frac * 30)
            rate = self.done / max(now - self.start, 1e-9)
            self.stream.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} {rate:6.1f} img/s")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime call (default 32)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed on stderr) "
                   "instead of stopping at the first")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when a GPU is usable, else CPU (default)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: onnxruntime's choice)")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")


MAX_THREADS = 1024
"""The most intra-op threads a command asks onnxruntime for (more cores than any one machine here has)."""


class _CLI:
    prog = ""

    def __init__(self, args: list[str] | None = None) -> None:
        self.parser = self._make_parser()
        self.args = self.parser.parse_args(args)
        if self.args.batch_size < 1:
            self.parser.error("--batch-size must be >= 1")
        if self.args.threads is not None and not 1 <= self.args.threads <= MAX_THREADS:
            # onnxruntime starts every thread it is told to: 100,000 of them never finished starting
            self.parser.error(f"--threads must be between 1 and {MAX_THREADS}")

    def run(self) -> int:
        try:
            return self._run()
        except RuntimeCndsError as e:
            if self.args.traceback:
                raise
            print(f"{self.prog}: error: {e}", file=sys.stderr)
            return 1
        except ValueError as e:  # a library argument check (e.g. batch_size) reached from the command line
            print(f"{self.prog}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{self.prog}: interrupted", file=sys.stderr)
            return 130

    def _images(self) -> list[Path]:
        paths = expand_paths(self.args.images)
        if not paths:
            raise RuntimeCndsError(f"no image files found in {', '.join(self.args.images)}")
        return paths

    def _report_skipped(self, batch: Batch) -> None:
        for _, err in batch.skipped:
            print(f"{self.prog}: skipped {err}", file=sys.stderr)

    def _run(self) -> int:
        raise NotImplementedError


class ExtractCLI(_CLI):
    """``cnds-extract MODEL IMAGES_OR_DIR... --layer fc7 --out feats.npz``."""

    prog = "cnds-extract"

    def _make_parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            prog=self.prog,
            description="Extract features from images with a cnds ONNX export, into .npy, .npz or .parquet (by "
            "the --out extension). Written in shards: a killed run resumes where it stopped when rerun.",
        )
        p.add_argument("model", help="a .onnx file written by `cnds-compile SPEC --emit onnx`")
        p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
        p.add_argument("--layer", action="append", help="feature output(s) to save: --layer fc7, --layer fc7,pool5 "
                       "or repeated (default: the export's only feature output)")
        p.add_argument("-o", "--out", default="features.npz",
                       help="output file: .npz (default features.npz), .npy (one layer) or .parquet; with "
                       "--engine ray a folder NAME.parquet of Parquet shards")
        p.add_argument("--top-k", type=int, default=0, help="also store the k most likely classes per image "
                       "(needs an export with logits; .npz/.parquet)")
        p.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: this machine (default); ray: Ray Data actors on a local or existing cluster")
        p.add_argument("--ray-address", help="an existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto); "
                       "default: start a local Ray for this run")
        p.add_argument("--workers", type=int, default=None, help="local: image loader workers (default: "
                       "max(2, CPUs/4)); ray: actors, one onnxruntime session each (default: cluster CPUs / --threads)")
        p.add_argument("--loader", choices=("threads", "processes"), default="threads",
                       help="local: decode/resize images on threads (default; Pillow releases the GIL) or processes")
        p.add_argument("--shard-size", type=int, default=None,
                       help="images per shard, the unit written, resumed and (ray) scheduled (default: ~32 MB "
                       "of features)")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on stderr (default: when stderr is a terminal)")
        _common(p)
        return p

    def _run(self) -> int:
        a = self.args
        for name in ("top_k", "shard_size"):
            if getattr(a, name) is not None and getattr(a, name) < (0 if name == "top_k" else 1):
                self.parser.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'top_k' else 1}")
        if a.workers is not None and a.workers < (1 if a.engine == "ray" else 0):
            self.parser.error("--workers must be >= 1 with --engine ray, >= 0 locally")
        if a.ray_address and a.engine != "ray":
            self.parser.error("--ray-address needs --engine ray")
        layers = [x.strip() for item in a.layer or [] for x in item.split(",") if x.strip()] or None
        paths = self._images()
        progress = Progress(len(paths), "extract", a.progress)

        def skipped(what) -> None:
            print(f"{self.prog}: skipped {what}", file=sys.stderr)

        try:
            if a.engine == "ray":
                if a.device == "cuda":
                    self.parser.error("--engine ray runs the CPU provider on its actors; drop --device cuda")
                summary = extract_ray(a.model, paths, a.out, address=a.ray_address, workers=a.workers,
                                      threads=a.threads or 1, layers=layers, top_k=a.top_k, batch_size=a.batch_size,
                                      skip_bad=a.skip_bad, shard_size=a.shard_size, on_progress=progress.update,
                                      on_skip=skipped)
            else:
                workers = default_workers() if a.workers is None else a.workers
                model = CndsModel(a.model, device=a.device, threads=a.threads, spinning=workers == 0)
                try:
                    summary = extract_local(model, paths, a.out, layers=layers, top_k=a.top_k,
                                            batch_size=a.batch_size, workers=workers, loader=a.loader,
                                            skip_bad=a.skip_bad, shard_size=a.shard_size,
                                            on_progress=progress.update, on_skip=skipped)
                except ImageError as e:
                    parts = Path(a.out).with_name(Path(a.out).name + PARTS_SUFFIX)
                    if any(parts.glob("part-*")):
                        e.message += f" (finished shards kept in {parts}; rerun with --skip-bad to resume)"
                    raise
        finally:
            progress.close()
        layers_s = ", ".join(f"{lay} ({'x'.join(map(str, shape))})" for lay, shape in
                             zip(summary.layers, summary.shapes, strict=True))
        notes = [f"skipped {summary.skipped} unreadable"] if summary.skipped else []
        if summary.resumed:
            notes.append(f"resumed: {summary.resumed} of {summary.shards} shards were already done")
        print(f"wrote {summary.out}: {summary.images} images x {layers_s}" + (f", {', '.join(notes)}" if notes else ""))
        return 0


class PredictCLI(_CLI):
    """``cnds-predict MODEL IMAGE... --top-k 5``."""

    prog = "cnds-predict"

    def _make_parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            prog=self.prog,
            description="Classify images with a cnds ONNX export; class names come from the model's metadata.",
        )
        p.add_argument("model", help="a .onnx file written by `cnds-compile SPEC --emit onnx`")
        p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
        p.add_argument("-k", "--top-k", type=int, default=5, help="classes to show per image (default 5)")
        p.add_argument("--json", action="store_true", help="print one JSON object per image")
        _common(p)
        return p

    def _run(self) -> int:
        a = self.args
        if a.top_k < 1:
            self.parser.error("--top-k must be >= 1")
        clf = Classifier(CndsModel(a.model, device=a.device, threads=a.threads))
        for batch in clf.iter_batches(self._images(), batch_size=a.batch_size, skip_bad=a.skip_bad):
            self._report_skipped(batch)
            for path, pred in zip(batch.items, clf.top_k(softmax(batch.outputs["logits"]), a.top_k), strict=True):
                if a.json:
                    print(json.dumps({"path": os.fspath(path), "top": [
                        {"class": lab, "index": i, "prob": round(s, 6)}
                        for i, lab, s in zip(pred.indices, pred.labels, pred.scores, strict=True)]}))
                else:
                    tops = ", ".join(f"{lab} {s:.1%}" for lab, s in zip(pred.labels, pred.scores, strict=True))
                    name = os.fspath(path)
                    # a line break in a name would make one result read as two lines: quote such a name
                    print(f"{name if name.splitlines() == [name] else ascii(name)}: {tops}")
        return 0


def _interruptible(cli: type[_CLI], argv: list[str] | None) -> int:
    """Ctrl-C while the arguments are read or the model loads, as during a run: one line, exit 130. A reader
    that stops reading (``cnds-predict … | head``) ends the command quietly, as it would a Unix tool (141);
    output that cannot be written (a full disk) is one line and exit 1."""
    with contextlib.suppress(AttributeError, ValueError):  # a stdout that cannot encode a name escapes it
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        code = cli(argv).run()
        sys.stdout.flush()  # output still buffered for a pipe whose reader left fails here, not at exit
        return code
    except KeyboardInterrupt:
        print(f"{cli.prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        return end_on_output_error(cli.prog, e)


def extract_main(argv: list[str] | None = None) -> int:
    return _interruptible(ExtractCLI, argv)


def predict_main(argv: list[str] | None = None) -> int:
    return _interruptible(PredictCLI, argv)


__all__ = ["ExtractCLI", "ModelError", "PredictCLI", "extract_main", "predict_main"]

