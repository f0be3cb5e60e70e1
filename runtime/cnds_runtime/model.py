"""Load a cnds ONNX export and run it: :class:`CndsModel`, :class:`FeatureExtractor`, :class:`Classifier`.

Images may be paths, PIL images or arrays (one, a list, or an ``N x H x W [x C]`` array); each is
prepared by the model's own :class:`~cnds_runtime.preprocess.Preprocessor`, read from the ONNX metadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageError, ModelError
from .metadata import ModelMetadata, OutputInfo
from .pipeline import BatchLoader
from .preprocess import ImageLike, Preprocessor
from .providers import CPU, choose_providers


def _as_items(images) -> list:
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        # N x H x W x C is a batch; H x W x C (C in 1, 3, 4) is one image; any other 3-D array is a
        # batch of N grey H x W images (e.g. Fashion-MNIST's N x 28 x 28).
        batch = images.ndim == 4 or (images.ndim == 3 and images.shape[-1] not in (1, 3, 4))
        return list(images) if batch else [images]
    return list(images)


def _check_shape(entry: str, per_example: tuple[int, ...], graph_shape, path: Path) -> None:
    """The metadata's per-example shape against the graph's ``(N, ...)`` shape, where the graph fixes it
    (a named or unknown dimension is taken as agreeing)."""
    dims = list(graph_shape or [])[1:]
    if len(dims) != len(per_example) or any(
            isinstance(g, int) and m != g for m, g in zip(per_example, dims, strict=True)):
        raise ModelError(f"inconsistent cnds metadata: cnds.{entry} says {list(per_example)} per example, but the "
                         f"graph's shape is {list(graph_shape or [])}", str(path))


class CndsModel:
    """A cnds ONNX export in an onnxruntime session, with the metadata it carries.

    Args:
        path: the ``.onnx`` file written by ``cnds-compile --emit onnx``.
        device: ``"auto"`` (CUDA when a GPU is usable, else CPU), ``"cpu"`` or ``"cuda"``.
        threads: intra-op threads for the CPU provider (default: onnxruntime's choice).
        spinning: let idle onnxruntime threads spin (onnxruntime's default). Turn it off when other work
            (image loaders) shares the cores, so waiting threads yield them.
    Raises:
        ModelError: the file is missing, is not ONNX, or is not a cnds export.
    """

    def __init__(self, path: str | os.PathLike, *, device: str = "auto", threads: int | None = None,
                 spinning: bool = True) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError("no such model file" if not self.path.exists() else "not a file", str(self.path))
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no per-node placement warnings
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=choose_providers(device))
        except ModelError:
            raise
        except Exception as e:  # onnxruntime raises its own pybind classes (InvalidProtobuf, Fail, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise ModelError(f"not an ONNX model onnxruntime can load ({first[:200]})", str(self.path)) from None
        self.metadata = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != [self.metadata.input_name]:
            raise ModelError(f"graph inputs {inputs} do not match the metadata's input "
                             f"'{self.metadata.input_name}'", str(self.path))
        graph_outputs = {o.name: o.shape for o in self.session.get_outputs()}
        missing = [o.name for o in self.metadata.outputs if o.name not in graph_outputs]
        if missing:
            raise ModelError(f"metadata names outputs {missing} the graph does not have", str(self.path))
        _check_shape("input_shape", self.metadata.input_shape, self.session.get_inputs()[0].shape, self.path)
        for o in self.metadata.outputs:
            _check_shape(f"outputs '{o.name}'", o.shape, graph_outputs[o.name], self.path)
        c = self.metadata.input_shape[0]
        self.preprocess = Preprocessor.from_metadata(self.metadata) if c in (1, 3) else None

    @property
    def providers(self) -> list[str]:
        """The providers the session really uses (``CPUExecutionProvider`` last)."""
        return self.session.get_providers()

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] != CPU

    @property
    def outputs(self) -> tuple[OutputInfo, ...]:
        return self.metadata.outputs

    def output(self, name: str) -> OutputInfo:
        """The output for a layer or output name (``fc7``, ``logits``); :class:`ModelError` if absent."""
        try:
            return self.metadata.output(name)
        except KeyError:
            have = ", ".join(o.name for o in self.outputs)
            raise ModelError(f"this export has no output '{name}' (it has: {have}); re-export with "
                             f"`cnds-compile SPEC --emit onnx --features {name}`", str(self.path)) from None

    def run(self, batch: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run prepared input ``(N, C, H, W)`` float32; returns output name → ``(N, ...)`` array."""
        batch = np.asarray(batch, dtype=np.float32)
        want = tuple(self.metadata.input_shape)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != want:
            raise ModelError(f"input must be (N, {', '.join(map(str, want))}); got {tuple(batch.shape)}",
                             str(self.path))
        names = [self.output(n).name for n in outputs] if outputs else [o.name for o in self.outputs]
        if batch.shape[0] == 0:
            return {n: np.zeros((0, *self.output(n).shape), np.float32) for n in names}
        try:
            values = self.session.run(names, {self.metadata.input_name: np.ascontiguousarray(batch)})
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise ModelError(f"onnxruntime failed: {first[:300]}", str(self.path)) from None
        return dict(zip(names, values, strict=True))

    def iter_batches(
        self, images, outputs: Sequence[str] | None = None, *, batch_size: int = 32, skip_bad: bool = False,
        workers: int = 0, loader: str = "threads",
    ) -> Iterator[Batch]:
        """Prepare and run ``images`` in batches; unreadable ones raise :class:`ImageError` or, with
        ``skip_bad``, are listed in :attr:`Batch.skipped`. ``workers`` > 0 prepares the next batches on that
        many ``loader`` threads or processes while the model runs (:mod:`cnds_runtime.pipeline`)."""
        if self.preprocess is None:
            raise ModelError(f"a {self.metadata.input_shape[0]}-channel model takes prepared arrays only "
                             "(use CndsModel.run)", str(self.path))
        load = BatchLoader(self.preprocess, batch_size=batch_size, workers=workers, loader=loader,
                           skip_bad=skip_bad)
        for prepared in load(_as_items(images)):
            yield Batch(prepared.items, self.run(prepared.array, outputs), prepared.skipped)

    def __repr__(self) -> str:
        md = self.metadata
        outs = ", ".join(f"{o.name} {'x'.join(map(str, o.shape))}" for o in md.outputs)
        return (f"CndsModel({md.spec_name}, input {'x'.join(map(str, md.input_shape))}, outputs [{outs}], "
                f"{md.precision}, {self.providers[0]})")


@dataclass
class Batch:
    """One batch of results."""

    items: list
    """The inputs that were run, in order (paths, images or arrays as given)."""
    outputs: dict[str, np.ndarray]
    skipped: list[tuple[object, ImageError]] = field(default_factory=list)


def load(path: str | os.PathLike, **kwargs) -> CndsModel:
    """Shorthand for :class:`CndsModel`."""
    return CndsModel(path, **kwargs)


def _model(model, kwargs) -> CndsModel:
    return model if isinstance(model, CndsModel) else CndsModel(model, **kwargs)


class FeatureExtractor:
    """Features of one layer for many images.

    Args:
        model: a path or a :class:`CndsModel`.
        layer: the feature output (``fc7``, ``pool5``); default: the export's only non-logits output.
        **kwargs: passed to :class:`CndsModel` (``device``, ``threads``).

    Example::

        fx = FeatureExtractor("fc7.onnx", layer="fc7")
        feats = fx(["a.jpg", "b.png"])          # (2, 4096) float32
    """

    def __init__(self, model, layer: str | None = None, **kwargs) -> None:
        self.model = _model(model, kwargs)
        if layer is None:
            features = [o for o in self.model.outputs if o.name != "logits"] or list(self.model.outputs)
            if len(features) != 1:
                names = ", ".join(o.name for o in self.model.outputs)
                raise ModelError(f"this export has several outputs ({names}); choose one (--layer, or layer=)",
                                 str(self.model.path))
            layer = features[0].name
        self.output = self.model.output(layer)

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-image feature shape."""
        return self.output.shape

    def iter_batches(self, images, *, batch_size: int = 32, skip_bad: bool = False, workers: int = 0,
                     loader: str = "threads") -> Iterator[Batch]:
        return self.model.iter_batches(images, [self.output.name], batch_size=batch_size, skip_bad=skip_bad,
                                       workers=workers, loader=loader)

    def __call__(self, images: ImageLike | Iterable[ImageLike], *, batch_size: int = 32,
                 workers: int = 0) -> np.ndarray:
        """``(N, *shape)`` float32 features, in input order (``workers``: loader threads, 0 = none)."""
        parts = [b.outputs[self.output.name] for b in self.iter_batches(images, batch_size=batch_size,
                                                                         workers=workers)]
        return np.concatenate(parts) if parts else np.zeros((0, *self.shape), np.float32)


@dataclass(frozen=True, slots=True)
class Prediction:
    """Top-k classes of one image, best first."""

    indices: tuple[int, ...]
    labels: tuple[str, ...]
    scores: tuple[float, ...]
    """Softmax probabilities."""

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def score(self) -> float:
        return self.scores[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Classifier:
    """Class predictions with the class names stored in the export.

    Example::

        clf = Classifier("model.onnx")
        for p in clf.predict(["a.jpg"], top_k=3):
            print(p.label, p.score)
    """

    def __init__(self, model, **kwargs) -> None:
        self.model = _model(model, kwargs)
        if self.model.metadata.logits_output is None:
            feats = ", ".join(o.name for o in self.model.outputs)
            raise ModelError(f"this export has no logits output, only features ({feats}); re-export "
                             f"without --features or with --features {feats},logits", str(self.model.path))

    @property
    def class_names(self) -> tuple[str, ...]:
        md = self.model.metadata
        return tuple(md.class_name(i) for i in range(md.num_classes))

    def iter_batches(self, images, *, batch_size: int = 32, skip_bad: bool = False) -> Iterator[Batch]:
        return self.model.iter_batches(images, ["logits"], batch_size=batch_size, skip_bad=skip_bad)

    def probabilities(self, images, *, batch_size: int = 32) -> np.ndarray:
        """``(N, classes)`` softmax probabilities."""
        parts = [softmax(b.outputs["logits"]) for b in self.iter_batches(images, batch_size=batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.model.metadata.num_classes), np.float32)

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[Prediction]:
        """Predictions from a ``(N, classes)`` probability array."""
        k = max(1, min(k, probs.shape[-1]))
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        names = self.class_names
        return [Prediction(tuple(int(i) for i in row), tuple(names[i] for i in row),
                           tuple(float(p[i]) for i in row)) for p, row in zip(probs, order, strict=True)]

    def predict(self, images, *, top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
        """Top-``k`` predictions per image, in input order."""
        return self.top_k(self.probabilities(images, batch_size=batch_size), top_k)
