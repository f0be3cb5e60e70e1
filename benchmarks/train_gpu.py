"""Training throughput on a CUDA GPU, in one prepared run of a few minutes (issue 16, item 4).

For the 227² ImageNet CNDS-8 and GoogLeNet-CNDS: training images/s (forward with the branches, eq. 1
loss, backward, fused SGD step; random data already on the GPU) in fp32, bf16, and bf16 + channels-last
+ torch.compile (with its compile time); the branch overhead (CNDS-8 vs CNN-8 step); and the imagefolder
loader's images/s (JPEG decode + crop + mirror in worker processes, pinned memory, copied to the GPU)
against the model's training rate. Interleaved rounds, medians, ratios printed.

    python -m benchmarks.train_gpu [--batch 128] [--rounds 5] [--no-compile] [--json out.json]

Without a CUDA device it says so and exits 0 (CI never needs a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.train_bench import SPECS, branch_cost, loader_rate, speed_options


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("train_gpu: no CUDA device here; nothing measured (run it where a GPU is available)")
        return 0
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; bf16 is measured separately
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    started = time.perf_counter()
    results: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                     "batch": args.batch, "rounds": args.rounds}
    print(f"{results['device']}, torch {torch.__version__}, batch {args.batch}, {args.rounds} rounds, medians")

    options = ("bf16", "bf16+channels_last") + (() if args.no_compile else ("bf16+channels_last+compile",))
    results["nets"] = []
    for spec in ("imagenet_cnds8.cnds", "googlenet_cnds.cnds"):
        if not (SPECS / spec).exists():
            continue
        res = speed_options(spec, args.batch, args.rounds, device, compile=not args.no_compile, options=options)
        results["nets"].append(res)
        ips = res["images_per_s"]
        line = ", ".join(f"{k} {v:.0f} img/s ({v / ips['plain']:.2f}x)" for k, v in ips.items() if k != "plain")
        comp = ", ".join(f"{v:.0f} s" for v in res["compile_seconds"].values())
        print(f"  {spec}: fp32 {ips['plain']:.0f} img/s; {line}" + (f"; compilation {comp}" if comp else ""),
              flush=True)

    pairs = [("imagenet_cnds8.cnds", "imagenet_cnn8.cnds", args.batch)]
    results["branch"] = branch_cost(pairs, args.rounds * 2, device)
    for r in results["branch"]:
        print(f"  branch overhead: {r['cnds']} {r['cnds_ms']:.1f} ms vs {r['cnn']} {r['cnn_ms']:.1f} ms per step "
              f"(fp32, batch {r['batch']}): ratio {r['ratio']:.3f} (goal <= 1.05); the same model with its branch "
              f"off {r['ratio_same_instance']:.3f}", flush=True)

    workers = min(16, os.cpu_count() or 1)
    rate = loader_rate(args.batch, workers, images=8 * args.batch, prefetch=4, pin_memory=True, device=device)
    best = max(results["nets"][0]["images_per_s"].values()) if results["nets"] else float("nan")
    results["loader"] = {"workers": workers, "img_per_s": rate, "best_train_img_per_s": best}
    print(f"  imagefolder loader ({workers} workers, prefetch 4, pinned, to GPU): {rate:.0f} img/s = "
          f"{rate / best:.2f}x the fastest CNDS-8 training rate ({best:.0f} img/s); >= 1 means it keeps up")
    results["seconds"] = time.perf_counter() - started
    print(f"total {results['seconds']:.0f} s")
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
