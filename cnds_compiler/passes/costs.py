"""Parameters and FLOPs per op (per example)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from ..ir import Network, Node, OpKind


def op_cost(op: Node) -> tuple[int, int]:
    """(parameters, FLOPs): 2 FLOPs per multiply-accumulate in conv/linear, else 1 per element visited."""
    a, x, y = op.attrs, op.in_shape, op.out_shape
    if op.kind is OpKind.CONV2D:
        fan_in = (x.dims[0] // a.groups) * a.kernel[0] * a.kernel[1]
        params = a.out_channels * fan_in + (a.out_channels if a.init.bias is not None else 0)
        return params, 2 * fan_in * y.numel
    if op.kind is OpKind.LINEAR:
        params = a.out_features * x.numel + (a.out_features if a.init.bias is not None else 0)
        return params, 2 * x.numel * a.out_features
    if op.kind is OpKind.BATCHNORM:
        return 2 * x.dims[0], 2 * x.numel
    if op.kind in (OpKind.MAXPOOL, OpKind.AVGPOOL):
        return 0, y.numel * a.kernel[0] * a.kernel[1]
    if op.kind is OpKind.LRN:
        return 0, x.numel * (a.size + 3)
    if op.kind in (OpKind.DROPOUT, OpKind.INPUT, OpKind.CONCAT, OpKind.FLATTEN):
        return 0, 0  # identity at inference; a copy
    if op.kind is OpKind.ADD:
        return 0, y.numel * (len(op.inputs) - 1)
    return 0, x.numel  # relu, gap


@dataclass(frozen=True)
class CountCosts:
    """Fill ``params`` and ``flops`` of every node; needs ``infer-shapes`` first."""

    name: ClassVar[str] = "count-costs"
    requires: ClassVar[tuple[str, ...]] = ("infer-shapes",)  # costs are computed from shapes

    def apply(self, net: Network) -> Network:
        nodes = []
        for node in net.nodes:
            params, flops = op_cost(node)
            nodes.append(replace(node, params=params, flops=flops))
        return replace(net, nodes=tuple(nodes))
