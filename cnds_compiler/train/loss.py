"""The deep-supervision objective: L = L₀ + Σ_b α_t⁽ᵇ⁾ L_b (eq. 1 generalised to any number of branches)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ir import LossKind, Network


def squared_hinge(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One-vs-rest squared hinge (DSN's companion loss): mean over the batch of Σ_k max(0, 1 − y_k s_k)²."""
    signs = -torch.ones_like(logits)
    signs.scatter_(1, labels.unsqueeze(1), 1.0)
    return F.relu(1.0 - signs * logits).pow(2).sum(dim=1).mean()


def head_loss(kind: LossKind, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()  # mixed precision: losses in fp32
    if kind is LossKind.SOFTMAX:
        return F.cross_entropy(logits, labels)
    return squared_hinge(logits, labels)


def alphas(net: Network, epoch: int, total_epochs: int) -> dict[str, float]:
    """α of every branch at 0-based ``epoch`` (eq. 2 for linear decay: α₀(1 − t/N))."""
    return {b.name: b.schedule.alpha(epoch, total_epochs) for b in net.branches}


def deep_supervision_loss(
    net: Network,
    logits: torch.Tensor,
    aux: dict[str, torch.Tensor],
    labels: torch.Tensor,
    weights: dict[str, float],
    main_loss: LossKind = LossKind.SOFTMAX,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts (``main`` and one entry per computed branch, unweighted, detached for logs).

    Branches missing from ``aux`` (not computed because their α is 0) contribute nothing.
    """
    total = head_loss(main_loss, logits, labels)
    parts = {"main": total.detach()}
    for b in net.branches:
        if b.name in aux:
            branch_loss = head_loss(b.loss, aux[b.name], labels)
            parts[b.name] = branch_loss.detach()
            total = total + weights[b.name] * branch_loss
    return total, parts
