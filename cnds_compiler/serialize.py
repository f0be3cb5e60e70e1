"""IR ⇄ JSON. The document follows ``schema/ir-v1.json``; reading it back yields an identical IR.

Spans are stored as (file index, start, end) into the ``sources`` table, which holds the text of every
spec file the network came from, so errors raised on a reloaded IR still point at spec lines.
"""

from __future__ import annotations

import json
from dataclasses import fields
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import IRFormatError
from .ir import (
    ATTRS_OF_KIND,
    IR_VERSION,
    Branch,
    DataConfig,
    InitScheme,
    Layer,
    LossKind,
    LrPolicy,
    Network,
    Op,
    OpKind,
    ParamInit,
    ScheduleKind,
    Shape,
    TrainConfig,
    WeightSchedule,
)
from .source import Source, Span

SCHEMA_ID = f"https://cnds.dev/schema/ir-v{IR_VERSION}.json"


@cache
def schema() -> dict:
    """The JSON Schema of the serialised IR shipped with the package."""
    text = resources.files("cnds_compiler.schema").joinpath(f"ir-v{IR_VERSION}.json").read_text()
    return json.loads(text)


# ---- to JSON ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Dataclass/enum/tuple → JSON-ready value (field by field, no spans)."""
    if isinstance(value, (InitScheme, OpKind, LossKind, ScheduleKind)):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return value


class _Writer:
    def __init__(self, include_spans: bool, sources: list[tuple[str, str]]) -> None:
        self.include_spans = include_spans
        self.index = {src: i for i, src in enumerate(sources)}

    def span(self, span: Span) -> list[int] | None:
        if not self.include_spans:
            return None
        key = (span.source.name, span.source.text)
        if key not in self.index:
            self.index[key] = len(self.index)
        return [self.index[key], span.start, span.end]

    def op(self, op: Op) -> dict:
        doc = {"name": op.name, "kind": op.kind.value, "attrs": _plain(op.attrs)}
        for key in ("in_shape", "out_shape"):
            shape = getattr(op, key)
            doc[key] = list(shape.dims) if shape else None
        doc["params"], doc["flops"] = op.params, op.flops
        if self.include_spans:
            doc["span"] = self.span(op.span)
        return doc

    def layer(self, layer: Layer) -> dict:
        doc = {"name": layer.name, "ops": [self.op(op) for op in layer.ops]}
        if self.include_spans:
            doc["span"] = self.span(layer.span)
        return doc

    def branch(self, b: Branch) -> dict:
        doc = {
            "name": b.name,
            "tap": b.tap,
            "loss": b.loss.value,
            "schedule": _plain(b.schedule),
            "layers": [self.layer(layer) for layer in b.layers],
        }
        if self.include_spans:
            doc["span"] = self.span(b.span)
        return doc


def to_json_dict(net: Network, *, include_sources: bool = True, include_spans: bool = True) -> dict:
    w = _Writer(include_spans, list(net.sources))
    doc: dict[str, Any] = {
        "$schema": SCHEMA_ID,
        "ir_version": IR_VERSION,
        "name": net.name,
        "input": list(net.input.dims),
        "num_classes": net.num_classes,
        "class_names": list(net.class_names),
        "trunk": [w.layer(layer) for layer in net.trunk],
        "branches": [w.branch(b) for b in net.branches],
        "train": _plain(net.train),
        "data": _plain(net.data),
    }
    if include_spans:
        doc["span"] = w.span(net.span)
    if include_sources:
        ordered = sorted(w.index.items(), key=lambda kv: kv[1])
        doc["sources"] = [{"name": name, "text": text} for (name, text), _ in ordered]
    return doc


def dumps(net: Network) -> str:
    return json.dumps(to_json_dict(net), indent=1) + "\n"


# ---- from JSON ----------------------------------------------------------------------------------


def validate(doc: Any, name: str = "<ir>") -> None:
    """Check ``doc`` against the schema; report every violation with its JSON path."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{e.json_path}: {e.message}" for e in errors[:20]]
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        raise IRFormatError(
            f"{len(errors)} schema violation(s){more}: " + "; ".join(lines), path=name
        )


class _Reader:
    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources

    def span(self, raw: list[int]) -> Span:
        i, start, end = raw
        return Span(self.sources[i], start, end)

    def op(self, d: dict) -> Op:
        kind = OpKind(d["kind"])
        attrs_type = ATTRS_OF_KIND[kind]
        attrs_doc = dict(d["attrs"])
        for key, value in attrs_doc.items():
            if key == "init":
                attrs_doc[key] = ParamInit(InitScheme(value["scheme"]), value["std"], value["bias"])
            elif isinstance(value, list):
                attrs_doc[key] = tuple(value)
        return Op(
            name=d["name"],
            kind=kind,
            attrs=attrs_type(**attrs_doc),
            span=self.span(d["span"]),
            in_shape=Shape(tuple(d["in_shape"])) if d.get("in_shape") else None,
            out_shape=Shape(tuple(d["out_shape"])) if d.get("out_shape") else None,
            params=d.get("params"),
            flops=d.get("flops"),
        )

    def layer(self, d: dict) -> Layer:
        return Layer(d["name"], tuple(self.op(o) for o in d["ops"]), self.span(d["span"]))

    def branch(self, d: dict) -> Branch:
        s = d["schedule"]
        return Branch(
            name=d["name"],
            tap=d["tap"],
            loss=LossKind(d["loss"]),
            schedule=WeightSchedule(ScheduleKind(s["kind"]), s["alpha0"], tuple(s["values"])),
            layers=tuple(self.layer(x) for x in d["layers"]),
            span=self.span(d["span"]),
        )


def from_json_dict(doc: Any, name: str = "<ir>") -> Network:
    validate(doc, name)
    sources = [Source(s["name"], s["text"]) for s in doc["sources"]]
    r = _Reader(sources)
    try:
        t = dict(doc["train"])
        p = t.pop("lr_policy")
        train = TrainConfig(lr_policy=LrPolicy(p["kind"], p["gamma"], p["every"], tuple(p["milestones"]), p["power"]), **t)
        dd = doc["data"]
        data = DataConfig(
            resize=tuple(dd["resize"]) if dd["resize"] else None,
            mean=tuple(dd["mean"]),
            std=tuple(dd["std"]),
            mirror=dd["mirror"],
        )
        return Network(
            name=doc["name"],
            input=Shape(tuple(doc["input"])),
            num_classes=doc["num_classes"],
            class_names=tuple(doc["class_names"]),
            trunk=tuple(r.layer(x) for x in doc["trunk"]),
            branches=tuple(r.branch(x) for x in doc["branches"]),
            train=train,
            data=data,
            span=r.span(doc["span"]),
            sources=tuple((s.name, s.text) for s in sources),
        )
    except (ValueError, TypeError, IndexError, KeyError) as e:
        # The schema fixes the form; node invariants (e.g. a span outside its source) are checked here.
        raise IRFormatError(f"inconsistent IR: {e}", path=name) from None


def loads(text: str, name: str = "<ir>") -> Network:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise IRFormatError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}", path=name) from None
    return from_json_dict(doc, name)


def read_ir(path: str | Path) -> Network:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise IRFormatError(f"cannot read IR file ({e.strerror or e})", path=str(path)) from None
    return loads(text, str(path))
