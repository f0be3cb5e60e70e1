"""Whole-graph invariants, like ``torch.fx Graph.lint``: a graph that passes may be walked in order."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

from ..errors import (
    DuplicateNameError,
    IRFormatError,
    SpecWarning,
    SupervisionError,
    UnknownNameError,
    did_you_mean,
)
from ..ir import INPUT_NODE, MAIN_HEAD, Network, OpKind
from ..source import Span


def module_path(net: Network, name: str, main: frozenset[str] | None = None) -> str:
    """Where a node's module sits in the PyTorch module: its name, under ``aux.`` when only supervision
    heads need it (so trunk checkpoints stay clean and the deploy model is the state dict minus ``aux.``)."""
    main = net.main_nodes() if main is None else main
    return name if name in main else "aux." + name


@dataclass(frozen=True)
class Verify:
    """Unique node names; every input defined before use; one input node, first; heads that exist, main
    first, each reaching the input; no module path inside another node's module. Warns about statements
    whose value nothing uses (they are left out of every module)."""

    name: ClassVar[str] = "verify"
    requires: ClassVar[tuple[str, ...]] = ()

    def apply(self, net: Network) -> Network:
        seen: dict[str, Span] = {}
        for i, node in enumerate(net.nodes):
            if node.name in seen:
                raise DuplicateNameError(f"the name '{node.name}' is defined twice", node.span,
                                         notes=((seen[node.name], "first defined here"),))
            if (node.kind is OpKind.INPUT) != (i == 0) or (i == 0 and node.name != INPUT_NODE):
                raise IRFormatError(f"the graph must start with its one input node '{INPUT_NODE}'", node.span)
            for name in node.inputs:
                if name not in seen:
                    later = any(n.name == name for n in net.nodes[i:])
                    raise UnknownNameError(
                        f"'{node.name}' reads '{name}', which is " + ("defined later" if later else "not defined"),
                        node.span, hint=None if later else did_you_mean(name, seen))
            seen[node.name] = node.span
        self._check_heads(net, seen)
        self._check_module_paths(net)
        self._warn_unused(net)
        return net

    @staticmethod
    def _check_heads(net: Network, seen: dict[str, Span]) -> None:
        names: dict[str, Span] = {}
        for i, head in enumerate(net.heads):
            if (head.name == MAIN_HEAD) != (i == 0):
                raise IRFormatError(f"the main head comes first and only once (found '{head.name}')", head.span)
            if head.name in names:
                raise DuplicateNameError(f"two heads named '{head.name}'", head.span,
                                         notes=((names[head.name], "first here"),))
            names[head.name] = head.span
            if head.node not in seen:
                raise UnknownNameError(f"head '{head.name}' reads '{head.node}', which is not a node", head.span)
            if head.tap is not None and head.tap not in seen:
                raise UnknownNameError(f"head '{head.name}' taps '{head.tap}', which is not a node", head.span)
            if INPUT_NODE not in net.ancestors([head.node]):
                raise SupervisionError(f"head '{head.name}' does not reach the network's input", head.span)
            if i and head.tap == net.main.node:
                raise SupervisionError(
                    f"'{net.tap_name(head)}' is the network's output layer; supervision branches attach to "
                    "intermediate layers", head.span)

    @staticmethod
    def _check_module_paths(net: Network) -> None:
        main = net.main_nodes()
        owners = {module_path(net, n.name, main): n for n in net.nodes
                  if n.kind not in (OpKind.INPUT, OpKind.CONCAT, OpKind.ADD)}
        for path, node in owners.items():
            parts = path.split(".")
            for k in range(1, len(parts)):
                outer = owners.get(".".join(parts[:k]))
                if outer is not None:
                    raise DuplicateNameError(
                        f"'{node.name}' would be a module inside '{outer.name}', which is an op; rename one",
                        node.span, notes=((outer.span, f"'{outer.name}' defined here"),))

    @staticmethod
    def _warn_unused(net: Network) -> None:
        live = net.ancestors([h.node for h in net.heads])
        warned: set[Span] = set()
        for st in net.statements:
            if st.output not in live and st.span not in warned:
                warned.add(st.span)  # once per statement, not once per instance of its block
                warnings.warn(SpecWarning(
                    f"the value of '{st.name}' is never used (no head reads it); it is left out of the network",
                    st.span, hint="read it in a later statement (e.g. concat(...)) or delete it"), stacklevel=2)
