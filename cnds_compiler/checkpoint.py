"""Checkpoints that lose nothing: written atomically, loaded with ``weights_only=True``, tied to a spec.

A checkpoint is a ``torch.save`` dict:

``format``        ``"cnds-checkpoint"``; ``version`` 1
``model``         full state dict (trunk keys as in the spec, branch keys under ``aux.``)
``optimizer``     optimizer state dict, ``scheduler``: LR scheduler state dict (``None`` for exports)
``epoch``         epochs completed; ``step``: optimizer steps taken
``rng``           RNG states (python, numpy, torch CPU, CUDA) as tensors/lists
``spec_name``     network name; ``spec_text``: IR JSON of the network; ``ir_hash``: ``Network.digest()``
``metrics``       list of per-epoch metric dicts; ``best_val_error``: float or ``None``; ``best_epoch``:
                  the epoch ``best.pt`` holds
``digest``        ``"sha256:<hex>"`` over every other field, tensors by dtype, shape and bytes (see
                  :func:`content_digest`); checkpoints written before it existed load without the check

Every command that reads a checkpoint (``cnds-train --resume`` / ``--init-from``, ``cnds-eval``,
``cnds-compile --weights``) goes through :func:`load_checkpoint`, the one place that decides whether a
file is a usable cnds checkpoint: anything else (a text file, a foreign zip, a pickle with other objects, a
truncated or bit-flipped file, missing, extra, reshaped or retyped tensors) is one :class:`CheckpointError`
naming the file.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import CheckpointError, CorruptCheckpointError
from .io import atomic_write_bytes, file_kind
from .ir import Network

FORMAT = "cnds-checkpoint"
VERSION = 1
DIGEST_KEY = "digest"
#: What a command needs from a checkpoint: ``weights`` the trunk's tensors (export, a bare state dict is
#: enough), ``model`` every tensor of the training module (evaluation of every head), ``training`` that and
#: the optimiser, RNG and progress state (``--resume``).
Need = Literal["weights", "model", "training"]
_MAX_DEPTH = 32  # plain data nested deeper than any checkpoint cnds writes (about 6 levels)


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """The file content of a checkpoint holding ``state``, with its format tag and content digest."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    payload.pop(DIGEST_KEY, None)
    payload[DIGEST_KEY] = content_digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise ``state`` in memory, then write it atomically (temp file + fsync + rename)."""
    atomic_write_bytes(path, checkpoint_bytes(state))


def content_digest(state: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` over every field but the digest itself: dict keys in a stable order, each tensor as
    its dtype, shape and raw bytes, plain values by type and value. torch's zip format stores no checksum
    that ``torch.load`` checks, so without this a flipped bit in a weight loads silently."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY}, 0)
    return "sha256:" + h.hexdigest()


def _feed(h, value: Any, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    if isinstance(value, torch.Tensor):
        t = value.detach()
        h.update(b"T%s%s|" % (str(t.dtype).encode(), repr(tuple(t.shape)).encode()))
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, Mapping):
        h.update(b"d%d|" % len(value))
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key, depth + 1)
            _feed(h, value[key], depth + 1)
    elif isinstance(value, (list, tuple)):
        kind = b"l" if isinstance(value, list) else b"t"
        if value and all(type(v) is int for v in value):  # RNG states: 625 words in one update, not 625
            h.update(b"%sI%d[%s]" % (kind, len(value), ",".join(map(str, value)).encode()))
            return
        h.update(b"%s%d|" % (kind, len(value)))
        for item in value:
            _feed(h, item, depth + 1)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"s%d|" % len(data) + data)
    elif isinstance(value, (bytes, bytearray)):
        h.update(b"y%d|" % len(value) + bytes(value))
    elif isinstance(value, bool) or value is None:
        h.update(b"c%r|" % value)
    elif isinstance(value, int):
        h.update(b"i%d|" % value)
    elif isinstance(value, float):
        h.update(b"f%s|" % value.hex().encode())
    else:  # other plain types torch's weights_only loader admits (dtypes, devices, complex)
        h.update(b"o%s:%s|" % (type(value).__name__.encode(), repr(value).encode()))


def load_checkpoint(path: str | Path, net: Network | None = None, *, need: Need = "weights") -> dict[str, Any]:
    """Read a checkpoint and check it: readable, a cnds checkpoint (or a bare state dict), intact (its
    digest), holding what ``need`` asks for, and, given ``net``, made for that network (its architecture
    hash, and every tensor's name, shape and dtype). Anything else is a :class:`CheckpointError` naming the
    file (:class:`CorruptCheckpointError` when the file is damaged rather than foreign)."""
    path = Path(path)
    ckpt = _normalise(read_checkpoint_file(path), path)
    _check_fields(ckpt, path, need)
    stored = ckpt.get(DIGEST_KEY)
    if stored is not None:
        try:
            actual = content_digest(ckpt)
        except (ValueError, RuntimeError, TypeError) as e:
            raise CorruptCheckpointError(f"checkpoint is corrupt (cannot digest its content: {e})",
                                         path=str(path)) from None
        if actual != stored:
            raise CorruptCheckpointError("checkpoint is corrupt (tensor digest mismatch)", path=str(path))
    if net is not None:
        check_matches(ckpt, net, path, need)
    return ckpt


def read_checkpoint_file(path: Path) -> Any:
    """What ``torch.load(weights_only=True)`` makes of ``path``, or one line saying why there is nothing."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError("no such checkpoint", path=str(path)) from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint ({e.strerror or e})", path=str(path)) from None
    if stat.S_ISDIR(mode):
        raise CheckpointError("is a folder, not a checkpoint file", path=str(path))
    if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
        raise CheckpointError(f"not a regular file ({file_kind(mode)}), so not a checkpoint", path=str(path))
    if path.stat().st_size == 0:
        raise CorruptCheckpointError("checkpoint is empty (0 bytes): a write that never finished?", path=str(path))
    _check_magic(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text here suggests weights_only=False, i.e. running the file's code: never do that
        raise CorruptCheckpointError("cannot read checkpoint: not a torch checkpoint, or it holds objects other "
                                     "than tensors and plain data (never loaded: that could run code)",
                                     path=str(path)) from None
    except Exception as e:  # zip, pickle-stream and tensor-rebuild errors alike: the bytes are not a checkpoint
        text = str(e).strip()
        first = text.splitlines()[0][:160] if text else e.__class__.__name__
        raise CorruptCheckpointError(f"cannot read checkpoint (corrupt or not a torch file): {first}",
                                     path=str(path)) from None


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
"""How a torch file starts: a zip archive (torch >= 1.6), or a pickle stream (the legacy format)."""


def _check_magic(path: Path) -> None:
    """Name what a file is when it is plainly not a torch file, rather than echo the unpickler's riddle."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint ({e.strerror or e})", path=str(path)) from None
    if head.startswith(_TORCH_MAGIC):
        return
    text = head.decode("utf-8", errors="ignore")  # 64 bytes may end inside a character
    kind = "text" if text and all(c.isprintable() or c in "\t\r\n" for c in text) else None
    if kind is None and (head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8")):
        kind = "an image"
    shown = f" (it is {kind}: {head[:24]!r})" if kind else f" (it starts with {head[:8]!r})"
    raise CorruptCheckpointError(f"not a torch checkpoint file{shown}", path=str(path))


def _normalise(obj: Any, path: Path) -> dict[str, Any]:
    """A cnds checkpoint dict; a bare state dict (``torch.save(model.state_dict())``) is wrapped as one."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"not a cnds checkpoint: the file holds a {type(obj).__name__}, not a dict",
                              path=str(path))
    tag, version = obj.get("format"), obj.get("version")
    if isinstance(tag, str) and tag == FORMAT:  # (a tensor compared with == answers with a tensor)
        if type(version) is not int or version != VERSION:
            shown = version if type(version) is int else type(version).__name__
            raise CheckpointError(f"checkpoint version {shown} is not supported", path=str(path))
        if not all(isinstance(k, str) for k in obj):
            raise CheckpointError("malformed checkpoint: a field name that is not a string", path=str(path))
        return obj
    if "format" not in obj and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"format": FORMAT, "version": VERSION, "model": obj}  # a bare state dict
    if "format" in obj:
        shown = repr(tag[:40]) if isinstance(tag, str) else f"a {type(tag).__name__}"
        raise CheckpointError(f"not a cnds checkpoint (format {shown})", path=str(path))
    raise CheckpointError("not a cnds checkpoint (no 'format' field) nor a state dict of tensors", path=str(path))


# field -> (accepted types, what it must be); checked whenever present
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((dict,), "a state dict"),
    "optimizer": ((dict, type(None)), "an optimizer state dict"),
    "epoch": ((int,), "a count"),
    "step": ((int,), "a count"),
    "rng": ((dict,), "RNG states"),
    "spec_name": ((str,), "a name"),
    "spec_text": ((str,), "IR JSON text"),
    "ir_hash": ((str,), "a hash"),
    "train_config": ((str,), "JSON text"),
    "metrics": ((list,), "a list of per-epoch records"),
    "best_val_error": ((float, int, type(None)), "a number"),
    "best_epoch": ((int, type(None)), "an epoch number"),
    "grad_log": ((list,), "a list of records"),
    DIGEST_KEY: ((str,), "a digest string"),
}


def _check_fields(ckpt: dict[str, Any], path: Path, need: Need) -> None:
    """The fields the commands read have the types they assume, so no command fails later with a traceback."""
    where = str(path)

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"malformed checkpoint: '{field}' {why}", path=where)

    for field, (types, what) in _FIELDS.items():
        if field in ckpt and (not isinstance(ckpt[field], types) or isinstance(ckpt[field], bool)):
            raise bad(field, f"is a {type(ckpt[field]).__name__}, not {what}")
    for field in ("epoch", "step"):
        if field in ckpt and ckpt[field] < 0:
            raise bad(field, f"is negative ({ckpt[field]})")
    best = ckpt.get("best_val_error")
    if best is not None and not math.isfinite(best):
        raise bad("best_val_error", f"is not finite ({best})")
    model = ckpt.get("model")
    if not model:
        raise CheckpointError("checkpoint holds no weights ('model' is missing or empty)", path=where)
    for key, value in model.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise bad("model", f"maps {str(key)[:60]!r} to a {type(value).__name__}; a state dict maps names to tensors")
        if value.layout is not torch.strided or value.is_quantized or value.is_complex():
            raise bad("model", f"holds '{key}' as a {value.layout} {value.dtype} tensor; weights are dense real tensors")
    if need != "training":
        return
    if ckpt.get("optimizer") is None or "epoch" not in ckpt or "rng" not in ckpt:
        raise CheckpointError("checkpoint has no training state to resume from (an export or a bare state "
                              "dict); use --init-from to start a new run from its weights", path=where)
    optimizer = ckpt["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise bad("optimizer", "lacks 'state' or 'param_groups'")
    if not _rng_states_well_formed(ckpt["rng"]):
        raise bad("rng", "does not hold the python, numpy and torch RNG states cnds-train saves")
    for i, record in enumerate(ckpt.get("metrics", [])):
        if not (isinstance(record, dict) and isinstance(record.get("epoch"), int)
                and isinstance(record.get("val_top1_error"), dict)
                and isinstance(record["val_top1_error"].get("main"), (int, float))):
            raise bad("metrics", f"record {i} is not an epoch record")
    if len(ckpt.get("metrics", [])) > ckpt["epoch"]:
        raise bad("metrics", f"has {len(ckpt['metrics'])} records for {ckpt['epoch']} epochs")


def _rng_states_well_formed(rng: dict[str, Any]) -> bool:
    """The shapes :func:`cnds_compiler.train.state.rng_state` writes (python's Mersenne Twister: 625 words;
    numpy's: 624 words; torch's CPU generator: a byte tensor), so restoring them cannot fail half-way."""
    def words(values, n: int) -> bool:
        return len(values) == n and all(type(v) is int and 0 <= v < 2**32 for v in values)

    py, np_state, cpu = rng.get("python"), rng.get("numpy"), rng.get("torch")
    py_ok = (isinstance(py, (tuple, list)) and len(py) == 3 and type(py[0]) is int
             and isinstance(py[1], (tuple, list)) and words(py[1][:-1], 624) and type(py[1][-1]) is int
             and (py[2] is None or isinstance(py[2], float)))
    np_ok = (isinstance(np_state, (tuple, list)) and len(np_state) == 5 and np_state[0] == "MT19937"
             and isinstance(np_state[1], torch.Tensor) and np_state[1].dtype == torch.int64
             and tuple(np_state[1].shape) == (624,) and bool(((np_state[1] >= 0) & (np_state[1] < 2**32)).all())
             and type(np_state[2]) is int and 0 <= np_state[2] <= 624 and type(np_state[3]) is int
             and isinstance(np_state[4], float))
    cpu_ok = isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.ndim == 1
    cuda = rng.get("cuda", [])
    cuda_ok = isinstance(cuda, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                      for t in cuda)
    return py_ok and np_ok and cpu_ok and cuda_ok


def check_matches(ckpt: dict[str, Any], net: Network, path: str | Path, need: Need = "weights") -> None:
    """A checkpoint belongs to ``net`` when its architecture hash matches (when it has one) and its
    tensors are the ones ``build_module(net)`` holds: same names (the trunk's suffice for ``need="weights"``),
    shapes and dtypes (any real floating type where the model is floating: it is converted on load), and
    every value finite."""
    digest = ckpt.get("ir_hash")
    if digest is not None and digest != net.digest() and _v1_digest(ckpt) != net.digest():
        other = ckpt.get("spec_name", "another network")
        made = (f"an earlier version of '{other}' whose layers differ" if other == net.name else f"'{other}'")
        raise CheckpointError(
            f"checkpoint was made from {made} (architecture hash {digest}), not from '{net.name}' "
            f"(architecture hash {net.digest()}); use --init-from to copy the weights that still fit",
            path=str(path),
        )
    expected = expected_tensors(net)
    model = ckpt["model"]
    required = [k for k in expected if need != "weights" or not k.startswith("aux.")]
    missing = [k for k in required if k not in model]
    extra = [k for k in model if k not in expected]
    wrong = [k for k, v in model.items() if k in expected and tuple(v.shape) != expected[k][0]]
    retyped = [k for k, v in model.items() if k in expected and not _dtype_fits(v.dtype, expected[k][1])]

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    problem = (f"missing {some(missing)}" if missing else f"unexpected tensors {some(extra)}" if extra else
               f"shape mismatch at {some(wrong)}" if wrong else f"wrong dtype at {some(retyped)}" if retyped else None)
    if problem is None:
        nonfinite = [k for k, v in model.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if nonfinite:
            problem = f"non-finite values in {some(nonfinite)} (a diverged run?)"
    if problem:
        if missing and need == "model" and not [k for k in missing if not k.startswith("aux.")]:
            problem += " (a trunk-only state dict: every supervision head is evaluated here)"
        raise CheckpointError(f"weights do not fit '{net.name}': {problem}", path=str(path))


def _dtype_fits(found: torch.dtype, wanted: torch.dtype) -> bool:
    return found == wanted or (found.is_floating_point and wanted.is_floating_point)


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


_EXPECTED: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}


def expected_tensors(net: Network) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """State-dict key → (shape, dtype) of the module ``build_module(net)`` would make, without building it
    (remembered per architecture hash: the fuzz test and repeated loads ask for the same network)."""
    key = net.digest()
    if key not in _EXPECTED:
        from .backends.pytorch import build_module

        module = build_module(net, materialize=False)
        _EXPECTED[key] = {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
    return _EXPECTED[key]


def expected_shapes(net: Network) -> dict[str, tuple[int, ...]]:
    """State-dict key → shape of the module ``build_module(net)`` would make, without building it."""
    return {k: shape for k, (shape, _) in expected_tensors(net).items()}
