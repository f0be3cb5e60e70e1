"""``cnds-extract`` and ``cnds-predict``: thin CLIs over :mod:`cnds_runtime.model`.

User errors (a missing model, a file that is not a cnds export, an unreadable image) print one line,
``cnds-extract: error: PATH: message``, and exit with code 1; tracebacks only with ``--traceback``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .errors import ModelError, RuntimeCndsError
from .model import Batch, Classifier, CndsModel, FeatureExtractor, softmax
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


class _CLI:
    prog = ""

    def __init__(self, args: list[str] | None = None) -> None:
        self.parser = self._make_parser()
        self.args = self.parser.parse_args(args)
        if self.args.batch_size < 1:
            self.parser.error("--batch-size must be >= 1")

    def run(self) -> int:
        try:
            return self._run()
        except RuntimeCndsError as e:
            if self.args.traceback:
                raise
            print(f"{self.prog}: error: {e}", file=sys.stderr)
            return 1
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
            description="Extract one layer's features from images with a cnds ONNX export. Writes an .npz "
            "with 'features' (N x ...), 'paths' (the images, in the same order) and 'layer'.",
        )
        p.add_argument("model", help="a .onnx file written by `cnds-compile SPEC --emit onnx`")
        p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
        p.add_argument("--layer", help="feature output to save (default: the export's only feature output)")
        p.add_argument("-o", "--out", default="features.npz", help="output .npz (default: features.npz)")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on stderr (default: when stderr is a terminal)")
        _common(p)
        return p

    def _run(self) -> int:
        a = self.args
        model = CndsModel(a.model, device=a.device, threads=a.threads)
        extractor = FeatureExtractor(model, a.layer)
        paths = self._images()
        progress = Progress(len(paths), f"{extractor.output.name}", a.progress)
        feats, kept, skipped = [], [], 0
        try:
            for batch in extractor.iter_batches(paths, batch_size=a.batch_size, skip_bad=a.skip_bad):
                feats.append(batch.outputs[extractor.output.name])
                kept.extend(os.fspath(p) for p in batch.items)
                skipped += len(batch.skipped)
                progress.update(len(batch.items) + len(batch.skipped))
                self._report_skipped(batch)
        finally:
            progress.close()
        features = np.concatenate(feats) if feats else np.zeros((0, *extractor.shape), np.float32)
        out = Path(a.out)
        buf = io.BytesIO()
        np.savez(buf, features=features, paths=np.array(kept, dtype=str), layer=np.array(extractor.output.layer),
                 spec=np.array(model.metadata.spec_name), ir_hash=np.array(model.metadata.ir_hash))
        _write_atomic(out, buf.getvalue())
        shape = "x".join(map(str, extractor.shape))
        note = f", skipped {skipped} unreadable" if skipped else ""
        print(f"wrote {out}: {len(kept)} images x {extractor.output.layer} ({shape}){note}")
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
                    print(f"{os.fspath(path)}: {tops}")
        return 0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise RuntimeCndsError(f"cannot write output: {e.strerror or e}", str(path)) from None


def extract_main(argv: list[str] | None = None) -> int:
    return ExtractCLI(argv).run()


def predict_main(argv: list[str] | None = None) -> int:
    return PredictCLI(argv).run()


__all__ = ["ExtractCLI", "ModelError", "PredictCLI", "extract_main", "predict_main"]


def _remove_quietly(path) -> None:
    """Remove a temp file if it exists; an unwritable folder must not turn into a second error."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
