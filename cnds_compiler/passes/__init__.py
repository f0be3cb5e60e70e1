"""Passes over the IR, run as an explicit ordered pipeline.

Order (``DEFAULT_PIPELINE``) and why:

1. ``verify``            unique names, taps that exist: everything later may look names up.
2. ``check-supervision`` taps on convolutional layers at or before the last conv; needs only layer
                         order, and runs before shapes so a misplaced branch is reported as such
                         rather than as a shape error inside the branch.
3. ``infer-shapes``      every op's input/output shape; branch and trunk outputs = classes.
4. ``count-costs``       parameters and FLOPs per op; needs shapes.

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

    return {"verify": _verify, "check-supervision": _supervision, "infer-shapes": _shapes, "count-costs": _costs}


DEFAULT_PIPELINE: tuple[str, ...] = ("verify", "check-supervision", "infer-shapes", "count-costs")

PassCallback = Callable[[Pass, Network, Network, float], None]
"""Called after every pass with (pass, IR before, IR after, seconds)."""


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

    def apply(self, net: Network) -> Network:
        for p in self.passes:
            start = time.perf_counter()
            after = p.apply(net)
            if self.callback is not None:
                self.callback(p, net, after, time.perf_counter() - start)
            net = after
        return net
