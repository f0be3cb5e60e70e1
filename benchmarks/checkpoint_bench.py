"""What the checkpoint content digest costs: for the 227x227 CNDS-8 (specs/places_cnds8.cnds) with its SGD
momentum buffers, the time to compute the digest against ``torch.save`` into memory (what every epoch
already pays), and the time to verify it against ``torch.load``; interleaved rounds, medians, ratios.
Also what ``--resume`` pays to read the run's own settings before the full load (``saved_train_config``,
tensors memory-mapped) against that full, verified load (``load_checkpoint``), from a file.

    python -m benchmarks.checkpoint_bench [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cnds_compiler import compile_spec
from cnds_compiler.backends.pytorch import build_module
from cnds_compiler.checkpoint import FORMAT, VERSION, content_digest, load_checkpoint, save_checkpoint
from cnds_compiler.train.optim import make_optimizer
from cnds_compiler.train.rundir import saved_train_config
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
            "epoch": 1, "step": 100, "rng": rng_state(), "spec_name": net.name, "metrics": [], "best_val_error": 0.5,
            "train_config": json.dumps(asdict(net.train))}


def resume_settings_cost(state: dict, rounds: int) -> None:
    """``saved_train_config`` (what --resume reads first) against the full ``load_checkpoint``, interleaved."""
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(Path(folder) / "last.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
        times: dict[str, list[float]] = {"settings": [], "full load": []}
        for _ in range(rounds):
            start = time.perf_counter()
            assert saved_train_config(Path(folder)) is not None
            times["settings"].append(time.perf_counter() - start)
            start = time.perf_counter()
            load_checkpoint(Path(folder) / "last.pt")
            times["full load"].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"--resume's settings read {median['settings'] * 1e3:.1f} ms, full verified load "
          f"{median['full load'] * 1e3:.0f} ms: {median['settings'] / median['full load']:.3f}x")


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
    resume_settings_cost(state, args.rounds)


if __name__ == "__main__":
    main()
