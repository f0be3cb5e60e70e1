"""What a deployed model computes: ``prune(main head + requested features)`` of the graph, so no node that
only supervision heads need is in it. Pure Python (IR → IR); the torch and ONNX stages live beside it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UnknownNameError, UnsupportedError, did_you_mean
from ..ir import INPUT_NODE, Network

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
    """``prune(main head + features)``: no branch node, nothing the outputs do not need."""
    outputs: tuple[tuple[str, str], ...]
    """(graph output name, node name), in the order asked for."""
    pruned: tuple[str, ...]
    """Trunk statements none of whose nodes the outputs need (not in the graph)."""

    @property
    def removed_branches(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.source.supervision_heads)

    def value_name(self, output: str, node: str) -> str:
        """The spec's name for an output: the classifier statement for ``logits``, else the name asked for."""
        return self.source.trunk[-1].name if output == LOGITS else output

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
    """Resolve ``features`` (any value or node name of the trunk, ``logits``; default: logits only) against
    ``net``; the deploy network is ``prune(main head + features)``.

    Raises:
        UnknownNameError: names that are no value of the network (all listed, with a "did you mean").
        UnsupportedError: names of nodes only supervision heads need (deploy models have no branches).
    """
    main = net.main_nodes()
    statements = [layer.name for layer in net.trunk]
    wanted = list(features) if features else [LOGITS]
    resolved: dict[str, str] = {}
    unknown, in_branch = [], []
    branch_statements = {st.name.split(".", 1)[1]: st.name for st in net.statements
                         if "." in st.name and st.name.split(".", 1)[0] in {h.name for h in net.supervision_heads}}
    for name in wanted:
        if name == LOGITS:
            continue
        try:
            node = net.resolve(name)
        except KeyError:
            if name in branch_statements:  # a branch's own statement name (`fc1` of the branch conv3_2)
                in_branch.append((name, branch_statements[name]))
            else:
                unknown.append(name)
            continue
        if node in main and node != INPUT_NODE:
            resolved[name] = node
        else:
            in_branch.append((name, name))
    where = net.span.source.name
    if unknown:
        hint = did_you_mean(unknown[0], [*statements, *(n.name for n in net.nodes if n.name in main), LOGITS])
        listed = ", ".join(f"'{n}'" for n in unknown)
        raise UnknownNameError(
            f"--features: no trunk layer named {listed} in '{net.name}'" + (f" ({hint})" if hint else "")
            + f"; its layers: {', '.join(statements)}, or 'logits'", path=where)
    if in_branch:
        heads = {h.name: {n.name for n in net.head_nodes(h)} for h in net.supervision_heads}
        listed = ", ".join(
            f"'{shown}' (branch '{next((h for h, ns in heads.items() if net.resolve(n) in ns), '?')}')"
            for shown, n in in_branch)
        raise UnsupportedError(f"--features: {listed} belong to supervision branches, which deploy models "
                               "do not have; pick trunk layers", path=where)
    outputs: dict[str, str] = {}
    for name in wanted:
        node = net.main.node if name == LOGITS else resolved[name]
        out = LOGITS if node == net.main.node else name
        outputs.setdefault(out, node)
    deploy = net.prune(list(outputs.values()))
    kept = {n.name for n in deploy.nodes}
    pruned = tuple(layer.name for layer in net.trunk if not any(op.name in kept for op in layer.ops))
    return DeployPlan(net, deploy, tuple(outputs.items()), pruned)
