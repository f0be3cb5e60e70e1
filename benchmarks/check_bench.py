"""A spec check (``cnds-compile SPEC``, whole process) against ``python -c "import torch"``, interleaved.

Checking a spec never imports torch; with the grammar's parser tables cached across runs it should cost a
tenth of torch's import (issue 15's goal). Reports medians over ``--rounds`` and the ratio per spec.

    python -m benchmarks.check_bench [--rounds 9] [SPEC ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPECS = ("digits_cnds8", "places_cnds8", "resnet18_cnds", "googlenet")


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="*", default=DEFAULT_SPECS, help="spec names under specs/ (no suffix)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    commands = {"import torch": [sys.executable, "-c", "import torch"]}
    for name in args.specs:
        commands[name] = [sys.executable, "-m", "cnds_compiler.cli", str(ROOT / "specs" / f"{name}.cnds"), "-q"]
    for cmd in commands.values():  # warm the file cache and the grammar cache
        _wall(cmd)
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.rounds):
        for name, cmd in commands.items():
            times[name].append(_wall(cmd))
    torch_ms = statistics.median(times["import torch"]) * 1e3
    result = {"import torch ms": torch_ms}
    for name in args.specs:
        ms = statistics.median(times[name]) * 1e3
        result[name] = {"check ms": ms, "ratio": ms / torch_ms}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
