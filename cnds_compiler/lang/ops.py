"""Built-in ops: their parameters, defaults and how bound arguments become typed IR attributes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ArgumentError
from ..ir import (
    BatchNormAttrs,
    Conv2dAttrs,
    DropoutAttrs,
    InitScheme,
    LinearAttrs,
    LrnAttrs,
    NoAttrs,
    OpKind,
    ParamInit,
    PoolAttrs,
)
from ..source import Span
from .values import REQUIRED, Signature, Word, as_float, as_int, as_pair, as_word


@dataclass(frozen=True)
class OpSignature(Signature):
    """A built-in op's parameters and the function that builds its attributes from bound values."""

    build: Callable[[dict[str, Any], dict[str, Span], Defaults], Any]


@dataclass(frozen=True)
class Defaults:
    """Network-wide defaults an op falls back on."""

    init: ParamInit
    ceil: bool


def _param_init(bound: dict, spans: dict, d: Defaults) -> ParamInit:
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


def _conv(b: dict, s: dict, d: Defaults) -> Conv2dAttrs:
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


def _pool(b: dict, s: dict, d: Defaults) -> PoolAttrs:
    kernel = as_pair(b["kernel"], s["kernel"], "kernel")
    stride = kernel if b["stride"] is None else as_pair(b["stride"], s["stride"], "stride")
    pad = as_pair(b["pad"], s["pad"], "pad", minimum=0)
    if pad[0] * 2 > kernel[0] or pad[1] * 2 > kernel[1]:
        raise ArgumentError(f"pad {pad[0]} is more than half the kernel {kernel[0]}", s["pad"])
    ceil = d.ceil if b["round"] is None else as_word(b["round"], s["round"], "round", ("floor", "ceil")) == "ceil"
    return PoolAttrs(kernel, stride, pad, ceil)


_WEIGHT_PARAMS = (("bias", None), ("std", None), ("init", None))

SIGNATURES: dict[OpKind, Signature] = {
    OpKind.CONV2D: OpSignature(
        (("out", REQUIRED), ("kernel", REQUIRED), ("stride", 1), ("pad", 0), ("groups", 1), ("dilation", 1))
        + _WEIGHT_PARAMS,
        _conv,
    ),
    OpKind.MAXPOOL: OpSignature((("kernel", REQUIRED), ("stride", None), ("pad", 0), ("round", None)), _pool),
    OpKind.AVGPOOL: OpSignature((("kernel", REQUIRED), ("stride", None), ("pad", 0), ("round", None)), _pool),
    OpKind.RELU: OpSignature((), lambda b, s, d: NoAttrs()),
    OpKind.GAP: OpSignature((), lambda b, s, d: NoAttrs()),
    OpKind.FLATTEN: OpSignature((), lambda b, s, d: NoAttrs()),
    OpKind.DROPOUT: OpSignature(
        (("p", 0.5),), lambda b, s, d: DropoutAttrs(as_float(b["p"], s["p"], "dropout p", 0.0, 0.99))
    ),
    OpKind.LRN: OpSignature(
        (("size", 5), ("alpha", 1e-4), ("beta", 0.75), ("k", 1.0)),
        lambda b, s, d: LrnAttrs(
            as_int(b["size"], s["size"], "lrn size"),
            as_float(b["alpha"], s["alpha"], "alpha", lo=0.0),
            as_float(b["beta"], s["beta"], "beta", lo=0.0),
            as_float(b["k"], s["k"], "k", lo=0.0),
        ),
    ),
    OpKind.BATCHNORM: OpSignature(
        (("eps", 1e-5), ("momentum", 0.1)),
        lambda b, s, d: BatchNormAttrs(
            as_float(b["eps"], s["eps"], "eps", lo=1e-12), as_float(b["momentum"], s["momentum"], "momentum", 0.0, 1.0)
        ),
    ),
    OpKind.LINEAR: OpSignature(
        (("out", REQUIRED),) + _WEIGHT_PARAMS,
        lambda b, s, d: LinearAttrs(as_int(b["out"], s["out"], "linear out features"), _param_init(b, s, d)),
    ),
}
GRAPH_OPS = {OpKind.CONCAT: "concat", OpKind.ADD: "add"}
"""Ops that read the values named as their arguments: ``concat(a, b, ...)``, ``add(a, b, ...)``."""
BUILTIN_OPS = {kind.value: kind for kind in OpKind if kind is not OpKind.INPUT}
