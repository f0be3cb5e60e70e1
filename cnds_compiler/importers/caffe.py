"""Caffe text net definition (``.prototxt``, current ``layer {}`` and legacy V1 ``layers {}``) → ``.cnds``.

The text is parsed with a small grammar of its own (``caffe.lark``: protobuf text format), then read as
a blob graph: each layer reads ``bottom`` blobs and writes ``top`` blobs; an in-place layer (top ==
bottom, e.g. ReLU) joins the statement of the layer whose blob it rewrites, so ``conv1`` + its ReLU is one
statement ``conv1: conv2d(...) relu``. Loss layers become heads. The **main head** is the loss with the
greatest ``loss_weight`` (ties: the one defined last, i.e. the deepest); every other loss is a supervision
branch with its ``loss_weight`` as a constant α (GoogLeNet's 0.3), holding the layers only it needs.
Every unsupported layer type is reported at once with its line and column; nothing is written then.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lark import Lark, Token, Tree, UnexpectedEOF, UnexpectedInput
from lark.exceptions import UnexpectedToken

from ..errors import ArgumentError, SpecSyntaxError, UnsupportedError
from ..parser import grammar_cache
from ..source import Source, Span

_PARSER = Lark.open("caffe.lark", rel_to=__file__, parser="lalr", propagate_positions=True,
                    cache=(c := grammar_cache()) and f"{c}-caffe.lark-cache")

# V1 `layers { type: CONVOLUTION }` enum names → current type strings
_V1_TYPES = {
    "CONVOLUTION": "Convolution", "POOLING": "Pooling", "RELU": "ReLU", "LRN": "LRN", "CONCAT": "Concat",
    "INNER_PRODUCT": "InnerProduct", "DROPOUT": "Dropout", "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SOFTMAX": "Softmax", "ACCURACY": "Accuracy", "DATA": "Data", "IMAGE_DATA": "ImageData",
    "ELTWISE": "Eltwise", "SPLIT": "Split", "FLATTEN": "Flatten", "SIGMOID": "Sigmoid", "TANH": "TanH",
    "SILENCE": "Silence", "HINGE_LOSS": "HingeLoss", "EUCLIDEAN_LOSS": "EuclideanLoss",
}
_DATA = {"Data", "ImageData", "Input", "DummyData", "HDF5Data", "MemoryData", "WindowData"}
_IGNORED = {"Accuracy", "Silence", "Softmax"}  # evaluation only; a deployed cnds model ends in logits
_LOSSES = {"SoftmaxWithLoss": "softmax", "HingeLoss": "hinge"}
_SUPPORTED = {"Convolution", "InnerProduct", "Pooling", "ReLU", "LRN", "Dropout", "Concat", "Eltwise",
              "BatchNorm", "Scale", "Split", "Flatten"} | _DATA | _IGNORED | set(_LOSSES)


@dataclass
class Msg:
    """A protobuf text message: its fields in order, each with where it was written."""

    fields: list[tuple[str, object, Span]] = field(default_factory=list)
    span: Span | None = None

    def all(self, key: str) -> list:
        return [v for k, v, _ in self.fields if k == key]

    def get(self, key: str, default=None):
        values = self.all(key)
        return values[0] if values else default

    def msg(self, key: str) -> Msg:
        value = self.get(key)
        return value if isinstance(value, Msg) else Msg()


def _value(token: Token):
    text = str(token)
    if token.type == "STRING":
        return text[1:-1]
    if token.type == "NUMBER":
        return float(text) if any(c in text for c in ".eE") else int(text)
    return {"true": True, "false": False}.get(text, text)


def parse_prototxt(text: str, name: str) -> Msg:
    source = Source(name, text if text.endswith("\n") else text + "\n")
    try:
        tree = _PARSER.parse(source.text)
    except (UnexpectedEOF, UnexpectedToken) as e:
        if isinstance(e, UnexpectedToken) and e.token.type != "$END":
            pos = e.pos_in_stream
            raise SpecSyntaxError(f"not a Caffe text net definition: unexpected {str(e.token)!r}",
                                  Span(source, pos, pos + len(str(e.token)))) from None
        end = len(source.text)
        raise SpecSyntaxError("not a Caffe text net definition: unexpected end of file (a `{` left open?)",
                              Span(source, end, end)) from None
    except UnexpectedInput as e:
        pos = min(e.pos_in_stream or 0, len(source.text) - 1)
        raise SpecSyntaxError("not a Caffe text net definition (protobuf text format): unexpected "
                              f"{source.text[pos]!r}", Span(source, pos, pos + 1)) from None

    def build(children, span) -> Msg:
        msg = Msg(span=span)
        for child in children:
            key = str(child.children[0])
            where = Span(source, child.meta.start_pos, child.meta.end_pos)
            if child.data == "scalar":
                msg.fields.append((key, _value(child.children[1]), where))
            else:
                msg.fields.append((key, build(child.children[1:], where), where))
        return msg

    assert isinstance(tree, Tree)
    return build(tree.children, Span(source, 0, 0))


@dataclass
class Layer:
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    msg: Msg
    span: Span

    @property
    def phase(self) -> str | None:
        include = self.msg.msg("include").get("phase")
        return str(include) if include is not None else None


# The numeric fields read from each kind of layer: (param message, field, integer?, smallest value, largest
# value); a value of another type or out of range is an error at its line:col before anything is written.
_NUMBERS = {
    "Convolution": [("convolution_param", f, True, lo, None) for f, lo in (
        ("num_output", 1), ("kernel_size", 1), ("kernel_h", 1), ("kernel_w", 1), ("stride", 1), ("pad", 0),
        ("group", 1), ("dilation", 1))],
    "InnerProduct": [("inner_product_param", "num_output", True, 1, None)],
    "Pooling": [("pooling_param", f, True, lo, None) for f, lo in (("kernel_size", 1), ("stride", 1), ("pad", 0))],
    "Dropout": [("dropout_param", "dropout_ratio", False, 0, 1)],
    "LRN": [("lrn_param", "local_size", True, 1, None), ("lrn_param", "alpha", False, 0, None),
            ("lrn_param", "beta", False, 0, None), ("lrn_param", "k", False, 0, None)],
    "BatchNorm": [("batch_norm_param", "eps", False, 0, None),
                  ("batch_norm_param", "moving_average_fraction", False, 0, 1)],
    **{loss: [(None, "loss_weight", False, 0, None)] for loss in _LOSSES},
    **{data: [("transform_param", "crop_size", True, 1, None), ("transform_param", "scale", False, 1e-12, None),
              ("transform_param", "mean_value", False, -1e6, 1e6)] for data in _DATA},
}
# Fields cnds does not translate: imported silently they would change the network.
_UNTRANSLATED = {
    "Convolution": ("convolution_param", ("pad_h", "pad_w", "stride_h", "stride_w")),
    "Pooling": ("pooling_param", ("kernel_h", "kernel_w", "pad_h", "pad_w", "stride_h", "stride_w")),
}
_ONE_VALUE = {"Convolution": ("convolution_param", ("kernel_size", "stride", "pad", "dilation")),
              "Pooling": ("pooling_param", ("kernel_size", "stride", "pad"))}


def _check_number(msg: Msg, key: str, integer: bool, low: float, high: float | None, what: str) -> None:
    """Every ``key`` of ``msg`` is a number (a whole one with ``integer``) in [low, high]; else an
    :class:`ArgumentError` at the value's line:col, naming it as ``what``."""
    import math

    for k, v, span in msg.fields:
        if k != key:
            continue
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not number or not math.isfinite(v) or (integer and v != int(v)) or v < low or (high is not None and v > high):
            kind = "a whole number" if integer else "a finite number"
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ArgumentError(f"{what} must be {kind} {bounds}, got {v!r}", span)


def _check_fields(layer: Layer) -> None:
    """Every numeric field cnds reads is a number in its range, and no field it would drop is set."""
    for param, key, integer, low, high in _NUMBERS.get(layer.type, ()):
        msg = layer.msg.msg(param) if param else layer.msg
        _check_number(msg, key, integer, low, high,
                      f"layer '{layer.name}': " + (f"{param} {{ {key} }}" if param else key))
    if layer.type in _DATA:
        _check_number(layer.msg.msg("input_param").msg("shape"), "dim", True, 1, None,
                      f"layer '{layer.name}': input_param {{ shape {{ dim }} }}")
    if layer.type == "Convolution":
        sides = [k for k in ("kernel_h", "kernel_w") if layer.msg.msg("convolution_param").get(k) is not None]
        if layer.msg.msg("convolution_param").get("kernel_size") is None and len(sides) != 2:
            raise UnsupportedError(f"layer '{layer.name}': convolution_param needs kernel_size, or both kernel_h "
                                   "and kernel_w", layer.span)
    if layer.type in _UNTRANSLATED:
        param, keys = _UNTRANSLATED[layer.type]
        for k, _, span in layer.msg.msg(param).fields:
            if k in keys:
                raise UnsupportedError(f"layer '{layer.name}': {param} {{ {k} }} is not imported (cnds would drop "
                                       "it and change the network); give one value for both sides", span)
    if layer.type in _ONE_VALUE:
        param, keys = _ONE_VALUE[layer.type]
        for key in keys:
            repeated = [span for k, _, span in layer.msg.msg(param).fields if k == key][1:]
            if repeated:
                raise UnsupportedError(f"layer '{layer.name}': {param} {{ {key} }} given per side (height, then "
                                       "width) is not imported; give one value for both sides", repeated[0])
    if layer.type == "ReLU":
        for k, v, span in layer.msg.msg("relu_param").fields:
            if k == "negative_slope" and v != 0:
                raise UnsupportedError(f"layer '{layer.name}': a leaky ReLU (negative_slope {v!r}) is not "
                                       "imported; cnds has the plain ReLU only", span)


def _ident(name: str) -> str:
    """A Caffe name as a cnds name: ``inception_3a/1x1`` → ``inception_3a.1x1``."""
    parts = [re.sub(r"\W", "_", p) or "_" for p in re.split(r"[/.]", name)]
    if not (parts[0][0].isalpha() or parts[0][0] == "_"):
        parts[0] = "_" + parts[0]
    return ".".join(parts)


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass
class CaffeImport:
    name: str
    text: str
    main_loss: str
    heads: list[str]


def import_caffe(path: Path, name: str | None = None, input_shape=None) -> CaffeImport:
    """Read ``path`` and write the equivalent spec text (compile it to check it)."""
    from ..errors import SpecIncludeError
    from ..io import read_bounded_text

    text = read_bounded_text(path, "prototxt", SpecIncludeError)
    net = parse_prototxt(text, str(path))
    return _Importer(net, path, name, input_shape).run()


class _Importer:
    def __init__(self, net: Msg, path: Path, name: str | None, input_shape) -> None:
        self.net, self.path = net, path
        self.name = _ident(name or str(net.get("name", path.stem)))
        self.input_shape = input_shape
        self.notes: list[str] = []
        """Things the reader should know, written as comments at the top of the spec."""
        self.layers: list[Layer] = []
        for msg, span in ((v, s) for k, v, s in net.fields if k in ("layer", "layers")):  # in file order
            raw = msg.get("type", "")
            kind = _V1_TYPES.get(str(raw), str(raw))
            self.layers.append(Layer(str(msg.get("name", f"layer{len(self.layers)}")), kind,
                                     [str(b) for b in msg.all("bottom")], [str(t) for t in msg.all("top")],
                                     msg, span))

    # ---- reading ---------------------------------------------------------------------------------
    def run(self) -> CaffeImport:
        unsupported = [layer for layer in self.layers if layer.type not in _SUPPORTED]
        unsupported += [layer for layer in self.layers if self._unsupported_detail(layer)]
        if unsupported:
            listed = "; ".join(f"{layer.span.location().line}:{layer.span.location().column} {layer.name} "
                               f"({layer.type}{self._unsupported_detail(layer)})" for layer in unsupported)
            raise UnsupportedError(f"{len(unsupported)} layer(s) cnds cannot import: {listed}", unsupported[0].span)
        for layer in self.layers:
            _check_fields(layer)
        for key, v, span in [*self.net.fields, *self.net.msg("input_shape").fields]:
            if key in ("input_dim", "dim"):
                _check_number(Msg([(key, v, span)]), key, True, 1, None, key)
        self._check_blob_order()
        layers = [layer for layer in self.layers if layer.phase != "TEST"]
        shape, data = self._input(layers)
        losses = [layer for layer in layers if layer.type in _LOSSES]
        main_loss = self._main_loss(losses, layers)
        return self._write(layers, shape, data, losses, main_loss)

    def _check_blob_order(self) -> None:
        """Refuse what the statements cannot say: a blob written by two layers (Caffe refuses it too), and an
        in-place layer (a ReLU on ``conv1``) after another layer read the blob's earlier value — joined to the
        statement that makes the blob, it would run before that reader."""
        writer: dict[str, Layer] = {}
        readers: dict[str, list[Layer]] = {}  # of each blob's current value
        for layer in (layer for layer in self.layers if layer.phase != "TEST"):
            for top in layer.tops:
                in_place = top in layer.bottoms
                if top in writer and not in_place:
                    raise UnsupportedError(f"blob '{top}' is written by layer '{writer[top].name}' and again by "
                                           f"'{layer.name}' (not in place): Caffe refuses a blob with two sources",
                                           layer.span)
                earlier = [r.name for r in readers.get(top, []) if r is not layer]
                if in_place and earlier:
                    raise UnsupportedError(f"layer '{layer.name}' rewrites blob '{top}' in place after layer "
                                           f"'{earlier[0]}' read its earlier value, which cnds cannot keep apart; give "
                                           f"'{layer.name}' a top of its own", layer.span)
            for bottom in layer.bottoms:
                readers.setdefault(bottom, []).append(layer)
            for top in layer.tops:
                writer[top] = layer
                readers[top] = []

    @staticmethod
    def _unsupported_detail(layer: Layer) -> str:
        m = layer.msg
        if layer.type == "Eltwise":
            op = str(m.msg("eltwise_param").get("operation", "SUM"))
            coeffs = m.msg("eltwise_param").all("coeff")
            if op != "SUM" or any(c != 1 for c in coeffs):
                return f": operation {op} with coefficients {coeffs or [1]}; only an unweighted SUM is add"
        if layer.type == "LRN" and str(m.msg("lrn_param").get("norm_region", "ACROSS_CHANNELS")) != "ACROSS_CHANNELS":
            return ": WITHIN_CHANNEL normalisation"
        if layer.type == "Pooling" and str(m.msg("pooling_param").get("pool", "MAX")) not in ("MAX", "AVE"):
            return ": STOCHASTIC pooling"
        if layer.type == "Concat":
            p = m.msg("concat_param")
            if p.get("axis", p.get("concat_dim", 1)) != 1:
                return ": concatenation along another axis than channels"
        return ""

    def _input(self, layers: list[Layer]):
        """(C, H, W) and the data section, from an Input/Data layer or the net's ``input_dim`` fields."""
        dims = [int(d) for d in self.net.all("input_dim")] or [int(d) for d in self.net.msg("input_shape").all("dim")]
        data_text = ""
        for layer in layers:
            if layer.type not in _DATA:
                continue
            shape = layer.msg.msg("input_param").msg("shape").all("dim")
            if shape:
                dims = [int(d) for d in shape]
            t = layer.msg.msg("transform_param")
            crop = t.get("crop_size")
            if crop and not dims:
                dims = [1, 3, int(crop), int(crop)]
            means = t.all("mean_value")
            if t.get("mean_file"):
                self.notes.append(f"mean_file {t.get('mean_file')!r} is a binary mean image cnds does not read; "
                                  "give its per-channel mean as data { mean [r, g, b] } (on [0, 1] pixels)")
            parts = []
            if means:  # Caffe subtracts BGR means on 0-255 pixels; cnds means are RGB on [0, 1]
                rgb = list(reversed(means)) if len(means) == 3 else means
                parts.append("mean [" + ", ".join(f"{m / 255:.4g}" for m in rgb) + "]")
                parts.append(f"std {t.get('scale', 1.0) and 1 / 255 / t.get('scale', 1.0):.6g}")
            if t.get("mirror") is not None:
                parts.append(f"mirror {'true' if t.get('mirror') else 'false'}")
            if parts:
                data_text = "data { " + "  ".join(parts) + " }"
        if self.input_shape:
            dims = [1, *self.input_shape]
        if len(dims) != 4:
            raise UnsupportedError("no input size: the file has no Input layer, input_dim or crop_size; give "
                                   "--input CxHxW", path=str(self.path))
        return tuple(dims[1:]), data_text

    @staticmethod
    def _main_loss(losses: list[Layer], layers: list[Layer]) -> Layer | None:
        if not losses:
            return None
        weight = {id(layer): float(layer.msg.get("loss_weight", 1)) for layer in losses}
        order = {id(layer): i for i, layer in enumerate(layers)}
        return max(losses, key=lambda layer: (weight[id(layer)], order[id(layer)]))

    # ---- writing ---------------------------------------------------------------------------------------
    def _write(self, layers, shape, data_text, losses, main_loss) -> CaffeImport:
        producer: dict[str, int] = {}  # blob → index of the statement that holds its current value
        statements: list[dict] = []
        names: set[str] = set()

        def new_statement(layer: Layer, op: str, sources: list[str]) -> dict:
            name = _ident(layer.name)
            while name in names:
                name += "_"
            names.add(name)
            st = {"name": name, "ops": [op], "sources": sources, "layer": layer, "reads": set()}
            statements.append(st)
            return st

        deploy_logits = None
        for blob in self.net.all("input"):  # net-level inputs (deploy files, V1)
            producer[str(blob)] = -1
        for layer in layers:
            if layer.type in _DATA:
                for top in layer.tops:
                    producer[top] = -1
                continue
            if layer.type in ("Accuracy", "Silence"):
                continue
            if layer.type == "Softmax":
                deploy_logits = layer.bottoms[0] if layer.bottoms else None
                continue
            if layer.type in _LOSSES:
                continue
            if layer.type in ("Split",):
                for top in layer.tops:
                    producer[top] = producer[layer.bottoms[0]]
                continue
            op = self._op(layer)
            in_place = layer.tops and layer.bottoms and layer.tops[0] == layer.bottoms[0]
            source = producer.get(layer.bottoms[0]) if layer.bottoms else -1
            if in_place and op is not None and source is not None and source >= 0 and len(layer.bottoms) == 1:
                statements[source]["ops"].append(op)  # ReLU/Dropout/Scale rewriting its bottom: same statement
                continue
            if op is None:  # Flatten, or Scale after BatchNorm: the identity here
                for top in layer.tops:
                    producer[top] = source
                continue
            sources = [self._value(producer, b, statements, layer) for b in layer.bottoms]
            st = new_statement(layer, op, sources)
            st["reads"] = {producer[b] for b in layer.bottoms}
            for top in layer.tops:
                producer[top] = len(statements) - 1

        main_blob = main_loss.bottoms[0] if main_loss is not None else deploy_logits
        if main_blob is None and statements:
            main_index = len(statements) - 1
        else:
            main_index = producer[main_blob]

        def ancestors(i: int) -> set[int]:
            seen, stack = set(), [i]
            while stack:
                j = stack.pop()
                if j >= 0 and j not in seen:
                    seen.add(j)
                    stack.extend(statements[j]["reads"])
            return seen

        main = ancestors(main_index)
        classes = self._out_features(statements[main_index])
        heads = []
        for loss in losses:
            if loss is main_loss:
                continue
            own = sorted(ancestors(producer[loss.bottoms[0]]) - main)
            heads.append((loss, own))
        branch_only = {i for _, own in heads for i in own}
        top_level = [st for i, st in enumerate(statements) if i not in branch_only and i in main]
        return CaffeImport(self.name, self._text(shape, data_text, classes, statements, top_level, heads, main_index),
                           main_loss.name if main_loss is not None else "", [h.name for h, _ in heads])

    @staticmethod
    def _value(producer: dict, blob: str, statements: list[dict], layer: Layer) -> str:
        i = producer.get(blob)
        if i is None:
            raise UnsupportedError(f"layer '{layer.name}' reads blob '{blob}', which no earlier layer writes",
                                   layer.span)
        return "in" if i < 0 else statements[i]["name"]

    @staticmethod
    def _out_features(st: dict) -> int | None:
        m = re.match(r"linear\((\d+)", st["ops"][0])
        return int(m.group(1)) if m else None

    def _op(self, layer: Layer) -> str | None:
        m = layer.msg
        param = {"Convolution": "convolution_param", "InnerProduct": "inner_product_param"}.get(layer.type)
        if param and m.msg(param).get("num_output") is None:
            raise UnsupportedError(f"layer '{layer.name}' ({layer.type}) has no {param} {{ num_output }}",
                                   layer.span)
        if layer.type == "Convolution":
            p = m.msg("convolution_param")
            k = p.get("kernel_size", None)
            kernel = _num(k) if k is not None else f"kernel=[{p.get('kernel_h')}, {p.get('kernel_w')}]"
            args = [_num(p.get("num_output")), kernel]
            for key, name, default in (("stride", "stride", 1), ("pad", "pad", 0), ("group", "groups", 1),
                                       ("dilation", "dilation", 1)):
                v = p.get(key, default)
                if v != default:
                    args.append(f"{name}={_num(v)}")
            return f"conv2d({', '.join(args + self._init(layer, p))})"
        if layer.type == "InnerProduct":
            p = m.msg("inner_product_param")
            return f"linear({', '.join([_num(p.get('num_output'))] + self._init(layer, p))})"
        if layer.type == "Pooling":
            p = m.msg("pooling_param")
            if p.get("global_pooling"):
                return "gap"
            kind = "maxpool" if str(p.get("pool", "MAX")) == "MAX" else "avgpool"
            k = p.get("kernel_size")
            args = [_num(k)]
            if p.get("stride", 1) != k:
                args.append(f"stride={_num(p.get('stride', 1))}")
            if p.get("pad", 0):
                args.append(f"pad={_num(p.get('pad'))}")
            return f"{kind}({', '.join(args)})"
        if layer.type == "ReLU":
            return "relu"
        if layer.type == "Dropout":
            return f"dropout({_num(m.msg('dropout_param').get('dropout_ratio', 0.5))})"
        if layer.type == "LRN":
            p = m.msg("lrn_param")
            return (f"lrn({_num(p.get('local_size', 5))}, alpha={_num(p.get('alpha', 1.0))}, "
                    f"beta={_num(p.get('beta', 0.75))}, k={_num(p.get('k', 1.0))})")
        if layer.type == "Concat":
            return "concat"
        if layer.type == "Eltwise":
            return "add"
        if layer.type == "BatchNorm":
            p = m.msg("batch_norm_param")
            return f"batchnorm(eps={_num(p.get('eps', 1e-5))}, momentum={1 - float(p.get('moving_average_fraction', 0.999)):.4g})"
        return None  # Scale (folded into batchnorm's affine parameters), Flatten (linear flattens)

    @staticmethod
    def _init(layer: Layer, p: Msg) -> list[str]:
        args = []
        if p.get("bias_term") is False:
            args.append("bias=none")
        else:
            bias = p.msg("bias_filler").get("value", 0)
            args.append(f"bias={_num(bias)}")
        w = p.msg("weight_filler")
        kind = str(w.get("type", "constant"))
        if kind == "gaussian":
            args.append(f"init=gaussian, std={_num(w.get('std', 1))}")
        elif kind in ("xavier", "msra"):
            args.append(f"init={'xavier' if kind == 'xavier' else 'kaiming'}")
        return args

    def _text(self, shape, data_text, classes, statements, top_level, heads, main_index) -> str:
        c, h, w = shape
        lines = [
            f"# Imported from {self.path.name} (Caffe text net definition) by cnds-import. One statement per",
            "# layer group (a layer and the in-place layers that rewrite its blob); loss layers are heads: the",
            "# main head is the loss with the greatest loss_weight (ties: the deepest), the others supervision",
            "# branches with their loss_weight as a constant weight.",
            *(f"# NOTE: {note}" for note in dict.fromkeys(self.notes)),
            f"network {self.name}",
            f"input {c}x{h}x{w}",
            f"classes {classes}" if classes else "classes 2",
            "pooling ceil                       # Caffe rounds pooled sizes up",
        ]
        if data_text:
            lines.append(data_text)
        solver = self._solver()
        if solver:
            lines.append(solver)
        lines.append("")
        previous = "in"
        written = [self._statement(st, "in" if i == 0 else top_level[i - 1]["name"], classes)
                   for i, st in enumerate(top_level)]
        lines.extend(_repetitions(written))
        previous = top_level[-1]["name"] if top_level else previous
        for loss, own in heads:
            weight = float(loss.msg.get("loss_weight", 1))
            kind = _LOSSES[loss.type]
            head = _ident(loss.name).split(".")[0]
            tap = statements[own[0]]["sources"][0] if own else statements[main_index]["name"]
            lines.append("")
            lines.append(f"supervise {tap} as {head} loss {kind} weight {weight:g} decay none {{")
            previous = tap
            for i in own:
                st = dict(statements[i])
                local = st["name"].split(".", 1)[1] if st["name"].startswith(head + ".") else st["name"]
                st["name"] = local
                lines.append("  " + self._statement(st, previous, classes, strip=head + "."))
                previous = st["name"]
            lines.append("}")
        return "\n".join(lines) + "\n"

    def _solver(self) -> str:
        """``train { bias_lr_mult … bias_decay … }`` from the layers' bias ``lr_mult``/``decay_mult`` (V1:
        ``blobs_lr``/``weight_decay``), when most layers agree on values other than cnds' defaults."""
        mults = Counter()
        for layer in self.layers:
            if layer.type not in ("Convolution", "InnerProduct"):
                continue
            params = layer.msg.all("param")
            if len(params) >= 2:
                mults[(params[1].get("lr_mult", 1), params[1].get("decay_mult", 1))] += 1
            elif len(layer.msg.all("blobs_lr")) >= 2:
                lr, decay = layer.msg.all("blobs_lr"), layer.msg.all("weight_decay") or [1, 1]
                mults[(lr[1], decay[1] if len(decay) > 1 else 1)] += 1
        if not mults:
            return ""
        (lr, decay), _ = mults.most_common(1)[0]
        return f"train {{ bias_lr_mult {_num(lr)}  bias_decay {_num(decay)} }}   # the layers' bias lr_mult / decay_mult"

    @staticmethod
    def _statement(st: dict, previous: str, classes, strip: str = "") -> str:
        """``name: [sources ->] ops``; sources only when it does not read the previous statement."""
        sources = [s[len(strip):] if strip and s.startswith(strip) else s for s in st["sources"]]
        ops = list(st["ops"])
        if ops[0] in ("concat", "add"):
            head, ops[0] = "", f"{ops[0]}({', '.join(sources)})"
        else:
            head = "" if sources == [previous] else f"{', '.join(sources)} -> "
        if classes and ops[0].startswith(f"linear({classes}"):
            ops[0] = ops[0].replace(f"linear({classes}", "linear(classes", 1)
        return f"{st['name']}: {head}{' '.join(ops)}"


def _repetitions(lines: list[str]) -> list[str]:
    """Exact repeats as one repeated statement: ``conv3_1: X`` then ``conv3_2: X`` (same ops, each reading
    the one before) become ``conv3_{1,2}: X``, which names its layers exactly so."""
    out: list[str] = []
    run: list[tuple[str, str, str]] = []  # (prefix, suffix, body)

    def flush() -> None:
        if len(run) > 1:
            prefix, body = run[0][0], run[0][2]
            dot = "." if prefix.endswith(".") else ""
            out.append(f"{prefix.removesuffix('.')}{dot}{{{','.join(s for _, s, _ in run)}}}: {body}")
        elif run:
            out.append(f"{run[0][0]}{run[0][1]}: {run[0][2]}")
        run.clear()

    for line in lines:
        name, body = line.split(": ", 1)
        m = re.fullmatch(r"(.*?[._]?)(\d+)", name)
        implicit = "->" not in body and not body.startswith(("concat(", "add("))
        if m and implicit and run and run[-1][0] == m.group(1) and run[-1][2] == body \
                and int(m.group(2)) == int(run[-1][1]) + 1 and m.group(2) == str(int(m.group(2))):
            run.append((m.group(1), m.group(2), body))
            continue
        flush()
        if m and implicit and m.group(2) == str(int(m.group(2))):
            run.append((m.group(1), m.group(2), body))
        else:
            out.append(line)
    flush()
    return out
