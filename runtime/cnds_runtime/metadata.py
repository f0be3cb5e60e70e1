"""What a cnds ONNX export says about itself: the ``cnds.*`` entries of the model's ``metadata_props``.

The compiler writes them (``cnds_compiler.lowering``) and the runtime reads them, so a deployed
``model.onnx`` carries everything needed to use it: class names, input size, resize/crop, mean/std,
which graph output is which layer, and the spec name, IR hash and cnds version it came from. Every
value is a JSON document (strings included), so types survive the round trip.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ModelError

FORMAT = "cnds-onnx"
FORMAT_VERSION = 1
PREFIX = "cnds."
LOGITS = "logits"
"""Name of the graph output that holds the classifier's logits."""


@dataclass(frozen=True, slots=True)
class OutputInfo:
    """One graph output."""

    name: str
    """Graph output name (``logits`` for the classifier, else the layer name)."""
    layer: str
    """Trunk layer of the spec whose output it is."""
    shape: tuple[int, ...]
    """Per-example shape: ``(C, H, W)`` or ``(N,)``."""


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """Everything a deployed model needs besides its graph."""

    spec_name: str
    ir_hash: str
    """``Network.digest()`` of the spec's IR (the training network, as in its checkpoints)."""
    cnds_version: str
    input_name: str
    input_shape: tuple[int, int, int]
    """``(C, H, W)``; images are centre-cropped to ``H x W``."""
    num_classes: int
    class_names: tuple[str, ...]
    """Empty when the spec gave only a class count."""
    outputs: tuple[OutputInfo, ...]
    resize: tuple[int, int] | int | None = None
    """Resize to ``(H, W)`` before the centre crop; a single number resizes the shorter side to it, keeping the
    aspect ratio (torchvision's ``Resize(int)``); ``None`` keeps the image's size."""
    mean: tuple[float, ...] = ()
    """Per-channel mean on [0, 1] pixels (empty: 0)."""
    std: tuple[float, ...] = ()
    """Per-channel std on [0, 1] pixels (empty: 1)."""
    precision: str = "fp32"
    weights: str = ""
    """Where the weights came from (checkpoint file name, or the seeded initialisation)."""
    extra: Mapping[str, str] = field(default_factory=dict)
    """Other ``cnds.*`` entries, kept verbatim."""

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3:
            raise ValueError("input_shape must be (C, H, W)")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError("class names do not match the class count")

    @property
    def crop(self) -> tuple[int, int]:
        return self.input_shape[1], self.input_shape[2]

    @property
    def logits_output(self) -> OutputInfo | None:
        for out in self.outputs:
            if out.name == LOGITS:
                return out
        return None

    def output(self, name: str) -> OutputInfo:
        """The output called ``name`` (graph output name or layer name)."""
        for out in self.outputs:
            if name in (out.name, out.layer):
                return out
        raise KeyError(name)

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries (key → JSON text)."""
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spec_name": self.spec_name,
            "ir_hash": self.ir_hash,
            "version": self.cnds_version,
            "input_name": self.input_name,
            "input_shape": list(self.input_shape),
            "resize": self.resize if isinstance(self.resize, int) else list(self.resize) if self.resize else None,
            "crop": list(self.crop),
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "outputs": [{"name": o.name, "layer": o.layer, "shape": list(o.shape)} for o in self.outputs],
            "precision": self.precision,
            "weights": self.weights,
        }
        props = {PREFIX + k: json.dumps(v) for k, v in doc.items()}
        props.update({k: v for k, v in self.extra.items() if k not in props})
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str], path: str | None = None) -> ModelMetadata:
        """Read the entries back; a model without them is not a cnds export (:class:`ModelError`)."""
        if props.get(PREFIX + "format") != json.dumps(FORMAT):
            raise ModelError("not a cnds export (its ONNX metadata has no cnds.format entry); "
                             "export models with `cnds-compile SPEC --emit onnx`", path)
        try:
            doc = {k[len(PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(PREFIX)}
            if doc["format_version"] > FORMAT_VERSION:
                raise ModelError(f"cnds export format {doc['format_version']} is newer than this runtime "
                                 f"understands ({FORMAT_VERSION}); upgrade cnds", path)
            known = {"format", "format_version", "spec_name", "ir_hash", "version", "input_name", "input_shape",
                     "resize", "crop", "mean", "std", "num_classes", "class_names", "outputs", "precision",
                     "weights"}
            return cls(
                spec_name=str(doc["spec_name"]),
                ir_hash=str(doc["ir_hash"]),
                cnds_version=str(doc["version"]),
                input_name=str(doc["input_name"]),
                input_shape=tuple(int(d) for d in doc["input_shape"]),
                num_classes=int(doc["num_classes"]),
                class_names=tuple(str(c) for c in doc["class_names"]),
                outputs=tuple(OutputInfo(str(o["name"]), str(o["layer"]), tuple(int(d) for d in o["shape"]))
                              for o in doc["outputs"]),
                resize=_resize(doc.get("resize")),
                mean=tuple(float(m) for m in doc.get("mean", ())),
                std=tuple(float(s) for s in doc.get("std", ())),
                precision=str(doc.get("precision", "fp32")),
                weights=str(doc.get("weights", "")),
                extra={PREFIX + k: props[PREFIX + k] for k in doc if k not in known},
            )
        except ModelError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"malformed cnds metadata ({e.__class__.__name__}: {e})", path) from None


def _resize(value) -> tuple[int, int] | int | None:
    """``[H, W]`` → a fixed size; ``S`` or ``[S]`` → the shorter side; null → none."""
    if value is None or value == []:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and len(value) == 1:
        return int(value[0])
    if isinstance(value, list) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"resize must be [H, W], S or [S], not {value!r}")
