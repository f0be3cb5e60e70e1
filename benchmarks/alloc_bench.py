"""Memory reuse on CPU, side by side (issue 16): how torch's large CPU blocks are served during training.

A CPU training step frees and allocates every gradient and large activation again. With glibc's defaults,
blocks above its mmap threshold (at most 32 MiB) get fresh pages and are unmapped on free, so each step
pays one page fault per 4 KiB of them. Settings compared, each in its own processes (both are read before
torch's first allocation):

- ``system``: glibc's defaults (``CNDS_ALLOCATOR=system``);
- ``reuse``: what cnds-train does by default (``cnds_compiler.threads.configure_allocator``: no mmap for
  large blocks, no trimming: freed memory stays in the process and is reused);
- ``system+thp`` / ``reuse+thp``: also torch's ``THP_MEM_ALLOC_ENABLE=1`` (2 MiB-aligned blocks with
  ``madvise(MADV_HUGEPAGE)``: 512 times fewer faults, but a fault may wait for the kernel to compact memory).

Each process runs warm-up steps, then ``--steps`` timed ones, and reports their median wall and CPU time,
page faults per timed step and peak RSS; the processes alternate (one round = every setting once) and the
table gives the medians over rounds. The CNDS-8 and CNN-8 rows also give the branch's cost per setting
(CNDS-8 / CNN-8, each in its own process).

    python -m benchmarks.alloc_bench [--rounds 3] [--steps 4] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [("imagenet_cnn8.cnds", 16), ("imagenet_cnds8.cnds", 16), ("fmnist_cnn8.cnds", 128),
         ("fmnist_cnds8.cnds", 128)]
SETTINGS = {"system": {"CNDS_ALLOCATOR": "system", "THP_MEM_ALLOC_ENABLE": "0"},
            "reuse": {"CNDS_ALLOCATOR": "reuse", "THP_MEM_ALLOC_ENABLE": "0"},
            "system+thp": {"CNDS_ALLOCATOR": "system", "THP_MEM_ALLOC_ENABLE": "1"},
            "reuse+thp": {"CNDS_ALLOCATOR": "reuse", "THP_MEM_ALLOC_ENABLE": "1"}}


def child(spec: str, batch: int, steps: int) -> None:
    """Runs in the measured process: warm-up steps, then ``steps`` timed ones; prints one JSON line."""
    from benchmarks.train_bench import ALLOCATOR, stepper  # its import applies CNDS_ALLOCATOR before torch

    step = stepper(spec, batch)
    for _ in range(2):
        step()
    walls, cpus = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": statistics.median(walls), "cpu": statistics.median(cpus), "allocator": ALLOCATOR,
                      "faults_per_step": (usage.ru_minflt - faults) / steps, "peak_mib": usage.ru_maxrss / 1024}))


def run_child(spec: str, batch: int, steps: int, setting: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(setting, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "benchmarks.alloc_bench", "--child", spec, str(batch), str(steps)],
                         check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="one round, two timed steps, the Fashion-MNIST pair only")
    p.add_argument("--json")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    cases = CASES[2:] if args.quick else CASES
    rounds, steps = (1, 2) if args.quick else (args.rounds, args.steps)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = thp.read_text().strip() if thp.exists() else "unknown"
    print(f"{os.cpu_count()} CPUs, kernel THP setting: {mode}; {rounds} alternating rounds x {steps} timed steps "
          "(after 2 warm-up steps), medians; torch's default threads", flush=True)
    results = []
    for spec, batch in cases:
        runs = {k: [] for k in SETTINGS}
        for _ in range(rounds):
            for name, setting in SETTINGS.items():
                runs[name].append(run_child(spec, batch, steps, setting))
        row = {"spec": spec, "batch": batch}
        for name, rs in runs.items():
            row[name] = {key: statistics.median(r[key] for r in rs) for key in ("wall", "cpu", "faults_per_step",
                                                                                  "peak_mib")}
        results.append(row)
        base = row["system"]
        print(f"  {spec} batch {batch}:", flush=True)
        for name in SETTINGS:
            r = row[name]
            print(f"    {name:<11} step {r['wall'] * 1e3:7.1f} ms ({r['wall'] / base['wall']:.3f}x system; CPU "
                  f"{r['cpu'] / base['cpu']:.3f}x)  page faults/step {r['faults_per_step']:9,.0f}  peak RSS "
                  f"{r['peak_mib']:6,.0f} MiB", flush=True)
    by_spec = {(r["spec"], r["batch"]): r for r in results}
    print("  branch cost, CNDS-8 / CNN-8 step (each in its own processes):")
    for cnds, cnn, batch in (("imagenet_cnds8.cnds", "imagenet_cnn8.cnds", 16),
                             ("fmnist_cnds8.cnds", "fmnist_cnn8.cnds", 128)):
        if (cnds, batch) in by_spec and (cnn, batch) in by_spec:
            ratios = {name: by_spec[(cnds, batch)][name]["wall"] / by_spec[(cnn, batch)][name]["wall"]
                      for name in SETTINGS}
            print(f"    {cnds} batch {batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
            results.append({"branch": cnds, "batch": batch, "ratios": ratios})
    if args.json:
        Path(args.json).write_text(json.dumps({"thp_mode": mode, "results": results}, indent=1))


if __name__ == "__main__":
    main()
