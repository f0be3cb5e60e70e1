"""onnxruntime vs PyTorch: the parity check every export runs, and a quiet CPU session."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ExportError

PARITY_TOLERANCE = 1e-4
"""fp32 onnxruntime vs PyTorch: max |difference| ≤ 1e-4 × max(1, max |reference|)."""


@dataclass(frozen=True, slots=True)
class ParityCheck:
    """onnxruntime vs PyTorch on the same random input."""

    batch: int
    max_abs_diff: float
    max_abs_ref: float
    tolerance: float | None
    """``None`` when the difference is only reported (reduced precision)."""

    @property
    def ok(self) -> bool:
        return self.tolerance is None or self.max_abs_diff <= self.tolerance

    def describe(self, precision: str) -> str:
        against = "PyTorch fp32" if precision != "fp32" else "PyTorch"
        text = (f"onnxruntime ({precision}) vs {against} on random input, batch {self.batch}: "
                f"max |diff| {self.max_abs_diff:.2e}")
        if self.tolerance is None:
            return text + f" (outputs up to {self.max_abs_ref:.3g}; reported, not checked)"
        bound = f"{PARITY_TOLERANCE:g}" if self.tolerance == PARITY_TOLERANCE else f"{self.tolerance:.2e}"
        return text + f" <= {bound}: ok"


def cpu_session(model_bytes: bytes, threads: int | None = None):
    """A quiet onnxruntime CPU session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def check_parity(model_bytes: bytes, module: nn.Module, input_name: str, *, batch: int = 3,
                 tolerance: float | None = PARITY_TOLERANCE, seed: int = 0) -> ParityCheck:
    """Run ``module`` (fp32) and the ONNX model on the same random ``batch``; compare every output."""
    c, h, w = module.plan.network.input.dims
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, h, w, generator=gen)
    with torch.inference_mode():
        ref = [r.numpy() for r in module(x)]
    got = cpu_session(model_bytes).run(None, {input_name: x.numpy()})
    shapes = [(g.shape, r.shape) for g, r in zip(got, ref, strict=True) if g.shape != r.shape]
    if shapes:
        raise ExportError(f"onnxruntime output shapes differ from PyTorch's at batch {batch}: {shapes}")
    diff = max(float(np.max(np.abs(g.astype(np.float64) - r))) for g, r in zip(got, ref, strict=True))
    scale = max(float(np.max(np.abs(r))) for r in ref)
    if not all(np.isfinite(g).all() for g in got):
        diff = float("inf")
    tol = None if tolerance is None else tolerance * max(1.0, scale)
    check = ParityCheck(batch, diff, scale, tol)
    if not check.ok:
        raise ExportError(f"onnxruntime and PyTorch disagree: max |diff| {diff:.3g} > {tol:.3g} "
                          f"(outputs up to {scale:.3g})")
    return check


