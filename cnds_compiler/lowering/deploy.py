"""What a deployed model computes: the trunk without supervision branches, cut after the deepest layer
whose output is asked for. Pure Python (IR → IR); the torch and ONNX stages live beside it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..errors import UnknownNameError, UnsupportedError, did_you_mean
from ..ir import Network

LOGITS = "logits"
"""Graph output name of the classifier's logits (``--features ...,logits``)."""
PRECISIONS = ("fp32", "fp16", "int8")
"""Precisions an export can have."""


@dataclass(frozen=True, slots=True)
class DeployPlan:
    """The deploy network and the graph outputs it must produce."""

    source: Network
    """The spec's network, branches included (its digest is the checkpoint's IR hash)."""
    network: Network
    """No branches; trunk cut after the deepest requested layer."""
    outputs: tuple[tuple[str, str], ...]
    """(graph output name, trunk layer name), in the order asked for."""
    pruned: tuple[str, ...]
    """Trunk layers above the deepest requested one (not in the graph)."""

    @property
    def removed_branches(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.source.branches)

    @property
    def has_logits(self) -> bool:
        return any(name == LOGITS for name, _ in self.outputs)


def parse_features(text: str | None) -> tuple[str, ...] | None:
    """``"fc7, pool5"`` → ``("fc7", "pool5")``; ``None`` or empty → ``None`` (logits only)."""
    if not text:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    return names or None


def plan_deploy(net: Network, features: Sequence[str] | None = None) -> DeployPlan:
    """Resolve ``features`` (trunk layer names, ``logits``; default: logits only) against ``net``.

    Raises:
        UnknownNameError: names that are no trunk layer (all listed, with a "did you mean").
        UnsupportedError: names of supervision-branch layers (deploy models have no branches).
    """
    trunk = [layer.name for layer in net.trunk]
    last = trunk[-1]
    wanted = list(features) if features else [LOGITS]
    branch_of = {layer.name: b.name for b in net.branches for layer in b.layers}
    unknown = [n for n in wanted if n != LOGITS and n not in trunk]
    in_branch = [n for n in unknown if n in branch_of]
    unknown = [n for n in unknown if n not in branch_of]
    where = net.span.source.name
    if unknown:
        hint = did_you_mean(unknown[0], [*trunk, LOGITS])
        listed = ", ".join(f"'{n}'" for n in unknown)
        raise UnknownNameError(
            f"--features: no trunk layer named {listed} in '{net.name}'" + (f" ({hint})" if hint else "")
            + f"; its layers: {', '.join(trunk)}, or 'logits'", path=where)
    if in_branch:
        listed = ", ".join(f"'{n}' (branch '{branch_of[n]}')" for n in in_branch)
        raise UnsupportedError(f"--features: {listed} belong to supervision branches, which deploy models "
                               "do not have; pick trunk layers", path=where)
    outputs: dict[str, str] = {}
    for name in wanted:
        layer = last if name == LOGITS else name
        out = LOGITS if layer == last else layer
        outputs.setdefault(out, layer)
    deepest = max(trunk.index(layer) for layer in outputs.values())
    deploy = replace(net, branches=(), trunk=net.trunk[: deepest + 1])
    return DeployPlan(net, deploy, tuple(outputs.items()), tuple(trunk[deepest + 1:]))
