"""Validation: top-k error counts of the main head and of every branch head."""

from __future__ import annotations

import torch


def topk_error_counts(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Number of examples whose label is not among the top-k logits, for each k: an int64 tensor on the
    logits' device (no host sync; callers add them up and read them once)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(labels.unsqueeze(1))
    return torch.stack([(~hit[:, : min(k, maxk)].any(dim=1)).sum() for k in ks])


def topk_errors(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of examples whose label is not among the top-k logits, for each k."""
    return [int(v) for v in topk_error_counts(logits, labels, ks).tolist()]


@torch.no_grad()
def evaluate(model, loader, device, branches: tuple[str, ...], ten_crop: bool = False, reduce=None,
             per_class: torch.Tensor | None = None, stats: dict | None = None):
    """Top-1/top-5 error of the main head and of every branch head over ``loader``.

    ``per_class``, a ``(classes, 2)`` float64 tensor, accumulates per true class the examples seen and the
    main head's top-1 mistakes. ``stats["nonfinite"]`` counts examples whose main logits are not finite."""
    heads = ("main",) + branches
    # counts stay on the device and are read once at the end: no host sync per batch
    errors = torch.zeros(len(heads), 2, dtype=torch.int64, device=device)
    count = torch.zeros(1, dtype=torch.int64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    skipped = 0
    was_training = model.training
    model.eval()
    try:
        for images, labels, n_skipped in loader:
            skipped += int(n_skipped)
            images, labels = images.to(device), labels.to(device)
            if ten_crop:  # (B, 10, C, H, W): average the softmax over crops
                b, n = images.shape[:2]
                out = model(images.flatten(0, 1), branches=branches)
                outs = {"main": out.logits, **out.aux}
                outs = {k: v.float().softmax(1).view(b, n, -1).mean(1) for k, v in outs.items()}
            else:
                out = model(images, branches=branches)
                outs = {"main": out.logits.float(), **{k: v.float() for k, v in out.aux.items()}}
            for row, h in enumerate(heads):
                errors[row] += topk_error_counts(outs[h], labels)
            if stats is not None:
                nonfinite += (~torch.isfinite(outs["main"])).any(1).sum()
            if per_class is not None:
                classes = per_class.shape[0]
                wrong = outs["main"].argmax(1) != labels
                per_class[:, 0] += torch.bincount(labels.cpu(), minlength=classes).double()
                per_class[:, 1] += torch.bincount(labels[wrong].cpu(), minlength=classes).double()
            count += labels.shape[0]
    finally:
        model.train(was_training)
    if stats is not None:
        stats["nonfinite"] = stats.get("nonfinite", 0) + int(nonfinite)
    totals = torch.cat([count, errors.flatten()])
    if reduce is not None:
        totals = reduce(totals)
    totals = totals.tolist()
    n = max(1.0, float(totals[0]))
    top1 = {h: totals[1 + 2 * row] / n for row, h in enumerate(heads)}
    top5 = {h: totals[2 + 2 * row] / n for row, h in enumerate(heads)}
    return top1, top5, skipped
