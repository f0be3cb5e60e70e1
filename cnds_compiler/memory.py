"""Will it fit? Memory a network needs, estimated from the checked IR before any tensor is allocated.

Pure Python (no torch): parameter counts come from the ``count-costs`` pass, activation sizes from the
inferred shapes. Training holds, per process, the fp32 parameters, their gradients, the optimiser's state
(SGD with momentum: one buffer per parameter; Adam/AdamW: two) and the activations autograd keeps for the
backward pass, which we take as every node's output for the micro-batch. That is an estimate (allocator
slack, cuDNN workspaces and transient gradients come on top), meant to refuse what cannot work before a
process is killed by the OOM killer half-way through building it, not to predict the peak to the byte.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from .errors import ArgumentError, MemoryBudgetError
from .ir import Network

GIB = 1024**3
FP32_BYTES = 4

_STATE_BUFFERS = {"sgd": 1, "adam": 2, "adamw": 2}
"""Optimiser state per parameter, in parameter-sized buffers (SGD without momentum keeps none)."""


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes a network needs, by kind."""

    params: int
    """Parameter count (trunk and branches)."""
    param_bytes: int
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0
    batch: int = 0
    """Examples whose activations are counted (0: weights only)."""
    spec: str | None = None
    """The spec file the network came from (named in the error)."""

    @property
    def total(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    def describe(self) -> str:
        parts = [f"parameters {gib(self.param_bytes)} ({self.params:,})"]
        if self.grad_bytes:
            parts.append(f"gradients {gib(self.grad_bytes)}")
        if self.optimizer_bytes:
            parts.append(f"optimiser state {gib(self.optimizer_bytes)}")
        if self.activation_bytes:
            parts.append(f"activations for a batch of {self.batch} {gib(self.activation_bytes)}")
        return " + ".join(parts)


def gib(n: int | float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 100 else f"{n / 1024**2:,.1f} MiB"


def parameter_count(net: Network) -> int:
    return sum(node.params or 0 for node in net.nodes)


def weights_estimate(net: Network) -> MemoryEstimate:
    """The module's fp32 parameters alone (what building it allocates)."""
    params = parameter_count(net)
    return MemoryEstimate(params, params * FP32_BYTES, spec=_spec_of(net))


def _spec_of(net: Network) -> str | None:
    span = getattr(net, "span", None)
    return span.source.name if span is not None else None


def training_estimate(net: Network, micro_batch: int, optimizer: str, momentum: float) -> MemoryEstimate:
    """One training process: parameters, gradients, optimiser state and the activations of ``micro_batch``
    examples (every node's output, the input included)."""
    params = parameter_count(net)
    buffers = _STATE_BUFFERS.get(optimizer, 2)
    if optimizer == "sgd" and momentum == 0:
        buffers = 0
    per_example = sum(node.out_shape.numel for node in net.nodes if node.out_shape is not None)
    return MemoryEstimate(
        params, params * FP32_BYTES, grad_bytes=params * FP32_BYTES, optimizer_bytes=params * FP32_BYTES * buffers,
        activation_bytes=per_example * micro_batch * FP32_BYTES, batch=micro_batch, spec=_spec_of(net),
    )


def available_ram() -> int | None:
    """Memory the OS can give without swapping (psutil when installed, else ``MemAvailable`` of
    /proc/meminfo); ``None`` when neither tells (the check is then skipped)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - not installed, or no answer on this platform
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def budget_from_gib(gib_value: float | None) -> int | None:
    """``--memory-budget GiB`` (or ``CNDS_MEMORY_BUDGET_GIB``) in bytes; ``None`` when neither is given."""
    if gib_value is None:
        text = os.environ.get("CNDS_MEMORY_BUDGET_GIB", "").strip()
        if not text:
            return None
        try:
            gib_value = float(text)
        except ValueError:
            gib_value = math.nan
        if not (gib_value > 0 and math.isfinite(gib_value)):
            raise ArgumentError(f"CNDS_MEMORY_BUDGET_GIB must be a positive number of GiB, got {text!r}")
    if not (gib_value > 0 and math.isfinite(gib_value)):  # the flags' argparse type refuses these first
        raise ArgumentError(f"the memory budget must be a positive number of GiB, got {gib_value}")
    return int(gib_value * GIB)


def check_fits(estimate: MemoryEstimate, budget: int | None, where: str, *, processes: int = 1,
               flag: str = "--memory-budget GiB") -> None:
    """Raise :class:`MemoryBudgetError` (one line: the need, its parts and the budget) when ``processes``
    copies of ``estimate`` exceed ``budget`` bytes; ``budget`` ``None`` skips the check."""
    if budget is None:
        return
    need = estimate.total * processes
    if need <= budget:
        return
    copies = f" × {processes} processes" if processes > 1 else ""
    smaller = "a smaller batch or network" if estimate.batch else "a smaller network"
    raise MemoryBudgetError(
        f"needs about {gib(need)} ({estimate.describe()}{copies}), more than the memory budget of {gib(budget)} "
        f"({where}); use {smaller}, or raise the budget with {flag}", path=estimate.spec,
    )


_FLAG_BUDGET: ContextVar[int | None] = ContextVar("memory_budget", default=None)


@contextmanager
def budget_given(budget: int | None) -> Iterator[None]:
    """Within the block, :func:`default_budget` is ``budget`` (a command's ``--memory-budget``), so every
    module built on the way (an export, a checkpoint check) is held to the flag, not to the RAM."""
    token = _FLAG_BUDGET.set(budget)
    try:
        yield
    finally:
        _FLAG_BUDGET.reset(token)


def default_budget() -> tuple[int | None, str]:
    """The budget in force: the command's ``--memory-budget``, else ``CNDS_MEMORY_BUDGET_GIB``, else the RAM
    available now; with what to call it in a message."""
    if _FLAG_BUDGET.get() is not None:
        return _FLAG_BUDGET.get(), "--memory-budget"
    budget = budget_from_gib(None)
    if budget is not None:
        return budget, "CNDS_MEMORY_BUDGET_GIB"
    return available_ram(), "the RAM available now"
