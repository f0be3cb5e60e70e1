"""Whole-graph invariants: unique module and layer names, taps that name trunk layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import DuplicateNameError, SupervisionError, UnknownNameError, did_you_mean
from ..ir import Layer, Network
from ..source import Span


def _check_unique(layers: tuple[Layer, ...], where: str) -> None:
    seen: dict[str, Span] = {}
    for layer in layers:
        for op in layer.ops:
            if op.name in seen:
                first = seen[op.name]
                what = "layer" if op.name == layer.name else f"op name (from layer '{layer.name}')"
                raise DuplicateNameError(
                    f"{what} '{op.name}' is used twice in {where}", layer.span, notes=((first, "first used here"),)
                )
            seen[op.name] = layer.span


@dataclass(frozen=True)
class Verify:
    """Names are unique per module scope and every supervision tap names a trunk layer."""

    name: ClassVar[str] = "verify"
    requires: ClassVar[tuple[str, ...]] = ()

    def apply(self, net: Network) -> Network:
        _check_unique(net.trunk, "the trunk")
        trunk_names = [layer.name for layer in net.trunk]
        branch_names: dict[str, Span] = {}
        for branch in net.branches:
            if branch.name in branch_names:
                raise DuplicateNameError(
                    f"two branches named '{branch.name}'", branch.span, notes=((branch_names[branch.name], "first here"),)
                )
            branch_names[branch.name] = branch.span
            if branch.tap not in trunk_names:
                raise UnknownNameError(
                    f"supervision point '{branch.tap}' is not a layer of the trunk",
                    branch.span,
                    hint=did_you_mean(branch.tap, trunk_names),
                )
            if branch.tap == trunk_names[-1]:
                raise SupervisionError(
                    f"'{branch.tap}' is the network's output layer; supervision branches attach to intermediate layers",
                    branch.span,
                )
            _check_unique(branch.layers, f"the branch on '{branch.tap}'")
        return net
