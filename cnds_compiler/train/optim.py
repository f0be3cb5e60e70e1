"""The optimiser of a run: Caffe-style parameter groups and the fastest update path torch offers."""

from __future__ import annotations

import torch

from ..ir import TrainConfig
from .schedule import lr_factor


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Weights: lr, weight decay. Biases: lr × bias_lr_mult, decay × bias_decay. Norm scales: no decay."""
    weights, biases, norms = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".bias"):
            biases.append(p)
        elif p.ndim == 1:
            norms.append(p)
        else:
            weights.append(p)
    groups = [
        {"params": weights, "lr_mult": 1.0, "weight_decay": cfg.weight_decay},
        {"params": biases, "lr_mult": cfg.bias_lr_mult, "weight_decay": cfg.weight_decay * cfg.bias_decay},
        {"params": norms, "lr_mult": 1.0, "weight_decay": 0.0},
    ]
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    return [g for g in groups if g["params"]]


def _update_path(model: torch.nn.Module) -> dict[str, bool]:
    """The fastest update torch offers for these parameters: the fused kernel (one pass over every tensor
    of a group, trunk and branches alike; on CPU 2-4x faster than the per-tensor loop for CNDS-8) where all
    parameters are floating point on a device it supports, else the multi-tensor ``foreach`` path."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    params = [p for p in model.parameters() if p.requires_grad]
    supported = set(_get_fused_kernels_supported_devices())
    if params and all(p.is_floating_point() and p.device.type in supported for p in params):
        return {"fused": True}
    return {"foreach": True}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, update: dict[str, bool] | None = None
                   ) -> torch.optim.Optimizer:
    """The spec's optimiser over :func:`param_groups`. A parameter without a gradient in a step (a branch
    whose α is 0 is not computed) is skipped by every update path: no momentum, no weight decay.

    ``update`` chooses the update path (``{"foreach": False}`` is torch's per-tensor loop); default
    :func:`_update_path`. A resumed run keeps the path its checkpoint was saved with (torch restores it
    with the optimiser's state), so resuming stays bit-exact."""
    groups = param_groups(model, cfg)
    update = _update_path(model) if update is None else update
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **update)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, **update)
    return torch.optim.AdamW(groups, lr=cfg.lr, **update)


def set_epoch_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int) -> float:
    lr = cfg.lr * lr_factor(cfg.lr_policy, epoch, cfg.epochs)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr
