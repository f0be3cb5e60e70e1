"""Module-building time of large graphs: ``build_module(net, materialize=False)`` (structure and
generated code, no weight memory), median of 5, for an imported DenseNet-121 and the BVLC GoogLeNet spec.

    python -m benchmarks.build_bench
"""

from __future__ import annotations

import statistics
import time

from cnds_compiler import compile_spec
from cnds_compiler.backends.pytorch import build_module
from cnds_compiler.frontend import compile_text
from cnds_compiler.importers.torchvision import import_torchvision


def main() -> None:
    nets = {"densenet121": compile_text(import_torchvision("densenet121").text, "densenet121.cnds"),
            "googlenet.cnds": compile_spec("specs/googlenet.cnds")}
    for name, net in nets.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            build_module(net, materialize=False)
            times.append(time.perf_counter() - start)
        print(f"{name}: {len(net.nodes)} nodes, build_module(materialize=False) median "
              f"{statistics.median(times) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
