"""The paper's rule of thumb for where to add supervision, as a pure function of measured gradients.

Section 2 of the paper: run 10–50 back-propagation iterations of the network supervised only at its
final layer (weights N(0, 0.01), biases 0), plot every layer's mean gradient, and add supervision after
the layer where the mean gradient vanishes (falls below 1e-7). For its 13-layer model "gradients tend to
decay every three to four layers" and the branches go after the 10th, 7th and 4th conv layers.

:func:`propose` turns that into an algorithm over the conv layers' *levels*, in trunk order:

1. **Level.** A layer's level is its mean |∂L/∂W| averaged over the last quarter of the probe's
   iterations (at least one), i.e. the value it has "become" by the end of the probe.
2. **Healthy top.** The top conv layer (nearest the main loss) sets the level a loss gives the layer it
   supervises, ``top``. If ``top`` is below the threshold the gradient vanishes right under the main
   loss: a branch cannot supply more than the main loss does, so nothing is proposed (change the
   initialisation instead). If no conv layer is below the threshold nothing is proposed either.
3. **First point (the paper's 8-layer rule).** Going down from the top, the first conv layer whose
   level is below the threshold — where the gradient vanishes.
4. **Further points (deeper nets).** A branch at point ``s`` gives ``s`` a gradient of about ``top``
   again; below ``s`` it decays as the probe measured, by ``level(q) / level(s)``. The next point is
   the first layer ``q`` at least ``min_gap`` conv layers below ``s`` where that restored gradient
   vanishes again: ``top · level(q) / level(s) < threshold``. Repeat until no layer qualifies. With a
   steady decay this puts one branch every *n* layers, *n* being the depth over which the gradient
   falls from ``top`` to the threshold (the paper's "every three to four layers").

Pure Python: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_THRESHOLD = 1e-7
"""The paper's "vanished" level for a mean gradient."""

DEFAULT_MIN_GAP = 2
"""Fewest conv layers between two proposed points (2: never two branches on adjacent conv layers)."""

# Outcomes of :func:`propose`.
PROPOSED = "proposed"
HEALTHY = "healthy"
VANISHES_AT_TOP = "vanishes-at-top"
BRANCHES_KEPT = "branches-kept"
"""Used by ``cnds-probe --keep-branches``: gradients of a supervised net, no proposal made."""


def final_level(series: Sequence[float]) -> float:
    """Mean of the last quarter (at least one) of a layer's per-iteration values."""
    if not series:
        raise ValueError("no values")
    k = max(1, math.ceil(len(series) / 4))
    tail = series[-k:]
    return sum(tail) / len(tail)


@dataclass(frozen=True, slots=True)
class Point:
    """One proposed supervision point."""

    tap: str
    """The conv layer the branch attaches to."""
    index: int
    """1-based position among the trunk's conv layers (the paper's "4th conv")."""
    level: float
    restored_level: float
    """What the rule expects the gradient here to be without this branch: ``level`` for the first
    point, ``top · level / level(previous point)`` for the others."""
    reason: str


@dataclass(frozen=True, slots=True)
class Proposal:
    """Where the rule puts supervision, and why."""

    status: str
    """:data:`PROPOSED`, :data:`HEALTHY` (no layer vanishes), :data:`VANISHES_AT_TOP` or
    :data:`BRANCHES_KEPT`."""
    points: tuple[Point, ...]
    """Proposed points, from the top of the network down (the order the rule finds them)."""
    levels: tuple[tuple[str, float], ...]
    """(conv layer, level) in trunk order."""
    threshold: float
    min_gap: int
    message: str
    """One line for people."""

    @property
    def taps(self) -> tuple[str, ...]:
        """Proposed taps in trunk order (shallow first)."""
        return tuple(p.tap for p in sorted(self.points, key=lambda p: p.index))

    @property
    def vanishing(self) -> tuple[str, ...]:
        """Conv layers whose level is below the threshold."""
        return tuple(name for name, level in self.levels if level < self.threshold)

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "taps": list(self.taps),
            "points": [
                {"tap": p.tap, "conv_index": p.index, "level": p.level, "restored_level": p.restored_level,
                 "reason": p.reason}
                for p in self.points
            ],
            "levels": dict(self.levels),
            "vanishing": list(self.vanishing),
            "threshold": self.threshold,
            "min_gap": self.min_gap,
            "message": self.message,
        }


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def propose(
    levels: Sequence[tuple[str, float]] | Mapping[str, float],
    threshold: float = DEFAULT_THRESHOLD,
    min_gap: int = DEFAULT_MIN_GAP,
) -> Proposal:
    """Apply the rule (module docstring) to conv-layer levels given in trunk order (input side first)."""
    if threshold <= 0:
        raise ValueError("threshold must be > 0")
    if min_gap < 1:
        raise ValueError("min_gap must be >= 1")
    items = tuple(levels.items()) if isinstance(levels, Mapping) else tuple(levels)
    items = tuple((str(n), float(v)) for n, v in items)
    if not items:
        return Proposal(HEALTHY, (), items, threshold, min_gap, "the trunk has no conv layer; nothing to supervise")
    names = [n for n, _ in items]
    values = [v for _, v in items]
    top_name, top = names[-1], values[-1]
    below = [n for n, v in items if v < threshold]
    if not below:
        return Proposal(
            HEALTHY, (), items, threshold, min_gap,
            f"no conv layer's mean gradient falls below {threshold:g} (lowest: "
            f"{names[values.index(min(values))]} {min(values):.3g}): at this initialisation and depth the "
            f"gradient reaches every layer, so the rule places no branch. Batchnorm and fan-in scaled inits "
            f"(kaiming, xavier) keep gradients alive by design; the paper's rule reads nets started at "
            f"N(0, 0.01): probe with --init gaussian (the default), a smaller --std or more --iters to see where "
            f"a branch would help, or add branches by hand for their regularising effect",
        )
    if top < threshold:
        return Proposal(
            VANISHES_AT_TOP, (), items, threshold, min_gap,
            f"the gradient is below {threshold:g} already at the top conv layer {top_name} ({top:.3g}): it "
            f"vanishes everywhere, which is the initialisation's doing, not depth's; a branch cannot give "
            f"more gradient than the main loss does, so nothing is proposed (try a larger --std, "
            f"non-zero --bias or --init spec)",
        )
    points: list[Point] = []
    # First point: the first layer below the threshold, going down from the top.
    first = max(i for i, v in enumerate(values) if v < threshold)
    points.append(Point(
        names[first], first + 1, values[first], values[first],
        f"mean gradient {values[first]:.3g} < {threshold:g}: the gradient vanishes here "
        f"(the {_ordinal(first + 1)} conv layer)",
    ))
    s = first
    while True:
        nxt = None
        for q in range(s - min_gap, -1, -1):
            restored = top * values[q] / values[s] if values[s] > 0 else 0.0
            if restored < threshold:
                nxt = (q, restored)
                break
        if nxt is None:
            break
        q, restored = nxt
        points.append(Point(
            names[q], q + 1, values[q], restored,
            f"below the branch on {names[s]} the gradient keeps decaying ({values[s]:.3g} -> {values[q]:.3g}); "
            f"restored to the top's {top:.3g} it would fall to {restored:.3g} < {threshold:g} here "
            f"(the {_ordinal(q + 1)} conv layer)",
        ))
        s = q
    taps = ", ".join(f"{p.tap} ({_ordinal(p.index)} conv)" for p in sorted(points, key=lambda p: p.index))
    return Proposal(PROPOSED, tuple(points), items, threshold, min_gap, f"supervise after {taps}")
