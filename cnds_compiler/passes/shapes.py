"""Shape inference for every node of the graph, in order, over a name → shape table.

Pooling follows PyTorch's rule, which is Caffe's when ``ceil`` is set: out = ⌈(in + 2p − k)/s⌉ + 1,
minus one when the last window would start in the padding. Linear layers flatten a feature map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from ..errors import ShapeError
from ..ir import MAIN_HEAD, MULTI_INPUT, Head, Network, Node, OpKind, Shape


def conv_out(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def pool_out(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    span = size + 2 * pad - kernel
    out = (math.ceil(span / stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1  # the last window must start inside the input or its left padding
    return out


def _fail(node: Node, message: str) -> ShapeError:
    return ShapeError(f"{node.group or node.name}: {message}", node.span)


def infer_op(op: Node, x: Shape) -> Shape:
    """Output shape of single-input ``op`` on input ``x``; a :class:`ShapeError` at its span when it cannot apply."""
    a = op.attrs
    kind = op.kind
    if kind in (OpKind.CONV2D, OpKind.MAXPOOL, OpKind.AVGPOOL, OpKind.LRN, OpKind.GAP) and not x.spatial:
        raise _fail(op, f"{kind.value} needs a CxHxW feature map, but its input is a vector of {x.dims[0]}")
    if kind is OpKind.CONV2D:
        c, h, w = x.dims
        if c % a.groups:
            raise _fail(op, f"{c} input channels are not divisible by groups={a.groups}")
        eff = [a.dilation[i] * (a.kernel[i] - 1) + 1 for i in (0, 1)]
        if eff[0] > h + 2 * a.pad[0] or eff[1] > w + 2 * a.pad[1]:
            raise _fail(op, f"{a.kernel[0]}x{a.kernel[1]} kernel does not fit the {h}x{w} input (pad {a.pad[0]})")
        oh = conv_out(h, a.kernel[0], a.stride[0], a.pad[0], a.dilation[0])
        ow = conv_out(w, a.kernel[1], a.stride[1], a.pad[1], a.dilation[1])
        return Shape((a.out_channels, oh, ow))
    if kind in (OpKind.MAXPOOL, OpKind.AVGPOOL):
        c, h, w = x.dims
        if a.kernel[0] > h + 2 * a.pad[0] or a.kernel[1] > w + 2 * a.pad[1]:
            raise _fail(op, f"{a.kernel[0]}x{a.kernel[1]} pooling window does not fit the {h}x{w} input")
        return Shape((c, pool_out(h, a.kernel[0], a.stride[0], a.pad[0], a.ceil),
                      pool_out(w, a.kernel[1], a.stride[1], a.pad[1], a.ceil)))
    if kind is OpKind.FLATTEN:
        return Shape((x.numel,))
    if kind is OpKind.GAP:
        return Shape((x.dims[0], 1, 1))
    if kind is OpKind.LINEAR:
        return Shape((a.out_features,))
    return x  # relu, dropout, lrn, batchnorm keep the shape


def _join(node: Node, shapes: list[Shape], net: Network) -> Shape:
    """Output of concat/add; a mismatch shows every input with its shape and where it is defined."""
    notes = tuple((net.node(i).span, f"'{i}' is {s}") for i, s in zip(node.inputs, shapes, strict=True))
    if node.kind is OpKind.CONCAT:
        if not all(s.spatial for s in shapes) or len({s.dims[1:] for s in shapes}) > 1:
            listed = ", ".join(str(s) for s in shapes)
            raise ShapeError(f"{node.group or node.name}: concat joins feature maps of equal HxW along channels; "
                             f"got {listed}", node.span, notes=notes)
        return Shape((sum(s.dims[0] for s in shapes), *shapes[0].dims[1:]))
    if len(set(shapes)) > 1:
        listed = ", ".join(str(s) for s in shapes)
        raise ShapeError(f"{node.group or node.name}: add needs inputs of one shape; got {listed}", node.span,
                         notes=notes, hint="project the shortcut, e.g. conv2d(c, 1, stride=s) batchnorm")
    return shapes[0]


def _check_classifier(net: Network, head: Head, y: Shape) -> None:
    if y.spatial or y.dims[0] != net.num_classes:
        node = net.node(head.node)
        what = "the network" if head.name == MAIN_HEAD else f"the branch on '{net.tap_name(head)}'"
        group = node.group or node.name
        span = next((st.span for st in net.statements if st.name == group), node.span)
        shown = group.split(".", 1)[1] if head.name != MAIN_HEAD and "." in group else group
        raise ShapeError(
            f"{what} ends in '{shown}' with output {y}, but the spec declares {net.num_classes} classes",
            span,
            hint="end it with e.g. `linear(classes)`",
        )


@dataclass(frozen=True)
class InferShapes:
    """Fill ``in_shape``/``out_shape`` of every node over a name → shape table; every head must end in
    ``classes`` logits."""

    name: ClassVar[str] = "infer-shapes"
    requires: ClassVar[tuple[str, ...]] = ("verify",)  # inputs are defined before use

    def apply(self, net: Network) -> Network:
        table: dict[str, Shape] = {}
        nodes = []
        for node in net.nodes:
            if node.kind is OpKind.INPUT:
                y = x = net.input
            else:
                shapes = [table[i] for i in node.inputs]
                x = shapes[0]
                y = _join(node, shapes, net) if node.kind in MULTI_INPUT else infer_op(node, x)
            table[node.name] = y
            nodes.append(replace(node, in_shape=x, out_shape=y))
        for head in net.heads:
            _check_classifier(net, head, table[head.node])
        return replace(net, nodes=tuple(nodes))
