"""Pick onnxruntime execution providers quietly: CUDA only when a GPU is really usable, else CPU.

``onnxruntime-gpu`` lists the CUDA provider even on machines without a GPU; asking for it there logs
loud errors before falling back. So the CUDA driver is asked first (``cuInit``/``cuDeviceGetCount``
through ctypes: no torch, no CUDA toolkit needed) and CUDA is requested only when it reports a device.
"""

from __future__ import annotations

import ctypes
import functools
import os

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@functools.cache
def gpu_usable() -> bool:
    """True when the CUDA driver loads and sees at least one device (honours ``CUDA_VISIBLE_DEVICES``)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return False
    try:
        if lib.cuInit(0) != 0:
            return False
        count = ctypes.c_int(0)
        return lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except (AttributeError, OSError):
        return False


def choose_providers(device: str = "auto") -> list[str]:
    """Providers for ``device``: ``"auto"`` (CUDA when usable, else CPU), ``"cuda"`` or ``"cpu"``."""
    import onnxruntime as ort

    if device == "cpu":
        return [CPU]
    available = ort.get_available_providers()
    cuda_ok = CUDA in available and gpu_usable()
    if device == "cuda":
        if not cuda_ok:
            from .errors import ModelError

            why = "this onnxruntime has no CUDA provider" if CUDA not in available else "no usable GPU found"
            raise ModelError(f"device 'cuda' requested but {why}")
        ort.set_default_logger_severity(3)
        return [CUDA, CPU]
    if device != "auto":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    if cuda_ok:
        # A CUDA provider that cannot load its libraries logs through the default logger and falls back
        # to CPU; keep that to errors only (CndsModel.providers tells what really runs).
        ort.set_default_logger_severity(3)
        return [CUDA, CPU]
    return [CPU]
