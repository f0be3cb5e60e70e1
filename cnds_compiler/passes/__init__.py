"""Passes over the IR, run as an explicit ordered pipeline.

Before the passes, the stage ``lower`` builds the IR graph from the spec's AST (``lang.lower``); it runs
under the same callback (``PassPipeline.run_stage``), so ``--time-passes`` and ``--print-between-passes``
see it. Order (``DEFAULT_PIPELINE``) and why:

1. ``verify``            like ``torch.fx Graph.lint``: unique names, inputs defined before use, heads that
                         exist and reach the input, no two modules on one path; warns about values
                         nothing uses. Everything later may assume a well-formed graph.
2. ``check-supervision`` heads tap convolutional feature maps that a later convolution of the main path
                         still reads; runs before shapes so a misplaced branch is reported as such
                         rather than as a shape error inside the branch.
3. ``infer-shapes``      every node's shape over a name → shape table (concat checks HxW, add checks
                         equality); every head ends in ``classes`` logits.
4. ``count-costs``       parameters and FLOPs per node; needs shapes.

``prune`` (not in the default pipeline) keeps only what chosen outputs need: the deploy network is
``prune(main head + requested features)``.

Each pass is a small frozen dataclass with a ``name`` and ``apply(net) -> net``; passes never mutate
their input (the IR is frozen) and return a new :class:`~cnds_compiler.ir.Network`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from ..ir import Network


class Pass(Protocol):
    name: str
    requires: tuple[str, ...]
    """Passes that must run earlier in the same pipeline."""

    def apply(self, net: Network) -> Network: ...


def get_all_passes() -> dict[str, Callable[[], type]]:
    """Pass name → loader; listing passes imports none of them."""

    def _verify():
        from .verify import Verify

        return Verify

    def _shapes():
        from .shapes import InferShapes

        return InferShapes

    def _supervision():
        from .supervision import CheckSupervision

        return CheckSupervision

    def _costs():
        from .costs import CountCosts

        return CountCosts

    def _prune():
        from .prune import Prune

        return Prune

    return {"verify": _verify, "check-supervision": _supervision, "infer-shapes": _shapes, "count-costs": _costs,
            "prune": _prune}


DEFAULT_PIPELINE: tuple[str, ...] = ("verify", "check-supervision", "infer-shapes", "count-costs")

PassCallback = Callable[[Pass, Network | None, Network, float], None]
"""Called after every pass with (pass, IR before, IR after, seconds); before the passes, once for the
``lower`` stage with IR before ``None``."""

LOWER_STAGE = "lower"


@dataclass(frozen=True)
class Stage:
    """A named step that is not a pass (the AST → IR lowering), reported through the same callback."""

    name: str


@dataclass(frozen=True)
class PassPipeline:
    passes: tuple[Pass, ...]
    callback: PassCallback | None = None

    @classmethod
    def from_names(cls, names: Iterable[str] = DEFAULT_PIPELINE, callback: PassCallback | None = None):
        registry = get_all_passes()
        passes = []
        for name in names:
            if name not in registry:
                raise ValueError(f"unknown pass '{name}' (passes: {', '.join(registry)})")
            p = registry[name]()()
            missing = [r for r in p.requires if r not in {q.name for q in passes}]
            if missing:
                raise ValueError(f"pass '{name}' needs {', '.join(repr(m) for m in missing)} to run before it")
            passes.append(p)
        return cls(tuple(passes), callback)

    def run_stage(self, name: str, build: Callable[[], Network]) -> Network:
        """Run ``build`` (a stage that makes the IR, such as the lowering) under the callback."""
        start = time.perf_counter()
        net = build()
        if self.callback is not None:
            self.callback(Stage(name), None, net, time.perf_counter() - start)
        return net

    def apply(self, net: Network) -> Network:
        for p in self.passes:
            start = time.perf_counter()
            after = p.apply(net)
            if self.callback is not None:
                self.callback(p, net, after, time.perf_counter() - start)
            net = after
        return net
