"""Wall and CPU time of ``cnds-probe`` on the small Fashion-MNIST CNDS-8 (goal: under a minute on 2 cores).

Runs the whole command the way a user does — a fresh Python process (so ``import torch`` and the first
oneDNN kernel builds are counted), the real Fashion-MNIST files, the plot written — ``--repeat`` times,
and prints each run's wall time, user+sys CPU time and the machine's load average, plus the probe's own
time for its iterations.

    python -m benchmarks.probe_bench [--repeat 3] [--spec specs/fmnist_cnds8.cnds] [-- extra cnds-probe flags]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(ROOT / "specs" / "fmnist_cnds8.cnds"))
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("extra", nargs="*", help="more cnds-probe flags (after --)")
    args = p.parse_args(argv)
    print(f"cnds-probe {args.spec} --data {args.data} {' '.join(args.extra)}  ({os.cpu_count()} CPUs)")
    print(f"{'run':>4}{'wall s':>9}{'CPU s':>8}{'probe s':>9}{'s/iter':>8}  load avg (1 min)  proposal")
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            cmd = [sys.executable, "-m", "cnds_compiler.probe.cli", args.spec, "--data", args.data,
                   "--plot", str(Path(tmp) / "probe.png"), "--no-progress", *args.extra]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            m = re.search(r"time: ([\d.]+) s \(([\d.]+) s/iteration\)", done.stdout)
            prop = re.search(r"proposal: (.*)", done.stdout)
            walls.append(wall)
            print(f"{i + 1:>4}{wall:>9.1f}{cpu:>8.1f}{m.group(1) if m else '?':>9}{m.group(2) if m else '?':>8}"
                  f"  {os.getloadavg()[0]:>16.2f}  {prop.group(1)[:60] if prop else '?'}")
    print(f"best wall {min(walls):.1f} s, median {sorted(walls)[len(walls) // 2]:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
