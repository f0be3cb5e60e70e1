"""Learning-rate policies of the spec's ``train`` section, as epoch → multiplier functions."""

from __future__ import annotations

import math

from ..ir import LrPolicy


def lr_factor(policy: LrPolicy, epoch: int, total_epochs: int) -> float:
    """Multiplier of the base learning rate at 0-based ``epoch``."""
    if policy.kind == "step":
        return policy.gamma ** (epoch // policy.every)
    if policy.kind == "multistep":
        return policy.gamma ** sum(1 for m in policy.milestones if epoch >= m)
    if policy.kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, total_epochs)))
    if policy.kind == "poly":
        return max(0.0, 1.0 - epoch / max(1, total_epochs)) ** policy.power
    return 1.0
