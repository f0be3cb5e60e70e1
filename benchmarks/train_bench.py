"""Cost of deep supervision and data-loader headroom, measured side by side in one run.

1. Training-step time (forward + backward + SGD step) of CNDS-8 with its branch on against CNN-8 (the
   same trunk, no branch), interleaved A/B: the price of deep supervision (goal: ratio ≤ 1.10).
2. imagefolder loader throughput (JPEG decode + the paper's augmentation, worker processes) against
   the training throughput of the 227×227 CNDS-8 on the same machine: the loader must keep up.

    python -m benchmarks.train_bench [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cnds_compiler import compile_spec
from cnds_compiler.backends.pytorch import build_module
from cnds_compiler.train.loss import alphas, deep_supervision_loss
from cnds_compiler.train.trainer import make_optimizer

SPECS = Path(__file__).resolve().parent.parent / "specs"


def _stepper(spec: str, batch: int):
    net = compile_spec(SPECS / spec)
    model = build_module(net, seed=0).train()
    opt = make_optimizer(model, net.train)
    c, h, w = net.input.dims
    x = torch.randn(batch, c, h, w)
    y = torch.randint(0, net.num_classes, (batch,))
    weights = alphas(net, 0, net.train.epochs)
    branches = tuple(weights)

    def step() -> None:
        out = model(x, branches=branches)
        loss, _ = deep_supervision_loss(net, out.logits, out.aux, y, weights)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_pair(spec_a: str, spec_b: str, batch: int, reps: int) -> dict:
    a, b = _stepper(spec_a, batch), _stepper(spec_b, batch)
    for _ in range(3):
        a(), b()
    ta, tb = [], []
    for _ in range(reps):  # interleaved so both see the same machine state
        ta.append(_timed(a))
        tb.append(_timed(b))
    ma, mb = statistics.median(ta), statistics.median(tb)
    return {"a": spec_a, "b": spec_b, "batch": batch, "reps": reps, "a_ms": ma * 1e3, "b_ms": mb * 1e3,
            "ratio": ma / mb}


def loader_vs_training(batch: int, workers: int, images: int, train_reps: int) -> dict:
    from cnds_compiler.data import load_source, make_loader
    from cnds_compiler.train.synthetic import make_imagefolder

    net = compile_spec(SPECS / "imagenet_cnds8.cnds")
    with tempfile.TemporaryDirectory() as tmp:
        per_class = max(1, images // 4)
        make_imagefolder(tmp, classes=4, per_class=per_class, size=(256, 256), val_per_class=1)
        # The spec says 1000 classes; the generated tree has 4, so load it for a 4-class copy of the spec.
        from dataclasses import replace

        small = replace(net, num_classes=4, class_names=())
        data = load_source(f"imagefolder:{tmp}", small, seed=0)
        loader = make_loader(data.train, batch, shuffle=True, workers=workers, seed=0, drop_last=True)
        n, start = 0, time.perf_counter()
        for epoch in range(2):
            loader.set_epoch(epoch)
            for x, _, _ in loader:
                n += x.shape[0]
        load_ips = n / (time.perf_counter() - start)
    step = _stepper("imagenet_cnds8.cnds", batch)
    step()
    times = [_timed(step) for _ in range(train_reps)]
    train_ips = batch / statistics.median(times)
    return {"batch": batch, "workers": workers, "loader_img_per_s": load_ips, "train_img_per_s": train_ips,
            "loader_over_train": load_ips / train_ips}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    reps = 5 if args.quick else 30
    results = {"threads": args.threads, "pairs": []}
    print(f"torch {torch.__version__}, {args.threads} threads")
    print("training step, CNDS-8 (branch on) vs CNN-8 (same trunk, no branch):")
    for a, b, batch, r in (("fmnist_cnds8.cnds", "fmnist_cnn8.cnds", 128, reps),
                           ("digits_cnds8.cnds", "digits_cnn8.cnds", 64, reps),
                           ("imagenet_cnds8.cnds", "imagenet_cnn8.cnds", 4, max(3, reps // 6))):
        res = time_pair(a, b, batch, r)
        results["pairs"].append(res)
        print(f"  {a:<22} {res['a_ms']:9.1f} ms  vs {b:<22} {res['b_ms']:9.1f} ms  "
              f"(batch {batch}, {r} reps)  ratio {res['ratio']:.3f}  (goal <= 1.10)")
    lv = loader_vs_training(batch=8, workers=2, images=64 if args.quick else 256, train_reps=3 if args.quick else 6)
    results["loader"] = lv
    print(f"imagefolder loader (256x256 JPEG -> random 227 crop + mirror, {lv['workers']} workers): "
          f"{lv['loader_img_per_s']:.0f} img/s; CNDS-8 227x227 training: {lv['train_img_per_s']:.1f} img/s; "
          f"loader/training = {lv['loader_over_train']:.1f}x (>= 1 means the loader keeps up)")
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
