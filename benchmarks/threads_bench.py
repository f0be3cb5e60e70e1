"""How cnds-train's CPU thread settings fare on a quiet and on a busy machine (issue 15).

Runs the same short training (``specs/digits_cnds8.cnds``, ``--epochs E``) as whole processes under each
setting, first with the machine otherwise idle, then with ``--load N`` busy-looping processes competing for
the cores, and reports the median wall time of ``--rounds`` runs per setting and condition (settings
interleaved). Settings: torch's default (OpenMP threads spin while waiting), ``OMP_WAIT_POLICY=PASSIVE``,
one thread, and ``auto`` (cnds-train's default: threads = cores free of other load, passive waiting only
when the machine is busy).

    python -m benchmarks.threads_bench [--epochs 5] [--rounds 3] [--load 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "spin (torch default)": {"CNDS_THREADS": "torch"},
    "passive": {"CNDS_THREADS": "torch", "OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"CNDS_THREADS": "1"},
    "auto (cnds default)": {},
}


def _busy(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def _run(env_extra: dict, epochs: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "CNDS_THREADS")}
    env.update(env_extra)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cnds_compiler.train.cli", str(ROOT / "specs" / "digits_cnds8.cnds"),
                        "--out", out, "--epochs", str(epochs), "--no-progress", "--cpu"],
                       check=True, capture_output=True, env=env)
        return time.perf_counter() - start


def measure(epochs: int, rounds: int, load: int) -> dict:
    stop = mp.Event()
    workers = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(load)]
    for w in workers:
        w.start()
    time.sleep(1.0 if load else 0)
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    try:
        for _ in range(rounds):
            for name, env in SETTINGS.items():
                times[name].append(_run(env, epochs))
    finally:
        stop.set()
        for w in workers:
            w.join()
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", type=int, default=2, help="busy-looping processes in the busy condition")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = {"cores": len(os.sched_getaffinity(0)), "quiet": measure(args.epochs, args.rounds, 0),
               f"busy ({args.load} busy processes)": measure(args.epochs, args.rounds, args.load)}
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
