"""Dead-code elimination from chosen outputs (torch.fx ``eliminate_dead_code``, driven by outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..ir import Network


@dataclass(frozen=True)
class Prune:
    """Keep only the nodes that ``outputs`` (value or node names; default: every head) need, and the heads
    whose logits survive. The deploy network is ``Prune((main head, *features))``: which nodes were
    branch-only follows from the graph, nothing is flagged by hand."""

    name: ClassVar[str] = "prune"
    requires: ClassVar[tuple[str, ...]] = ("verify",)  # ancestors need a well-formed graph
    outputs: tuple[str, ...] = ()

    def apply(self, net: Network) -> Network:
        keep = [net.resolve(o) for o in self.outputs] if self.outputs else [h.node for h in net.heads]
        return net.prune(keep)
