"""AST → IR: resolve ``extends``, expand blocks and repetitions, bind op arguments, read settings.

This is the first stage of the pipeline. Every name is resolved here, so a misspelt op, block,
parameter, setting or section gets an :class:`UnknownNameError` at its span with "did you mean ...?".
Derived specs (``extends "base.cnds"``) are merged statement by statement before anything is expanded,
so a derived spec that redefines a block changes every base layer that uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import ast
from ..errors import (
    ArgumentError,
    CndsError,
    DuplicateNameError,
    SpecIncludeError,
    SupervisionError,
    UnknownNameError,
    did_you_mean,
)
from ..ir import (
    BatchNormAttrs,
    Branch,
    Conv2dAttrs,
    DataConfig,
    DropoutAttrs,
    InitScheme,
    Layer,
    LinearAttrs,
    LossKind,
    LrnAttrs,
    LrPolicy,
    Network,
    NoAttrs,
    Op,
    OpKind,
    ParamInit,
    PoolAttrs,
    ScheduleKind,
    Shape,
    TrainConfig,
    WeightSchedule,
)
from ..parser import parse_file
from ..source import Span

MAX_BLOCK_DEPTH = 32
MAX_LAYER_OPS = 1000
"""Most ops one layer may expand to."""
MAX_INPUT_CHANNELS = 4096
"""Most input channels (``data { mean ... }`` is expanded to one value per channel)."""
MAX_INPUT_SIZE = 65536

# ---- values --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Word:
    """A bare name used as a value (``ceil``, ``sgd``, ``none``)."""

    name: str


@dataclass(frozen=True, slots=True)
class Policy:
    """A call used as a value: ``step(0.1, every=20)``, ``gaussian(std=0.01)``."""

    call: ast.Call


def evaluate(expr: ast.Expr, env: dict[str, Any]) -> Any:
    """Value of an expression; names in ``env`` are substituted, other names become :class:`Word`."""
    if isinstance(expr, ast.Number):
        return expr.value
    if isinstance(expr, ast.String):
        return expr.value
    if isinstance(expr, ast.Ref):
        return env[expr.name] if expr.name in env else Word(expr.name)
    if isinstance(expr, ast.ListValue):
        return [evaluate(item, env) for item in expr.items]
    if isinstance(expr, ast.Call):
        return Policy(expr)
    if isinstance(expr, ast.Neg):
        return -_number(evaluate(expr.operand, env), expr.operand, env)
    if isinstance(expr, ast.BinOp):
        left = _number(evaluate(expr.left, env), expr.left, env)
        right = _number(evaluate(expr.right, env), expr.right, env)
        if expr.op == "+":
            return left + right
        if expr.op == "-":
            return left - right
        if expr.op == "*":
            return left * right
        if right == 0:
            raise ArgumentError("division by zero", expr.span)
        try:
            result = left / right
        except OverflowError:  # int / int beyond the float range
            raise ArgumentError("number too large", expr.span) from None
        return int(result) if float(result).is_integer() and isinstance(left, int) else result
    raise TypeError(f"unknown expression {expr!r}")


def _number(value: Any, expr: ast.Expr, env: dict[str, Any]) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, Word):
            raise UnknownNameError(
                f"unknown name '{value.name}' in arithmetic", expr.span, hint=did_you_mean(value.name, env)
            )
        raise ArgumentError("arithmetic needs numbers", expr.span)
    return value


def _describe(value: Any) -> str:
    if isinstance(value, Word):
        return f"'{value.name}'"
    if isinstance(value, Policy):
        return f"'{value.call.name}(...)'"
    return repr(value)


# ---- argument checking ------------------------------------------------------------------------------


MAX_INT = 2**31 - 1
"""Largest integer a spec may give (sizes, counts, epochs, seed); beyond it no backend can follow."""


def as_int(value: Any, span: Span, what: str, minimum: int = 1, maximum: int = MAX_INT) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{what} must be an integer, got {_describe(value)}", span)
    if value < minimum:
        raise ArgumentError(f"{what} must be >= {minimum}, got {value}", span)
    if value > maximum:
        shown = value if value.bit_length() <= 64 else f"a {len(str(value))}-digit number"
        raise ArgumentError(f"{what} must be <= {maximum}, got {shown}", span)
    return value


def as_float(value: Any, span: Span, what: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(f"{what} must be a number, got {_describe(value)}", span)
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        raise ArgumentError(f"{what} is too large", span) from None
    if not math.isfinite(value):
        raise ArgumentError(f"{what} must be a finite number, got {value}", span)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ArgumentError(f"{what} must be in {bounds}, got {value}", span)
    return float(value)


def as_pair(value: Any, span: Span, what: str, minimum: int = 1) -> tuple[int, int]:
    if isinstance(value, list):
        if len(value) != 2:
            raise ArgumentError(f"{what} takes one integer or [height, width]", span)
        return (as_int(value[0], span, what, minimum), as_int(value[1], span, what, minimum))
    v = as_int(value, span, what, minimum)
    return (v, v)


def as_word(value: Any, span: Span, what: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, Word) or value.name not in choices:
        shown = value.name if isinstance(value, Word) else _describe(value)
        raise ArgumentError(
            f"{what} must be one of {', '.join(choices)}; got {shown}",
            span,
            hint=did_you_mean(shown, choices) if isinstance(value, Word) else None,
        )
    return value.name


def as_bool(value: Any, span: Span, what: str) -> bool:
    return as_word(value, span, what, ("true", "false")) == "true"


# ---- op signatures ----------------------------------------------------------------------------------

_REQUIRED = object()


@dataclass(frozen=True)
class Signature:
    """Parameters of a built-in op, in positional order, with defaults (``_REQUIRED`` = none)."""

    params: tuple[tuple[str, Any], ...]
    build: Callable[[dict[str, Any], dict[str, Span], _Defaults], Any]

    def bind(self, op: str, call: ast.Call, args: list[tuple[str | None, Any, Span]]):
        names = [p for p, _ in self.params]
        bound: dict[str, Any] = {}
        spans: dict[str, Span] = {}
        positional_done = False
        for key, value, span in args:
            if key is None:
                if positional_done:
                    raise ArgumentError("positional argument after a keyword argument", span)
                if len(bound) >= len(names):
                    raise ArgumentError(
                        f"{op} takes no arguments" if not names
                        else f"{op} takes at most {len(names)} arguments ({', '.join(names)})", span
                    )
                key = names[len(bound)]
            else:
                positional_done = True
                if key not in names:
                    raise UnknownNameError(
                        f"{op} has no parameter '{key}' (it takes {', '.join(names) or 'none'})",
                        span,
                        hint=did_you_mean(key, names),
                    )
                if key in bound:
                    raise ArgumentError(f"{op}: '{key}' given twice", span)
            bound[key] = value
            spans[key] = span
        for name, default in self.params:
            if name not in bound:
                if default is _REQUIRED:
                    raise ArgumentError(f"{op} needs '{name}' ({', '.join(names)})", call.span)
                bound[name] = default
                spans[name] = call.span
        return bound, spans


@dataclass(frozen=True)
class _Defaults:
    """Network-wide defaults an op falls back on."""

    init: ParamInit
    ceil: bool


def _param_init(bound: dict, spans: dict, d: _Defaults) -> ParamInit:
    scheme = d.init.scheme
    if bound.get("init") is not None:
        scheme = InitScheme(as_word(bound["init"], spans["init"], "init", tuple(s.value for s in InitScheme)))
    std = d.init.std if bound["std"] is None else as_float(bound["std"], spans["std"], "std", lo=0.0)
    bias = bound["bias"]
    if bias is None:
        bias = d.init.bias
    elif isinstance(bias, Word) and bias.name == "none":
        bias = None
    else:
        bias = as_float(bias, spans["bias"], "bias (initial value, or none)")
    if scheme is not InitScheme.GAUSSIAN:
        std = 0.0  # kaiming/xavier derive their scale from the fan; a std would be noise in the IR
    return ParamInit(scheme, std, bias)


def _conv(b: dict, s: dict, d: _Defaults) -> Conv2dAttrs:
    out = as_int(b["out"], s["out"], "conv2d out channels")
    groups = as_int(b["groups"], s["groups"], "groups")
    if out % groups:
        raise ArgumentError(f"out channels {out} is not divisible by groups {groups}", s["groups"])
    return Conv2dAttrs(
        out_channels=out,
        kernel=as_pair(b["kernel"], s["kernel"], "kernel"),
        stride=as_pair(b["stride"], s["stride"], "stride"),
        pad=as_pair(b["pad"], s["pad"], "pad", minimum=0),
        groups=groups,
        dilation=as_pair(b["dilation"], s["dilation"], "dilation"),
        init=_param_init(b, s, d),
    )


def _pool(b: dict, s: dict, d: _Defaults) -> PoolAttrs:
    kernel = as_pair(b["kernel"], s["kernel"], "kernel")
    stride = kernel if b["stride"] is None else as_pair(b["stride"], s["stride"], "stride")
    pad = as_pair(b["pad"], s["pad"], "pad", minimum=0)
    if pad[0] * 2 > kernel[0] or pad[1] * 2 > kernel[1]:
        raise ArgumentError(f"pad {pad[0]} is more than half the kernel {kernel[0]}", s["pad"])
    ceil = d.ceil if b["round"] is None else as_word(b["round"], s["round"], "round", ("floor", "ceil")) == "ceil"
    return PoolAttrs(kernel, stride, pad, ceil)


_WEIGHT_PARAMS = (("bias", None), ("std", None), ("init", None))

SIGNATURES: dict[OpKind, Signature] = {
    OpKind.CONV2D: Signature(
        (("out", _REQUIRED), ("kernel", _REQUIRED), ("stride", 1), ("pad", 0), ("groups", 1), ("dilation", 1))
        + _WEIGHT_PARAMS,
        _conv,
    ),
    OpKind.MAXPOOL: Signature((("kernel", _REQUIRED), ("stride", None), ("pad", 0), ("round", None)), _pool),
    OpKind.AVGPOOL: Signature((("kernel", _REQUIRED), ("stride", None), ("pad", 0), ("round", None)), _pool),
    OpKind.RELU: Signature((), lambda b, s, d: NoAttrs()),
    OpKind.GAP: Signature((), lambda b, s, d: NoAttrs()),
    OpKind.DROPOUT: Signature(
        (("p", 0.5),), lambda b, s, d: DropoutAttrs(as_float(b["p"], s["p"], "dropout p", 0.0, 0.99))
    ),
    OpKind.LRN: Signature(
        (("size", 5), ("alpha", 1e-4), ("beta", 0.75), ("k", 1.0)),
        lambda b, s, d: LrnAttrs(
            as_int(b["size"], s["size"], "lrn size"),
            as_float(b["alpha"], s["alpha"], "alpha", lo=0.0),
            as_float(b["beta"], s["beta"], "beta", lo=0.0),
            as_float(b["k"], s["k"], "k", lo=0.0),
        ),
    ),
    OpKind.BATCHNORM: Signature(
        (("eps", 1e-5), ("momentum", 0.1)),
        lambda b, s, d: BatchNormAttrs(
            as_float(b["eps"], s["eps"], "eps", lo=1e-12), as_float(b["momentum"], s["momentum"], "momentum", 0.0, 1.0)
        ),
    ),
    OpKind.LINEAR: Signature(
        (("out", _REQUIRED),) + _WEIGHT_PARAMS,
        lambda b, s, d: LinearAttrs(as_int(b["out"], s["out"], "linear out features"), _param_init(b, s, d)),
    ),
}
BUILTIN_OPS = {kind.value: kind for kind in OpKind}

# ---- settings of sections ------------------------------------------------------------------------

_LR_POLICIES = ("fixed", "step", "multistep", "cosine", "poly")


def _lr_policy(value: Any, span: Span, env: dict) -> LrPolicy:
    if isinstance(value, Word):
        name, args = value.name, []
    elif isinstance(value, Policy):
        name = value.call.name
        args = [(a.name, evaluate(a.value, env), a.span) for a in value.call.args]
    else:
        raise ArgumentError(f"lr_policy must be one of {', '.join(_LR_POLICIES)}", span)
    if name not in _LR_POLICIES:
        raise UnknownNameError(f"unknown lr_policy '{name}'", span, hint=did_you_mean(name, _LR_POLICIES))
    params = {
        "fixed": (),
        "step": (("gamma", 0.1), ("every", _REQUIRED)),
        "multistep": (("gamma", 0.1), ("milestones", _REQUIRED)),
        "cosine": (),
        "poly": (("power", 1.0),),
    }[name]
    call = value.call if isinstance(value, Policy) else ast.Call(name, (), span, span)
    bound, spans = Signature(params, lambda *a: None).bind(name, call, args)
    if name == "step":
        return LrPolicy("step", gamma=as_float(bound["gamma"], spans["gamma"], "gamma", 0.0), every=as_int(bound["every"], spans["every"], "every"))
    if name == "multistep":
        ms = bound["milestones"]
        if not isinstance(ms, list):
            ms = [ms]
        return LrPolicy(
            "multistep",
            gamma=as_float(bound["gamma"], spans["gamma"], "gamma", 0.0),
            milestones=tuple(as_int(m, spans["milestones"], "milestone") for m in ms),
        )
    if name == "poly":
        return LrPolicy("poly", power=as_float(bound["power"], spans["power"], "power", 0.0))
    return LrPolicy(name)


def _float_list(value: Any, span: Span, what: str, length: int | None) -> tuple[float, ...]:
    items = value if isinstance(value, list) else [value]
    result = tuple(as_float(v, span, what) for v in items)
    if length is not None and len(result) not in (1, length):
        raise ArgumentError(f"{what} needs 1 or {length} values (one per input channel), got {len(result)}", span)
    return result * (length if len(result) == 1 and length else 1)


TRAIN_KEYS: dict[str, Callable[[Any, Span, dict], Any]] = {
    "optimizer": lambda v, s, e: as_word(v, s, "optimizer", ("sgd", "adam", "adamw")),
    "lr": lambda v, s, e: as_float(v, s, "lr", lo=0.0),
    "lr_policy": _lr_policy,
    "momentum": lambda v, s, e: as_float(v, s, "momentum", 0.0, 1.0),
    "weight_decay": lambda v, s, e: as_float(v, s, "weight_decay", lo=0.0),
    "epochs": lambda v, s, e: as_int(v, s, "epochs"),
    "batch": lambda v, s, e: as_int(v, s, "batch"),
    "bias_lr_mult": lambda v, s, e: as_float(v, s, "bias_lr_mult", lo=0.0),
    "bias_decay": lambda v, s, e: as_float(v, s, "bias_decay", lo=0.0),
    "seed": lambda v, s, e: as_int(v, s, "seed", minimum=0),
}

DATA_KEYS: dict[str, Callable[[Any, Span, dict], Any]] = {
    "resize": lambda v, s, e: as_pair(v, s, "resize"),
    "mean": lambda v, s, e: _float_list(v, s, "mean", e["__channels__"]),
    "std": lambda v, s, e: _float_list(v, s, "std", e["__channels__"]),
    "mirror": lambda v, s, e: as_bool(v, s, "mirror"),
}

SECTIONS = {"train": TRAIN_KEYS, "data": DATA_KEYS}
_LOSSES = {"softmax": LossKind.SOFTMAX, "cross_entropy": LossKind.SOFTMAX, "hinge": LossKind.HINGE,
           "squared_hinge": LossKind.HINGE}
SUPERVISE_KEYS = ("loss", "weight", "decay")

# ---- merging extends ----------------------------------------------------------------------------


@dataclass
class _Merged:
    """The statements in force once a spec and its bases are merged."""

    network: ast.NetworkDecl | None = None
    input: ast.InputDecl | None = None
    classes: ast.ClassesDecl | None = None
    init: ast.InitDecl | None = None
    pooling: ast.PoolingDecl | None = None
    blocks: dict[str, ast.BlockDef] = field(default_factory=dict)
    layers: list[tuple[str, ast.LayerDef]] = field(default_factory=list)
    supervise: list[tuple[str, Span, ast.Supervise]] = field(default_factory=list)
    sections: dict[str, dict[str, ast.Setting]] = field(default_factory=dict)
    sources: list[tuple[str, str]] = field(default_factory=list)


def _merge(spec: ast.SpecFile, merged: _Merged, is_derived: bool) -> None:
    """Apply one file's statements on top of ``merged`` (its bases already applied)."""
    seen_layers: dict[str, Span] = {}
    seen_blocks: dict[str, Span] = {}
    seen_headers: dict[str, Span] = {}
    base_layer_names = {name for name, _ in merged.layers}
    for st in spec.statements:
        header = type(st).__name__
        if isinstance(st, (ast.NetworkDecl, ast.InputDecl, ast.ClassesDecl, ast.InitDecl, ast.PoolingDecl)):
            if header in seen_headers:
                word = {"NetworkDecl": "network", "InputDecl": "input", "ClassesDecl": "classes",
                        "InitDecl": "init", "PoolingDecl": "pooling"}[header]
                raise DuplicateNameError(
                    f"'{word}' given twice", st.span, notes=((seen_headers[header], "first given here"),)
                )
            seen_headers[header] = st.span
        if isinstance(st, ast.NetworkDecl):
            merged.network = st
        elif isinstance(st, ast.InputDecl):
            merged.input = st
        elif isinstance(st, ast.ClassesDecl):
            merged.classes = st
        elif isinstance(st, ast.InitDecl):
            merged.init = st
        elif isinstance(st, ast.PoolingDecl):
            merged.pooling = st
        elif isinstance(st, ast.ExtendsDecl):
            pass  # resolved by the caller before this file's statements
        elif isinstance(st, ast.BlockDef):
            if st.name in seen_blocks:
                raise DuplicateNameError(
                    f"block '{st.name}' defined twice", st.name_span, notes=((seen_blocks[st.name], "first defined here"),)
                )
            if st.name in BUILTIN_OPS:
                raise DuplicateNameError(f"block '{st.name}' would hide the built-in op of that name", st.name_span)
            seen_blocks[st.name] = st.name_span
            merged.blocks[st.name] = st
        elif isinstance(st, ast.LayerDef):
            _merge_layer(st, merged, seen_layers, base_layer_names, is_derived)
        elif isinstance(st, ast.Supervise):
            for tap, span in st.taps:
                for other_tap, other_span, _ in merged.supervise:
                    if other_tap == tap:
                        raise DuplicateNameError(
                            f"'{tap}' is already supervised", span, notes=((other_span, "first supervised here"),)
                        )
                merged.supervise.append((tap, span, st))
        elif isinstance(st, ast.Unsupervise):
            for tap, span in st.taps:
                supervised = [t for t, _, _ in merged.supervise]
                if tap not in supervised:
                    raise SupervisionError(
                        f"'{tap}' is not supervised, nothing to remove", span, hint=did_you_mean(tap, supervised)
                    )
                merged.supervise = [entry for entry in merged.supervise if entry[0] != tap]
        elif isinstance(st, ast.Section):
            if st.name not in SECTIONS:
                raise UnknownNameError(
                    f"unknown section '{st.name}' (sections: {', '.join(SECTIONS)})",
                    st.name_span,
                    hint=did_you_mean(st.name, SECTIONS),
                )
            current = merged.sections.setdefault(st.name, {})
            own: dict[str, Span] = {}
            for setting in st.settings:
                if setting.key in own:
                    raise DuplicateNameError(
                        f"'{setting.key}' set twice in {st.name}",
                        setting.key_span,
                        notes=((own[setting.key], "first set here"),),
                    )
                own[setting.key] = setting.key_span
                current[setting.key] = setting


def _merge_layer(st: ast.LayerDef, merged: _Merged, seen: dict[str, Span], base_names: set[str], derived: bool):
    for name in st.names():
        if name in seen:
            raise DuplicateNameError(
                f"layer '{name}' defined twice", st.name_span, notes=((seen[name], "first defined here"),)
            )
        seen[name] = st.name_span
        if derived:
            if name not in base_names:
                raise UnknownNameError(
                    f"'{name}' is not a layer of the base spec; a derived spec replaces layers by name",
                    st.name_span,
                    hint=did_you_mean(name, base_names),
                )
            merged.layers = [(n, st if n == name else d) for n, d in merged.layers]
        else:
            merged.layers.append((name, st))


def _load(path: Path, stack: tuple[Path, ...], span: Span | None, merged: _Merged, spec: ast.SpecFile | None = None):
    if spec is None:
        try:
            spec = parse_file(path)
        except SpecIncludeError as e:
            if span is None:
                raise
            raise SpecIncludeError(f"cannot extend {str(path)!r}: {e.message}", span) from None
    extends = [st for st in spec.statements if isinstance(st, ast.ExtendsDecl)]
    if len(extends) > 1:
        raise DuplicateNameError("a spec extends at most one base", extends[1].span)
    for st in spec.statements:
        if isinstance(st, (ast.LayerDef, ast.BlockDef, ast.Supervise)) and extends and st.span.start < extends[0].span.start:
            raise SpecIncludeError("'extends' must come before blocks, layers and supervise statements", extends[0].span)
    if extends:
        try:
            target = (path.parent / extends[0].path).resolve()
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte in the path, a symlink loop
            raise SpecIncludeError(f"cannot extend {extends[0].path!r}: {e}", extends[0].span) from None
        if target in stack:
            raise SpecIncludeError(f"{extends[0].path!r} extends itself (cycle through {target.name})", extends[0].span)
        _load(target, stack + (target,), extends[0].span, merged)
    text_source = spec.statements[0].span.source if spec.statements else None
    if text_source is not None:
        merged.sources.append((text_source.name, text_source.text))
    _merge(spec, merged, is_derived=bool(extends))


# ---- expansion --------------------------------------------------------------------------------------


class _Expander:
    def __init__(self, merged: _Merged, defaults: _Defaults, env: dict[str, Any]) -> None:
        self.m = merged
        self.defaults = defaults
        self.env = env

    def layer(self, name: str, definition: ast.LayerDef) -> Layer:
        ops: list[tuple[OpKind, Any, Span]] = []
        for call in definition.ops:
            ops.extend(self.call(call, self.env, call.span, ()))
            if len(ops) > MAX_LAYER_OPS:
                raise ArgumentError(f"layer '{name}' has more than {MAX_LAYER_OPS} ops", call.span)
        return Layer(name, self._name_ops(name, ops), definition.span)

    def call(self, call: ast.Call, env: dict, use_span: Span, stack: tuple[str, ...]):
        """Expand a call into (kind, attrs, span) triples; ``use_span`` is where the user called it."""
        args = [(a.name, evaluate(a.value, env), a.span) for a in call.args]
        if call.name in BUILTIN_OPS:
            kind = BUILTIN_OPS[call.name]
            sig = SIGNATURES[kind]
            bound, spans = sig.bind(call.name, call, args)
            try:
                attrs = sig.build(bound, spans, self.defaults)
            except ValueError as e:  # an attrs invariant the argument checks did not catch
                raise ArgumentError(f"{call.name}: {e}", call.span) from None
            return [(kind, attrs, use_span)]
        block = self.m.blocks.get(call.name)
        if block is None:
            known = list(BUILTIN_OPS) + list(self.m.blocks)
            raise UnknownNameError(
                f"unknown op or block '{call.name}'", call.name_span, hint=did_you_mean(call.name, known)
            )
        if call.name in stack or len(stack) > MAX_BLOCK_DEPTH:
            what = "uses itself" if call.name in stack else f"nests blocks deeper than {MAX_BLOCK_DEPTH} levels"
            raise ArgumentError(f"block '{call.name}' {what}", call.span)
        inner = self._bind_block(block, call, args, env)
        result = []
        for body_call in block.body:
            result.extend(self.call(body_call, inner, use_span, stack + (call.name,)))
            if len(result) > MAX_LAYER_OPS:  # checked as it grows: `block a = b b` nested 30 deep is 2**30 ops
                raise ArgumentError(f"block '{call.name}' expands to more than {MAX_LAYER_OPS} ops", call.span)
        return result

    def _bind_block(self, block: ast.BlockDef, call: ast.Call, args, env) -> dict:
        names = [p.name for p in block.params]
        inner = {k: v for k, v in self.env.items()}  # globals only: blocks are not closures
        given: dict[str, Any] = {}
        positional_done = False
        for key, value, span in args:
            if key is None:
                if positional_done:
                    raise ArgumentError("positional argument after a keyword argument", span)
                if len(given) >= len(names):
                    raise ArgumentError(f"block '{block.name}' takes at most {len(names)} arguments", span)
                key = names[len(given)]
            else:
                positional_done = True
                if key not in names:
                    raise UnknownNameError(
                        f"block '{block.name}' has no parameter '{key}' (it takes {', '.join(names) or 'none'})",
                        span,
                        hint=did_you_mean(key, names),
                    )
                if key in given:
                    raise ArgumentError(f"'{key}' given twice", span)
            given[key] = value
        for p in block.params:
            if p.name in given:
                inner[p.name] = given[p.name]
            elif p.default is not None:
                inner[p.name] = evaluate(p.default, inner)
            else:
                raise ArgumentError(
                    f"block '{block.name}' needs '{p.name}'", call.span, notes=((block.name_span, "block defined here"),)
                )
        return inner

    @staticmethod
    def _name_ops(layer: str, ops: list[tuple[OpKind, Any, Span]]) -> tuple[Op, ...]:
        """The first op with parameters takes the layer's name (stable ``conv1.weight`` keys)."""
        primary = next((i for i, (k, _, _) in enumerate(ops) if k.has_params), 0)
        counts: dict[str, int] = {}
        result = []
        for i, (kind, attrs, span) in enumerate(ops):
            if i == primary:
                name = layer
            else:
                counts[kind.value] = counts.get(kind.value, 0) + 1
                n = counts[kind.value]
                name = f"{layer}_{kind.value}" + (f"{n}" if n > 1 else "")
            result.append(Op(name, kind, attrs, span))
        return tuple(result)


def _header_span(spec: ast.SpecFile) -> Span:
    """Where a missing header line is reported: the first statement, or the start of an empty file."""
    from ..source import Source

    if spec.statements:
        return spec.statements[0].span
    return Span(Source(spec.path, "\n"), 0, 0)


def expand(spec: ast.SpecFile, path: str | Path | None = None) -> Network:
    """Build the IR of ``spec`` (already parsed from ``path``), resolving its ``extends`` chain."""
    merged = _Merged()
    root = Path(path if path is not None else spec.path).resolve()
    _load(root, (root,), None, merged, spec)
    first = _header_span(spec)

    if merged.network is None:
        raise CndsError("the spec has no `network NAME` line", first, hint="start the file with e.g. `network my_net`")
    if merged.input is None:
        raise CndsError("the spec has no `input CxHxW` line", merged.network.span, hint="e.g. `input 3x227x227`")
    if merged.classes is None:
        raise CndsError("the spec has no `classes N` line", merged.network.span, hint="e.g. `classes 1000`")

    c, h, w = merged.input.dims
    if min(c, h, w) < 1 or c > MAX_INPUT_CHANNELS or max(h, w) > MAX_INPUT_SIZE:
        raise ArgumentError(
            f"input {c}x{h}x{w} is out of range (channels 1..{MAX_INPUT_CHANNELS}, height and width "
            f"1..{MAX_INPUT_SIZE})",
            merged.input.span,
        )
    num_classes, class_names = _classes(merged.classes)
    env: dict[str, Any] = {"classes": num_classes, "__channels__": merged.input.dims[0]}
    defaults = _Defaults(init=_init(merged.init), ceil=_pooling(merged.pooling))
    ex = _Expander(merged, defaults, {"classes": num_classes})

    if not merged.layers:
        raise CndsError("the spec defines no layers", merged.network.span)
    trunk = tuple(ex.layer(name, d) for name, d in merged.layers)
    branches = tuple(_branch(ex, tap, span, st, env) for tap, span, st in merged.supervise)
    train = _section(merged.sections.get("train", {}), TRAIN_KEYS, env, TrainConfig())
    data = _section(merged.sections.get("data", {}), DATA_KEYS, env, DataConfig())
    return Network(
        name=merged.network.name,
        input=Shape(merged.input.dims),
        num_classes=num_classes,
        class_names=class_names,
        trunk=trunk,
        branches=branches,
        train=train,
        data=data,
        span=merged.network.span,
        sources=tuple(merged.sources),
    )


def _classes(decl: ast.ClassesDecl) -> tuple[int, tuple[str, ...]]:
    value = evaluate(decl.value, {})
    if isinstance(value, list):
        if len(value) < 2 or not all(isinstance(v, str) for v in value):
            raise ArgumentError("classes takes a count (>= 2) or a list of at least two quoted class names",
                                decl.value.span)
        if len(set(value)) != len(value):
            raise DuplicateNameError("class names must be unique", decl.value.span)
        return len(value), tuple(value)
    return as_int(value, decl.value.span, "classes", minimum=2), ()


def _init(decl: ast.InitDecl | None) -> ParamInit:
    if decl is None:
        return ParamInit(InitScheme.GAUSSIAN, 0.01, 0.0)
    call = decl.call
    schemes = tuple(s.value for s in InitScheme)
    if call.name not in schemes:
        raise UnknownNameError(
            f"unknown init scheme '{call.name}' (one of {', '.join(schemes)})", call.name_span,
            hint=did_you_mean(call.name, schemes),
        )
    args = [(a.name, evaluate(a.value, {}), a.span) for a in call.args]
    bound, spans = Signature((("std", 0.01), ("bias", 0.0)), lambda *a: None).bind(call.name, call, args)
    bias = bound["bias"]
    bias = None if isinstance(bias, Word) and bias.name == "none" else as_float(bias, spans["bias"], "bias")
    scheme = InitScheme(call.name)
    std = as_float(bound["std"], spans["std"], "std", lo=0.0) if scheme is InitScheme.GAUSSIAN else 0.0
    return ParamInit(scheme, std, bias)


def _pooling(decl: ast.PoolingDecl | None) -> bool:
    if decl is None:
        return False
    if decl.mode not in ("floor", "ceil"):
        raise ArgumentError(
            f"pooling must be floor or ceil, got '{decl.mode}'", decl.span, hint=did_you_mean(decl.mode, ("floor", "ceil"))
        )
    return decl.mode == "ceil"


def _section(settings: dict[str, ast.Setting], keys: dict, env: dict, default):
    values = {}
    for key, setting in settings.items():
        if key not in keys:
            raise UnknownNameError(
                f"unknown setting '{key}' (settings: {', '.join(keys)})", setting.key_span, hint=did_you_mean(key, keys)
            )
        values[key] = keys[key](evaluate(setting.value, env), setting.value.span, env)
    from dataclasses import replace

    return replace(default, **values)


def _branch(ex: _Expander, tap: str, tap_span: Span, st: ast.Supervise, env: dict) -> Branch:
    settings = {}
    for s in st.settings:
        if s.key not in SUPERVISE_KEYS:
            raise UnknownNameError(
                f"unknown supervise setting '{s.key}' (one of {', '.join(SUPERVISE_KEYS)})",
                s.key_span,
                hint=did_you_mean(s.key, SUPERVISE_KEYS),
            )
        if s.key in settings:
            raise DuplicateNameError(f"'{s.key}' given twice", s.key_span)
        settings[s.key] = s
    loss = LossKind.SOFTMAX
    if "loss" in settings:
        s = settings["loss"]
        loss = _LOSSES[as_word(evaluate(s.value, env), s.value.span, "loss", tuple(_LOSSES))]
    alpha0, values = 0.3, ()
    kind = ScheduleKind.LINEAR
    if "weight" in settings:
        s = settings["weight"]
        w = evaluate(s.value, env)
        if isinstance(w, list):
            if not w:
                raise ArgumentError("an explicit weight list needs at least one value", s.value.span)
            values = tuple(as_float(v, s.value.span, "weight", lo=0.0) for v in w)
            alpha0, kind = values[0], ScheduleKind.LIST
        else:
            alpha0 = as_float(w, s.value.span, "weight", lo=0.0)
    if "decay" in settings:
        s = settings["decay"]
        decay = as_word(evaluate(s.value, env), s.value.span, "decay", ("linear", "none", "constant"))
        if kind is ScheduleKind.LIST:
            raise SupervisionError("'decay' does not apply to an explicit list of weights", s.span)
        kind = ScheduleKind.LINEAR if decay == "linear" else ScheduleKind.CONSTANT
    if not st.layers:
        raise SupervisionError(f"the branch on '{tap}' has no layers", st.span)
    seen: dict[str, Span] = {}
    layers = []
    for d in st.layers:
        for name in d.names():
            if name in seen:
                raise DuplicateNameError(
                    f"layer '{name}' defined twice in this branch", d.name_span, notes=((seen[name], "first defined here"),)
                )
            seen[name] = d.name_span
            layers.append(ex.layer(name, d))
    return Branch(tap, tap, loss, WeightSchedule(kind, alpha0, values), tuple(layers), tap_span)
