"""What a cnds ONNX export says about itself: the ``cnds.*`` entries of the model's ``metadata_props``.

The compiler writes them (``cnds_compiler.lowering``) and the runtime reads them, so a deployed
``model.onnx`` carries everything needed to use it: class names, input size, resize/crop, mean/std,
which graph output is which layer, and the spec name, IR hash and cnds version it came from. Every
value is a JSON document (strings included), so types survive the round trip.
"""

from __future__ import annotations

import json
import math
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
        """Read the entries back and check every one the runtime relies on (types, lengths, ranges, and that
        they agree with each other); a model without them is not a cnds export. Every failure is one
        :class:`ModelError` naming the model and the entry: a model whose metadata lies is refused, never run."""
        if props.get(PREFIX + "format") != json.dumps(FORMAT):
            raise ModelError("not a cnds export (its ONNX metadata has no cnds.format entry); "
                             "export models with `cnds-compile SPEC --emit onnx`", path)
        doc: dict = {}
        for key, text in props.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX):]
            if not isinstance(text, str) or len(text) > MAX_ENTRY_CHARS:
                raise _bad(name, f"is not a JSON text of at most {MAX_ENTRY_CHARS:,} characters", path)
            if _nesting_exceeds(text, MAX_ENTRY_NESTING):  # before json.loads, which recurses
                raise _bad(name, f"nests more than {MAX_ENTRY_NESTING} levels deep", path)
            try:
                doc[name] = json.loads(text)
            except ValueError as e:  # JSONDecodeError, or a number with too many digits
                raise _bad(name, f"is not valid JSON ({e})", path) from None
        read = _Reader(doc, path)
        version = read.integer("format_version", 1)
        if version > FORMAT_VERSION:
            raise ModelError(f"cnds export format {version} is newer than this runtime "
                             f"understands ({FORMAT_VERSION}); upgrade cnds", path)
        input_shape = read.dims("input_shape", 3, MAX_DIM)
        channels = input_shape[0]
        num_classes = read.integer("num_classes", 1, MAX_DIM)
        class_names = read.strings("class_names")
        if class_names and len(class_names) != num_classes:
            raise _bad("class_names", f"has {len(class_names)} names for {num_classes} classes", path)
        if len(set(class_names)) != len(class_names):
            raise _bad("class_names", "names a class twice", path)
        crop = doc.get("crop")
        if crop is not None and crop != list(input_shape[1:]):
            raise _bad("crop", f"is {crop!r}, not the input's height and width {list(input_shape[1:])}", path)
        mean = read.numbers("mean", channels)
        std = read.numbers("std", channels)
        if any(v == 0 for v in std):
            raise _bad("std", "has a zero (images would be divided by it)", path)
        outputs = read.outputs(num_classes)
        known = {"format", "format_version", "spec_name", "ir_hash", "version", "input_name", "input_shape",
                 "resize", "crop", "mean", "std", "num_classes", "class_names", "outputs", "precision",
                 "weights"}
        try:
            return cls(
                spec_name=read.text("spec_name"),
                ir_hash=read.text("ir_hash"),
                cnds_version=read.text("version"),
                input_name=read.text("input_name", nonempty=True),
                input_shape=input_shape,
                num_classes=num_classes,
                class_names=class_names,
                outputs=outputs,
                resize=read.resize("resize"),
                mean=mean,
                std=std,
                precision=read.text("precision", default="fp32"),
                weights=read.text("weights", default=""),
                extra={PREFIX + k: props[PREFIX + k] for k in doc if k not in known},
            )
        except ValueError as e:  # __post_init__'s own invariants
            raise ModelError(f"inconsistent cnds metadata ({e})", path) from None


MAX_DIM = 1 << 20
"""Largest size, channel or class count accepted from metadata (the compiler allows 65,536 pixels a side)."""
MAX_ENTRY_CHARS = 1 << 24
"""Largest ``cnds.*`` entry read (class names of a 100k-class model take a few MiB)."""
MAX_ENTRY_NESTING = 8
"""Deepest nesting of arrays and objects in an entry (``outputs`` nests 3 deep)."""


def _bad(name: str, problem: str, path: str | None) -> ModelError:
    return ModelError(f"inconsistent cnds metadata: cnds.{name} {problem}", path)


def _nesting_exceeds(text: str, limit: int) -> bool:
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Missing:
    pass


REQUIRED_ENTRY = _Missing()


class _Reader:
    """Typed access to the decoded entries; each accessor names the entry in its error."""

    def __init__(self, doc: dict, path: str | None) -> None:
        self.doc, self.path = doc, path

    def _get(self, name: str, default=REQUIRED_ENTRY):
        if name in self.doc:
            return self.doc[name]
        if default is REQUIRED_ENTRY:
            raise _bad(name, "is missing", self.path)
        return default

    def text(self, name: str, *, default=REQUIRED_ENTRY, nonempty: bool = False) -> str:
        value = self._get(name, default)
        if not isinstance(value, str) or (nonempty and not value):
            raise _bad(name, f"must be a{' non-empty' if nonempty else ''} string, not {_show(value)}", self.path)
        return value

    def integer(self, name: str, lo: int, hi: int | None = None) -> int:
        value = self._get(name)
        if not _is_int(value) or value < lo or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"in {lo}..{hi:,}"
            raise _bad(name, f"must be an integer {bounds}, not {_show(value)}", self.path)
        return value

    def dims(self, name: str, length: int, hi: int) -> tuple[int, ...]:
        value = self._get(name)
        if (not isinstance(value, list) or len(value) != length
                or not all(_is_int(d) and 1 <= d <= hi for d in value)):
            raise _bad(name, f"must be {length} integers in 1..{hi:,}, not {_show(value)}", self.path)
        return tuple(value)

    def strings(self, name: str) -> tuple[str, ...]:
        value = self._get(name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(name, f"must be a list of strings, not {_show(value)}", self.path)
        return tuple(value)

    def numbers(self, name: str, channels: int) -> tuple[float, ...]:
        value = self._get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise _bad(name, f"must be a list of numbers, not {_show(value)}", self.path)
        if len(value) not in (0, channels):
            raise _bad(name, f"has {len(value)} values for a {channels}-channel input", self.path)
        try:
            floats = tuple(float(v) for v in value)
        except OverflowError:
            floats = (math.inf,)
        if not all(math.isfinite(v) for v in floats):
            raise _bad(name, "has a value that is not a finite number", self.path)
        return floats

    def resize(self, name: str) -> tuple[int, int] | int | None:
        value = self._get(name, None)
        if value is None or value == []:
            return None
        if _is_int(value) and 1 <= value <= MAX_DIM:
            return value
        if isinstance(value, list) and len(value) in (1, 2) and all(_is_int(d) and 1 <= d <= MAX_DIM for d in value):
            return value[0] if len(value) == 1 else (value[0], value[1])
        raise _bad(name, f"must be [H, W], S or [S] with sizes in 1..{MAX_DIM:,}, not {_show(value)}", self.path)

    def outputs(self, num_classes: int) -> tuple[OutputInfo, ...]:
        value = self._get("outputs")
        if not isinstance(value, list):
            raise _bad("outputs", f"must be a list, not {_show(value)}", self.path)
        outputs = []
        for i, o in enumerate(value):
            if (not isinstance(o, dict) or not isinstance(o.get("name"), str) or not o["name"]
                    or not isinstance(o.get("layer"), str) or not isinstance(o.get("shape"), list)
                    or not 1 <= len(o["shape"]) <= 3 or not all(_is_int(d) and 1 <= d <= MAX_DIM for d in o["shape"])):
                raise _bad("outputs", f"entry {i} must be {{name, layer, shape: 1-3 sizes}}, not {_show(o)}",
                           self.path)
            outputs.append(OutputInfo(o["name"], o["layer"], tuple(o["shape"])))
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise _bad("outputs", "names an output twice", self.path)
        for o in outputs:
            if o.name == LOGITS and o.shape != (num_classes,):
                raise _bad("outputs", f"gives logits of shape {list(o.shape)}, but cnds.num_classes is {num_classes}",
                           self.path)
        return tuple(outputs)


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, _Missing) else "nothing"
    return text if len(text) <= 60 else text[:57] + "..."
