"""CPU threads and memory reuse for the commands that run torch: fast on a quiet machine, no collapse on
a busy one, no page fault per 4 KiB of every fresh gradient.

PyTorch's OpenMP threads spin while they wait for work. On an idle machine that is the fastest choice;
when other processes want the same cores, the spinning threads take turns with them and a small net's
training can be ten times slower (``benchmarks/threads_bench.py``; RESULTS.md). So, unless the user has
chosen (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY`` or ``CNDS_THREADS``), the commands measure how busy the
cores they may use are, for a tenth of a second before torch starts, and then use one thread per free
core, waiting passively when other work is running. It must run before ``import torch``: OpenMP reads
its settings once.
"""

from __future__ import annotations

import os
import time

SAMPLE_SECONDS = 0.1
BUSY_CORES = 0.5
"""Cores' worth of other work above which waiting threads sleep instead of spinning."""


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many cores' worth of CPU time other processes used over ``seconds`` (Linux ``/proc/stat``)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    if elapsed <= 0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / elapsed)


def _note(message: str) -> None:
    """A setting read from the environment that cannot be used: one line on stderr, from the main process
    only (``--processes`` workers read the same variables)."""
    import sys

    if os.environ.get("RANK", "0") == "0":
        print(f"note: {message}", file=sys.stderr)


def configure_threads(env: dict | None = None, processes: int = 1) -> str:
    """Set ``OMP_NUM_THREADS``/``OMP_WAIT_POLICY`` in ``env`` (default ``os.environ``) unless chosen.

    ``CNDS_THREADS``: ``auto`` (default), ``torch`` (leave torch's defaults) or a thread count (per process).
    ``processes``: how many processes will share the cores (``cnds-train --processes``): each gets its
    share of the free ones. Returns a short description of what was decided.
    """
    env = os.environ if env is None else env
    choice = env.get("CNDS_THREADS", "auto").strip().lower()
    if choice == "torch" or "OMP_NUM_THREADS" in env:
        return "threads: as set"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if choice != "auto":
        threads = int(choice) if choice.isdigit() and int(choice) >= 1 else None
        if threads is None:
            _note(f"CNDS_THREADS={env['CNDS_THREADS']!r} is not 'auto', 'torch' or a number of threads (1 or "
                  f"more); using {cores}, this machine's cores")
            threads = cores
        env["OMP_NUM_THREADS"] = str(threads)
        return f"threads: {threads} (CNDS_THREADS)"
    busy = busy_cores()
    if busy is None or busy < BUSY_CORES:
        if processes > 1:
            env["OMP_NUM_THREADS"] = str(max(1, cores // processes))
            return f"threads: {env['OMP_NUM_THREADS']} per process, spinning (quiet machine)"
        return f"threads: {cores}, spinning (quiet machine)"
    threads = max(1, min(cores, round(cores - busy)) // processes)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return f"threads: {threads}{' per process' if processes > 1 else ''}, passive waiting ({busy:.1f} cores busy with other work)"


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def _glibc_mallopt():
    """glibc's ``mallopt``, or None elsewhere (musl, macOS, Windows)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def configure_allocator(env: dict | None = None, mallopt=None) -> str:
    """Keep freed memory in the process for reuse (glibc: no ``mmap`` for large blocks, no trimming)
    unless ``CNDS_ALLOCATOR=system`` or the user set glibc's own ``MALLOC_*_`` variables.

    A training step frees and allocates every gradient and large activation again
    (``zero_grad(set_to_none=True)``, autograd's buffers). glibc serves blocks above its mmap threshold
    (at most 32 MiB) with fresh pages and unmaps them on free, so each step pays one page fault per 4 KiB
    of them: 171,000 a step for the 227² CNDS-8 at batch 16 (its gradients alone are 293 MiB). Served
    from the heap and never trimmed, the same memory is reused within a few steps: 0 faults a step, 0.77×
    the step time (``benchmarks/alloc_bench.py``; RESULTS.md). The heap then stays at the run's peak,
    which training reaches in its first steps anyway. Returns what was done.
    """
    env = os.environ if env is None else env
    choice = env.get("CNDS_ALLOCATOR", "reuse").strip().lower()
    if choice == "system":
        return "memory: the system allocator's defaults (CNDS_ALLOCATOR=system)"
    if choice != "reuse":
        _note(f"CNDS_ALLOCATOR={env['CNDS_ALLOCATOR']!r} is not 'reuse' or 'system'; keeping freed memory for reuse")
    if any(k in env for k in MALLOC_ENV) or "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return "memory: malloc settings as set"
    mallopt = _glibc_mallopt() if mallopt is None else mallopt
    if mallopt is None:
        return "memory: the system allocator's defaults (not glibc)"
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "memory: the system allocator's defaults (mallopt refused)"
    return "memory: freed blocks kept for reuse"


def configure_process() -> str:
    """Both settings of the commands that run torch, to call before ``import torch``: threads (OpenMP reads
    its settings once) and memory reuse (before torch allocates). Returns what was decided."""
    return f"{configure_threads()}; {configure_allocator()}"
