"""Checkpoints that lose nothing: written atomically, loaded with ``weights_only=True``, tied to a spec.

A checkpoint is a ``torch.save`` dict:

``format``        ``"cnds-checkpoint"``; ``version`` 1
``model``         full state dict (trunk keys as in the spec, branch keys under ``aux.``)
``optimizer``     optimizer state dict, ``scheduler``: LR scheduler state dict (``None`` for exports)
``epoch``         epochs completed; ``step``: optimizer steps taken
``rng``           RNG states (python, numpy, torch CPU, CUDA) as tensors/lists
``spec_name``     network name; ``spec_text``: IR JSON of the network; ``ir_hash``: ``Network.digest()``
``metrics``       list of per-epoch metric dicts; ``best_val_error``: float or ``None``
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .io import atomic_write_bytes
from .ir import Network

FORMAT = "cnds-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise ``state`` in memory, then write it atomically (temp file + fsync + rename)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, net: Network | None = None) -> dict[str, Any]:
    """Read a checkpoint; refuse a corrupt file, a foreign file, or one made from another network."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such checkpoint", path=str(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text here suggests weights_only=False, i.e. running the file's code: never do that
        raise CheckpointError("cannot read checkpoint: not a torch checkpoint, or it holds objects other than "
                              "tensors and plain data", path=str(path)) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"cannot read checkpoint (corrupt or not a torch file): {first}", path=str(path)) from None
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        if ckpt.get("version") != VERSION:
            raise CheckpointError(f"checkpoint version {ckpt.get('version')} is not supported", path=str(path))
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"format": FORMAT, "version": VERSION, "model": ckpt}  # a bare state dict
    else:
        raise CheckpointError("not a cnds checkpoint (no 'format' field)", path=str(path))
    if net is not None:
        check_matches(ckpt, net, path)
    return ckpt


def check_matches(ckpt: dict[str, Any], net: Network, path: str | Path) -> None:
    """A checkpoint belongs to ``net`` when its IR hash matches (or, for bare state dicts, its keys and shapes)."""
    digest = ckpt.get("ir_hash")
    if digest is not None:
        if digest != net.digest() and _v1_digest(ckpt) != net.digest():
            other = ckpt.get("spec_name", "another network")
            made = (f"an earlier version of '{other}' whose layers differ" if other == net.name else f"'{other}'")
            raise CheckpointError(
                f"checkpoint was made from {made} (architecture hash {digest}), not from '{net.name}' "
                f"(architecture hash {net.digest()}); use --init-from to copy the weights that still fit",
                path=str(path),
            )
        return
    expected = expected_shapes(net)
    model = ckpt["model"]
    trunk = {k: v for k, v in model.items() if not k.startswith("aux.")}
    wrong = [k for k, v in trunk.items() if k in expected and tuple(v.shape) != expected[k]]
    missing = [k for k in expected if not k.startswith("aux.") and k not in trunk]
    if wrong or missing:
        detail = (f"shape mismatch at {wrong[:3]}" if wrong else f"missing {missing[:3]}")
        raise CheckpointError(f"weights do not fit '{net.name}': {detail}", path=str(path))


def _v1_digest(ckpt: dict[str, Any]) -> str | None:
    """The IR v2 digest of a checkpoint saved with IR v1 (its stored IR read by the v1 reader, which maps a
    chain to the graph it lowers to today), so checkpoints from before the graph IR keep loading."""
    from .errors import IRFormatError
    from .serialize import loads

    text = ckpt.get("spec_text")
    if not isinstance(text, str) or '"ir_version": 1' not in text:
        return None
    try:
        return loads(text).digest()
    except IRFormatError:
        return None


def expected_shapes(net: Network) -> dict[str, tuple[int, ...]]:
    """State-dict key → shape of the module ``build_module(net)`` would make, without building it."""
    from .backends.pytorch import build_module

    module = build_module(net, materialize=False)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}
