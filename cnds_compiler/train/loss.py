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


class LossTally:
    """An epoch's per-head training-loss sums and its non-finite-loss check, on the loss's device.

    A step only keeps its detached loss tensors (:meth:`add`: no device operation — each would cost a
    dispatch on CPU, a kernel launch on a GPU); :meth:`fold` adds the pending steps to the sums with a few
    operations and reads one flag from the device, so the host waits on the device only when the loop
    asks (every ``SYNC_EVERY`` steps and at the epoch's end).
    """

    def __init__(self, heads: tuple[str, ...], device: torch.device) -> None:
        self.heads = heads
        self.sums = torch.zeros(len(heads), dtype=torch.float32, device=device)
        self._zero = torch.zeros((), dtype=torch.float32, device=device)
        self._totals: list[torch.Tensor] = []
        self._parts: list[dict[str, torch.Tensor]] = []

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """One micro-batch's total loss and its per-head parts (a head missing from ``parts`` adds 0)."""
        self._totals.append(loss.detach())
        self._parts.append(parts)

    def fold(self) -> bool:
        """Add the pending micro-batches to :attr:`sums`; True when one of their total losses is not finite."""
        if not self._totals:
            return False
        columns = [torch.stack([p.get(k, self._zero) for p in self._parts]) for k in self.heads]
        self.sums += torch.stack(columns).sum(dim=1)
        finite = bool(torch.isfinite(torch.stack(self._totals)).all())
        self._totals.clear()
        self._parts.clear()
        return not finite
