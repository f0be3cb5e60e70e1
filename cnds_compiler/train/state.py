"""What a run restores besides weights: RNG states, optimiser state on resume, and ``--init-from``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..errors import CheckpointError

# ---- RNG state ---------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """RNG states in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict[str, Any],
                           path: str | Path) -> None:
    """Put a checked checkpoint's weights, optimiser state and RNG states into a fresh model and optimiser
    (what ``--resume`` does); whatever still does not fit is a :class:`CheckpointError` naming the file."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # torch does not compare buffer shapes until a step fails
            for p in group["params"]:
                for name, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.ndim and value.shape != p.shape:
                        raise ValueError(f"optimizer buffer '{name}' has shape {tuple(value.shape)}, "
                                         f"its parameter {tuple(p.shape)}")
        set_rng_state(ckpt["rng"])
    except Exception as e:  # torch's and numpy's own checks: wrong keys, group sizes, state lengths
        text = str(e).strip()
        first = text.splitlines()[0][:160] if text else type(e).__name__
        raise CheckpointError(f"malformed checkpoint: cannot restore the training state ({first})",
                              path=str(path)) from None


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Lay every optimiser buffer out like its parameter (after a change of memory layout, e.g. a run resumed
    in the other one). torch's fused CPU SGD reads a momentum buffer as if it had its parameter's strides: a
    channels-last parameter with a contiguous buffer would be updated with a scrambled momentum, silently."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def saved_channels_last(ckpt: dict[str, Any]) -> bool:
    """Whether a checkpoint's run trained in channels-last layout. Checkpoints written before runs recorded it
    tell by their weights: ``torch.save`` keeps strides, and a channels-last run's conv kernels larger than
    1x1 are stored channels-last, not contiguous."""
    if "channels_last" in ckpt:
        return bool(ckpt["channels_last"])
    return any(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2:] != (1, 1) and not t.is_contiguous()
               and t.is_contiguous(memory_format=torch.channels_last) for t in ckpt.get("model", {}).values())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- init-from ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitReport:
    copied: tuple[str, ...]
    """Tensors copied (every tensor of each copied layer)."""
    shape_mismatch: tuple[str, ...]
    """Tensors whose shape differs in the source."""
    left_random: tuple[str, ...]
    """Tensors left as initialised (their layer did not fit as a whole)."""
    copied_layers: tuple[str, ...] = ()
    left_layers: tuple[tuple[str, str], ...] = ()
    """(layer, why) for every layer left as initialised."""

    def format(self, source: str) -> str:
        lines = [f"init-from {source}: copied {len(self.copied_layers)} layers ({len(self.copied)} tensors), "
                 f"{len(self.left_layers)} layers left as initialised"]
        if self.copied_layers:
            lines.append("  copied:      " + ", ".join(self.copied_layers))
        if self.left_layers:
            lines.append("  left as initialised: " + ", ".join(f"{name} ({why})" for name, why in self.left_layers))
        return "\n".join(lines)


def init_from(model: torch.nn.Module, path: str | Path) -> InitReport:
    """Copy from another model's checkpoint (any spec) every layer whose tensors all match by name and
    shape — whole layers or nothing: a layer whose weight does not fit keeps its own bias and batchnorm
    statistics too, so no layer mixes two networks."""
    source = load_checkpoint(path)["model"]
    own = model.state_dict()
    layers: dict[str, list[str]] = {}
    for key in own:
        layers.setdefault(key.rsplit(".", 1)[0], []).append(key)
    copied, mismatch, left, copied_layers, left_layers = [], [], [], [], []
    with torch.no_grad():
        for layer, keys in layers.items():
            absent = [k for k in keys if k not in source]
            wrong = [k for k in keys if k in source and tuple(source[k].shape) != tuple(own[k].shape)]
            retyped = [k for k in keys if k in source and k not in wrong and source[k].dtype != own[k].dtype
                       and not (source[k].is_floating_point() and own[k].is_floating_point())]
            nonfinite = [k for k in keys if k in source and k not in wrong and source[k].is_floating_point()
                         and not bool(torch.isfinite(source[k]).all())]
            if absent or wrong or retyped or nonfinite:
                mismatch.extend(wrong)
                left.extend(keys)
                short = lambda ks: ", ".join(k.rsplit(".", 1)[1] for k in ks)  # noqa: E731
                reasons = ((wrong, "shape differs"), (retyped, "dtype differs"), (nonfinite, "non-finite"),
                           (absent, "not in the source"))
                why = "; ".join(f"{short(ks)} {what}" for ks, what in reasons if ks)
                left_layers.append((layer, why))
                continue
            for k in keys:
                own[k].copy_(source[k])
            copied.extend(keys)
            copied_layers.append(layer)
    return InitReport(tuple(copied), tuple(mismatch), tuple(left), tuple(copied_layers), tuple(left_layers))
