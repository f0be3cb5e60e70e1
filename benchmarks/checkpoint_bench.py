"""What the checkpoint content digest costs: for the 227x227 CNDS-8 (specs/places_cnds8.cnds) with its SGD
momentum buffers, the time to compute the digest against ``torch.save`` into memory (what every epoch
already pays), and the time to verify it against ``torch.load``; interleaved rounds, medians, ratios.

    python -m benchmarks.checkpoint_bench [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import torch

from cnds_compiler import compile_spec
from cnds_compiler.backends.pytorch import build_module
from cnds_compiler.checkpoint import FORMAT, VERSION, content_digest
from cnds_compiler.train.optim import make_optimizer
from cnds_compiler.train.state import rng_state


def training_state(spec: str) -> dict:
    """A checkpoint payload as cnds-train writes it: weights, one momentum buffer per parameter, RNG states."""
    net = compile_spec(spec)
    model = build_module(net, seed=0)
    optimizer = make_optimizer(model, net.train)
    for group in optimizer.param_groups:  # what the first SGD step creates, without running a 227² step
        for p in group["params"]:
            optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)
    return {"format": FORMAT, "version": VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": 1, "step": 100, "rng": rng_state(), "spec_name": net.name, "metrics": [], "best_val_error": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/places_cnds8.cnds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    state = training_state(args.spec)
    tensor_bytes = sum(t.numel() * t.element_size() for t in state["model"].values()) * 2  # + momentum
    print(f"{args.spec}: {tensor_bytes / 2**20:.0f} MiB of tensors (weights + momentum), {torch.get_num_threads()} "
          f"torch threads, {args.rounds} interleaved rounds")
    times: dict[str, list[float]] = {"torch.save": [], "digest": [], "torch.load": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        times["torch.save"].append(time.perf_counter() - start)
        start = time.perf_counter()
        digest = content_digest(state)
        times["digest"].append(time.perf_counter() - start)
        start = time.perf_counter()
        loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        times["torch.load"].append(time.perf_counter() - start)
        assert content_digest(loaded) == digest  # the digest survives the round trip
        del buffer, loaded
    median = {k: statistics.median(v) for k, v in times.items()}
    for k, v in median.items():
        print(f"  {k:<11} median {v * 1e3:7.0f} ms  ({tensor_bytes / 2**30 / v:.2f} GiB/s)")
    print(f"digest / torch.save: {median['digest'] / median['torch.save']:.2f}   "
          f"digest / torch.load: {median['digest'] / median['torch.load']:.2f}   "
          f"(saving = torch.save + digest: {1 + median['digest'] / median['torch.save']:.2f}x torch.save alone)")


if __name__ == "__main__":
    main()
