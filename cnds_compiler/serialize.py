"""IR ⇄ JSON. Documents follow ``schema/ir-v2.json``; reading one back yields an identical IR. IR v1
documents (a trunk of layers and branches, before the graph IR) still load: :func:`graph_of_v1` maps them
to the graph a chain spec lowers to (same node names, so the same checkpoints and digests).

Spans are stored as (file index, start, end) into the ``sources`` table, which holds the text of every
spec file the network came from, so errors raised on a reloaded IR still point at spec lines.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import IRFormatError
from .ir import (
    ATTRS_OF_KIND,
    INPUT_NODE,
    IR_VERSION,
    MAIN_HEAD,
    DataConfig,
    Head,
    InitScheme,
    LossKind,
    LrPolicy,
    Network,
    NoAttrs,
    Node,
    OpKind,
    ParamInit,
    ScheduleKind,
    Shape,
    Statement,
    TrainConfig,
    WeightSchedule,
    plain_value,
)
from .source import Source, Span

SCHEMA_ID = f"https://cnds.dev/schema/ir-v{IR_VERSION}.json"
READABLE_VERSIONS = (1, 2)


@cache
def schema(version: int = IR_VERSION) -> dict:
    """The JSON Schema of serialised IR ``version`` shipped with the package."""
    text = resources.files("cnds_compiler.schema").joinpath(f"ir-v{version}.json").read_text()
    return json.loads(text)


# ---- to JSON ------------------------------------------------------------------------------------


class _Writer:
    def __init__(self, include_spans: bool, sources: list[tuple[str, str]]) -> None:
        self.include_spans = include_spans
        self.index = {src: i for i, src in enumerate(sources)}

    def span(self, span: Span) -> list[int] | None:
        key = (span.source.name, span.source.text)
        if key not in self.index:
            self.index[key] = len(self.index)
        return [self.index[key], span.start, span.end]

    def with_span(self, doc: dict, span: Span) -> dict:
        if self.include_spans:
            doc["span"] = self.span(span)
        return doc

    def node(self, n: Node) -> dict:
        return self.with_span({
            "name": n.name, "kind": n.kind.value, "attrs": plain_value(n.attrs), "inputs": list(n.inputs),
            "group": n.group, "in_shape": plain_value(n.in_shape), "out_shape": plain_value(n.out_shape),
            "params": n.params, "flops": n.flops,
        }, n.span)

    def head(self, h: Head) -> dict:
        return self.with_span({"name": h.name, "node": h.node, "tap": h.tap, "loss": h.loss.value,
                               "schedule": plain_value(h.schedule)}, h.span)

    def statement(self, st: Statement) -> dict:
        return self.with_span({"name": st.name, "output": st.output, "top": st.top}, st.span)


def to_json_dict(net: Network, *, include_sources: bool = True, include_spans: bool = True) -> dict:
    w = _Writer(include_spans, list(net.sources))
    doc: dict[str, Any] = {
        "$schema": SCHEMA_ID,
        "ir_version": IR_VERSION,
        "name": net.name,
        "input": list(net.input.dims),
        "num_classes": net.num_classes,
        "class_names": list(net.class_names),
        "nodes": [w.node(n) for n in net.nodes],
        "heads": [w.head(h) for h in net.heads],
        "statements": [w.statement(st) for st in net.statements],
        "train": plain_value(net.train),
        "data": plain_value(net.data),
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


def validate(doc: Any, name: str = "<ir>") -> int:
    """Check ``doc`` against the schema of its ``ir_version``; report every violation with its JSON path.
    Returns the version."""
    import jsonschema

    version = doc.get("ir_version") if isinstance(doc, dict) else None
    if version not in READABLE_VERSIONS:
        version = IR_VERSION  # let the current schema say what is wrong
    validator = jsonschema.Draft202012Validator(schema(version))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{e.json_path}: {e.message}" for e in errors[:20]]
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        raise IRFormatError(
            f"{len(errors)} schema violation(s){more}: " + "; ".join(lines), path=name
        )
    return version


class _Reader:
    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources

    def span(self, raw: list[int]) -> Span:
        i, start, end = raw
        return Span(self.sources[i], start, end)

    def node(self, d: dict, inputs: tuple[str, ...] | None = None, group: str | None = None,
             name: str | None = None) -> Node:
        kind = OpKind(d["kind"])
        attrs_doc = dict(d["attrs"])
        for key, value in attrs_doc.items():
            if key == "init":
                attrs_doc[key] = ParamInit(InitScheme(value["scheme"]), value["std"], value["bias"])
            elif isinstance(value, list):
                attrs_doc[key] = tuple(value)
        return Node(
            name=d["name"] if name is None else name,
            kind=kind,
            attrs=ATTRS_OF_KIND[kind](**attrs_doc),
            inputs=tuple(d["inputs"]) if inputs is None else inputs,
            span=self.span(d["span"]),
            group=d["group"] if group is None else group,
            in_shape=Shape(tuple(d["in_shape"])) if d.get("in_shape") else None,
            out_shape=Shape(tuple(d["out_shape"])) if d.get("out_shape") else None,
            params=d.get("params"),
            flops=d.get("flops"),
        )

    @staticmethod
    def schedule(s: dict) -> WeightSchedule:
        return WeightSchedule(ScheduleKind(s["kind"]), s["alpha0"], tuple(s["values"]))

    def head(self, d: dict) -> Head:
        return Head(d["name"], d["node"], LossKind(d["loss"]), self.schedule(d["schedule"]), self.span(d["span"]),
                    d["tap"])

    def statement(self, d: dict) -> Statement:
        return Statement(d["name"], d["output"], self.span(d["span"]), d["top"])


def graph_of_v1(doc: dict, r: _Reader, net_span: Span, input_shape: Shape):
    """Nodes, heads and statements of an IR v1 document: the graph its chain spec lowers to today.

    Each layer's ops are chained, each layer reads the previous one (the first reads the input), and a
    branch's layer ``L`` on tap ``T`` becomes the nodes ``T.L...``: the names, module paths and state-dict
    keys (``aux.T.L``) that v1 used, so v1 checkpoints load unchanged.
    """
    nodes = [Node(INPUT_NODE, OpKind.INPUT, NoAttrs(), (), net_span, INPUT_NODE, input_shape, input_shape, 0, 0)]
    statements: list[Statement] = []

    def chain(layers: list[dict], prev: str, prefix: str) -> str:
        for layer in layers:
            group = prefix + layer["name"]
            for op in layer["ops"]:
                nodes.append(r.node(op, inputs=(prev,), group=group, name=prefix + op["name"]))
                prev = nodes[-1].name
            statements.append(Statement(group, prev, r.span(layer["span"])))
        return prev

    logits = chain(doc["trunk"], INPUT_NODE, "")
    heads = [Head(MAIN_HEAD, logits, LossKind.SOFTMAX, WeightSchedule(ScheduleKind.CONSTANT, 1.0), net_span)]
    outputs = {st.name: st.output for st in statements}
    for b in doc["branches"]:
        tap = outputs[b["tap"]]
        end = chain(b["layers"], tap, b["name"] + ".")
        heads.append(Head(b["name"], end, LossKind(b["loss"]), r.schedule(b["schedule"]), r.span(b["span"]), tap))
    shapes_known = all(n.out_shape is not None for n in nodes[1:])
    if not shapes_known:  # a v1 IR saved before shape inference: the input node's shape is filled in later too
        nodes[0] = Node(INPUT_NODE, OpKind.INPUT, NoAttrs(), (), net_span, INPUT_NODE)
    return tuple(nodes), tuple(heads), tuple(statements)


def train_config_from_dict(doc: dict) -> TrainConfig:
    """A :class:`TrainConfig` from its JSON form (the IR's ``train``, a checkpoint's ``train_config``)."""
    t = dict(doc)
    p = t.pop("lr_policy")
    return TrainConfig(lr_policy=LrPolicy(p["kind"], p["gamma"], p["every"], tuple(p["milestones"]), p["power"]), **t)


def from_json_dict(doc: Any, name: str = "<ir>") -> Network:
    version = validate(doc, name)
    sources = [Source(s["name"], s["text"]) for s in doc["sources"]]
    r = _Reader(sources)
    try:
        train = train_config_from_dict(doc["train"])
        dd = doc["data"]
        data = DataConfig(
            resize=tuple(dd["resize"]) if dd["resize"] else None,
            mean=tuple(dd["mean"]),
            std=tuple(dd["std"]),
            mirror=dd["mirror"],
        )
        span = r.span(doc["span"])
        input_shape = Shape(tuple(doc["input"]))
        if version == 1:
            nodes, heads, statements = graph_of_v1(doc, r, span, input_shape)
        else:
            nodes = tuple(r.node(n) for n in doc["nodes"])
            heads = tuple(r.head(h) for h in doc["heads"])
            statements = tuple(r.statement(st) for st in doc["statements"])
        return Network(
            name=doc["name"],
            input=input_shape,
            num_classes=doc["num_classes"],
            class_names=tuple(doc["class_names"]),
            nodes=nodes,
            heads=heads,
            statements=statements,
            train=train,
            data=data,
            span=span,
            sources=tuple((s.name, s.text) for s in sources),
        )
    except (ValueError, TypeError, IndexError, KeyError) as e:
        # The schema fixes the form; node invariants (e.g. a span outside its source) are checked here.
        raise IRFormatError(f"inconsistent IR: {e}", path=name) from None


MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects read from an IR document (a real one nests 9 deep). Checked on the
text before ``json.loads``, the schema validator and the reader recurse over it."""

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the arrays and objects of JSON ``text`` nest deeper than ``limit`` (brackets inside strings
    do not count); one pass over the brackets, stopping at the first level past the limit."""
    depth = 0
    for ch in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        if ch in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def loads(text: str, name: str = "<ir>") -> Network:
    if json_depth_exceeds(text):
        raise IRFormatError(f"not an IR document: arrays or objects nested more than {MAX_JSON_DEPTH} deep",
                            path=name)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise IRFormatError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}", path=name) from None
    return from_json_dict(doc, name)


def read_ir(path: str | Path) -> Network:
    from .io import read_bounded_text

    return loads(read_bounded_text(path, "IR file", IRFormatError), str(path))
