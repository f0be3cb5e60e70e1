"""Shape inference for every op of the trunk and of every branch.

Pooling follows PyTorch's rule, which is Caffe's when ``ceil`` is set: out = ⌈(in + 2p − k)/s⌉ + 1,
minus one when the last window would start in the padding. Linear layers flatten a feature map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from ..errors import ShapeError
from ..ir import Layer, Network, Op, OpKind, Shape


def conv_out(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def pool_out(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    span = size + 2 * pad - kernel
    out = (math.ceil(span / stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1  # the last window must start inside the input or its left padding
    return out


def _fail(op: Op, layer: Layer, message: str) -> ShapeError:
    return ShapeError(f"{layer.name}: {message}", op.span)


def infer_op(op: Op, layer: Layer, x: Shape) -> Shape:
    """Output shape of ``op`` on input ``x``; a :class:`ShapeError` at the op's span when it cannot apply."""
    a = op.attrs
    kind = op.kind
    if kind in (OpKind.CONV2D, OpKind.MAXPOOL, OpKind.AVGPOOL, OpKind.LRN, OpKind.GAP) and not x.spatial:
        raise _fail(op, layer, f"{kind.value} needs a CxHxW feature map, but its input is a vector of {x.dims[0]}")
    if kind is OpKind.CONV2D:
        c, h, w = x.dims
        if c % a.groups:
            raise _fail(op, layer, f"{c} input channels are not divisible by groups={a.groups}")
        eff = [a.dilation[i] * (a.kernel[i] - 1) + 1 for i in (0, 1)]
        if eff[0] > h + 2 * a.pad[0] or eff[1] > w + 2 * a.pad[1]:
            raise _fail(
                op, layer, f"{a.kernel[0]}x{a.kernel[1]} kernel does not fit the {h}x{w} input (pad {a.pad[0]})"
            )
        oh = conv_out(h, a.kernel[0], a.stride[0], a.pad[0], a.dilation[0])
        ow = conv_out(w, a.kernel[1], a.stride[1], a.pad[1], a.dilation[1])
        return Shape((a.out_channels, oh, ow))
    if kind in (OpKind.MAXPOOL, OpKind.AVGPOOL):
        c, h, w = x.dims
        if a.kernel[0] > h + 2 * a.pad[0] or a.kernel[1] > w + 2 * a.pad[1]:
            raise _fail(op, layer, f"{a.kernel[0]}x{a.kernel[1]} pooling window does not fit the {h}x{w} input")
        return Shape((c, pool_out(h, a.kernel[0], a.stride[0], a.pad[0], a.ceil),
                      pool_out(w, a.kernel[1], a.stride[1], a.pad[1], a.ceil)))
    if kind is OpKind.GAP:
        return Shape((x.dims[0], 1, 1))
    if kind is OpKind.LINEAR:
        return Shape((a.out_features,))
    return x  # relu, dropout, lrn, batchnorm keep the shape


def infer_layers(layers: tuple[Layer, ...], x: Shape) -> tuple[tuple[Layer, ...], Shape]:
    out = []
    for layer in layers:
        ops = []
        for op in layer.ops:
            y = infer_op(op, layer, x)
            ops.append(replace(op, in_shape=x, out_shape=y))
            x = y
        out.append(replace(layer, ops=tuple(ops)))
    return tuple(out), x


def _check_classifier(layers: tuple[Layer, ...], y: Shape, classes: int, what: str) -> None:
    last = layers[-1]
    if y.spatial or y.dims[0] != classes:
        raise ShapeError(
            f"{what} ends in '{last.name}' with output {y}, but the spec declares {classes} classes",
            last.span,
            hint="end it with e.g. `linear(classes)`",
        )


@dataclass(frozen=True)
class InferShapes:
    """Fill ``in_shape``/``out_shape`` of every op; the trunk and each branch must end in ``classes`` logits."""

    name: ClassVar[str] = "infer-shapes"
    requires: ClassVar[tuple[str, ...]] = ("verify",)  # taps name trunk layers

    def apply(self, net: Network) -> Network:
        trunk, y = infer_layers(net.trunk, net.input)
        _check_classifier(trunk, y, net.num_classes, "the network")
        by_name = {layer.name: layer for layer in trunk}
        branches = []
        for b in net.branches:
            layers, y = infer_layers(b.layers, by_name[b.tap].out_shape)
            _check_classifier(layers, y, net.num_classes, f"the branch on '{b.tap}'")
            branches.append(replace(b, layers=layers))
        return replace(net, trunk=trunk, branches=tuple(branches))
