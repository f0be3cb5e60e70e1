"""Supervision points tap convolutional feature maps that the main path still convolves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import SupervisionError
from ..ir import Network, OpKind


def _descendants(net: Network, start: str) -> set[str]:
    users = net.users()
    seen: set[str] = set()
    stack = [start]
    while stack:
        for user in users[stack.pop()]:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


_PASS_THROUGH = frozenset({OpKind.RELU, OpKind.CONCAT, OpKind.ADD, OpKind.BATCHNORM, OpKind.LRN, OpKind.DROPOUT})


def _conv_output(net: Network, name: str) -> bool:
    """The value is convolution outputs, joined or normalised but not pooled (an inception module's concat)."""
    stack, seen = [name], set()
    while stack:
        node = net.node(stack.pop())
        if node.kind is OpKind.CONV2D:
            return True
        if node.kind in _PASS_THROUGH and node.name not in seen:
            seen.add(node.name)
            stack.extend(node.inputs)
    return False


@dataclass(frozen=True)
class CheckSupervision:
    """A head taps a convolutional feature map: a value that a later convolution of the main path reads,
    directly or not, or one made of convolution outputs (its statement holds a conv, or it joins convs
    without pooling, as an inception module's concat) — on a chain: at or before the last conv layer (the
    paper's branches sit after the 4th conv)."""

    name: ClassVar[str] = "check-supervision"
    requires: ClassVar[tuple[str, ...]] = ("verify",)  # taps name nodes

    def apply(self, net: Network) -> Network:
        main = net.main_nodes()
        convs = [n for n in net.nodes if n.kind is OpKind.CONV2D and n.name in main]
        for head in net.supervision_heads:
            tap = net.node(head.tap)
            if head.tap not in main:
                continue  # a head on another head's branch: that head was checked
            later = _descendants(net, head.tap)
            same_statement = any(c.group == tap.group for c in convs)
            if any(c.name in later for c in convs) or same_statement or _conv_output(net, tap.name):
                continue
            last = net.groups(convs)[-1].name if convs else None
            where = f"after the last convolution ('{last}')" if last else "in a network without convolutions"
            raise SupervisionError(
                f"branch attached to '{net.tap_name(head)}', {where}; supervision points tap convolutional "
                "feature maps",
                head.span,
                hint=f"attach it to '{last}' or an earlier conv layer" if last else None,
            )
        return net
