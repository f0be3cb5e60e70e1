"""Inference speed of cnds exports, side by side, on 2 threads (run: python benchmarks/infer_bench.py).

1. CNDS-8 trunk (places_cnds8, 3x227x227, batch 8) through onnxruntime vs PyTorch eager, same weights;
2. the achieved GFLOP/s (IR-counted FLOPs x img/s) vs a 4096^2 float32 numpy matmul in the same run;
3. an fc7-feature export vs the full export;
4. int8 vs fp32: speed on the CNDS-8 trunk, and speed + top-1 on Fashion-MNIST with a trained
   fmnist_cnn8 (trained here with cnds-train unless --checkpoint is given);
5. CNDS-8 vs torchvision's GoogLeNet (random weights, never downloaded) exported the same way.

Pairs are timed in alternating rounds and each figure is the best round (as timeit takes the minimum):
on a shared machine, load from other processes only ever slows a round down, so the fastest round is
the closest to the machine's real speed, and alternation gives both sides the same chances. Prints a
Markdown block for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

THREADS = 2
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, str(THREADS))

import argparse  # noqa: E402
import copy  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cnds_compiler import compile_spec  # noqa: E402
from cnds_compiler.backends.pytorch import build_module  # noqa: E402
from cnds_compiler.checkpoint import load_checkpoint  # noqa: E402
from cnds_compiler.errors import CheckpointError  # noqa: E402
from cnds_compiler.lowering.onnx_export import DEFAULT_OPSET, cpu_session, export_onnx, torch_to_onnx  # noqa: E402
from cnds_compiler.lowering.precision import quantize_int8  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8


def rate(fn, images: int, seconds: float) -> float:
    """Images per second of ``fn`` over about ``seconds`` (at least 2 calls)."""
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < seconds:
        fn()
        runs += 1
    return runs * images / (time.perf_counter() - start)


def compare(fns: dict, images: int | dict[str, float], rounds: int, seconds: float) -> dict[str, float]:
    """Best rate (``images`` units per call) of each callable over alternating rounds, after a warm-up."""
    units = images if isinstance(images, dict) else dict.fromkeys(fns, images)
    for fn in fns.values():
        fn()
    results = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            results[name].append(rate(fn, units[name], seconds))
    return {name: max(v) for name, v in results.items()}


def ort_runner(model: bytes | Path, x: np.ndarray):
    s = cpu_session(Path(model).read_bytes() if isinstance(model, Path) else model, THREADS)
    name = s.get_inputs()[0].name
    return lambda: s.run(None, {name: x})


def matmul(n: int = 4096):
    """A float32 n x n numpy matmul and its GFLOP per call."""
    a, b = (np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in range(2))
    return (lambda: a @ b), 2 * n**3 / 1e9


def trained_fmnist(args) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    out = Path(args.work) / "fmnist_cnn8"
    ckpt = out / "last.pt"
    if ckpt.exists():
        try:  # a cached run from an older version of the spec is retrained, not trusted
            load_checkpoint(ckpt, compile_spec(ROOT / "specs/fmnist_cnn8.cnds"))
        except CheckpointError:
            shutil.rmtree(out)
    if not ckpt.exists():
        cmd = ["cnds-train", str(ROOT / "specs/fmnist_cnn8.cnds"), "--data", "fashion-mnist", "--epochs",
               str(args.train_epochs), "--out", str(out), "--no-progress", "--cpu"]
        print("training:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return ckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per comparison")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per timing round")
    p.add_argument("--checkpoint", help="a trained fmnist_cnn8 checkpoint (default: train one)")
    p.add_argument("--train-epochs", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "runs" / "infer_bench"), help="where training runs go")
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="infer-bench-") as tmp:
        run(args, Path(tmp))


def run(args, tmp: Path) -> None:
    load_start = os.getloadavg()[0]
    rows: list[str] = []

    def row(text: str) -> None:
        rows.append(text)
        print(text, flush=True)

    # 1-3: CNDS-8 trunk, one set of weights for every variant
    net = compile_spec(ROOT / "specs/places_cnds8.cnds")
    module = build_module(net, seed=0).eval()
    state = module.state_dict()
    export_onnx(net, tmp / "cnds8.onnx", weights=state)
    export_onnx(net, tmp / "cnds8_fc7.onnx", weights=state, features=["fc7"])
    export_onnx(net, tmp / "cnds8_pool5.onnx", weights=state, features=["pool5"])
    x = np.random.default_rng(0).standard_normal((BATCH, *net.input.dims), dtype=np.float32)
    xt = torch.from_numpy(x)
    cl = copy.deepcopy(module).to(memory_format=torch.channels_last)

    def eager():
        with torch.inference_mode():
            module(xt)

    def eager_cl():
        with torch.inference_mode():
            cl(xt.to(memory_format=torch.channels_last))

    ort_fp32 = ort_runner(tmp / "cnds8.onnx", x)
    r = compare({"ort": ort_fp32, "eager": eager}, BATCH, args.rounds, args.seconds)
    row(f"| CNDS-8 trunk, onnxruntime fp32 vs PyTorch eager | {r['ort']:.1f} vs {r['eager']:.1f} img/s "
        f"| **{r['ort'] / r['eager']:.2f}x** (goal >= 1.5x) |")
    r_cl = compare({"ort": ort_fp32, "eager_cl": eager_cl}, BATCH, max(2, args.rounds // 2), args.seconds)
    row(f"| (for reference) onnxruntime vs PyTorch eager channels_last | {r_cl['ort']:.1f} vs "
        f"{r_cl['eager_cl']:.1f} img/s | {r_cl['ort'] / r_cl['eager_cl']:.2f}x |")
    flops = sum(layer.flops for layer in net.trunk)
    mm_fn, mm_gflop = matmul()
    r = compare({"ort": ort_fp32, "mm": mm_fn}, {"ort": BATCH * flops / 1e9, "mm": mm_gflop}, args.rounds,
                args.seconds)
    achieved, mm = r["ort"], r["mm"]
    row(f"| CNDS-8 achieved GFLOP/s ({flops / 1e9:.2f} GFLOP/img) vs 4096^2 numpy sgemm | {achieved:.0f} vs "
        f"{mm:.0f} GFLOP/s | **{achieved / mm:.2f}** (goal >= 0.8) |")
    r = compare({"fc7": ort_runner(tmp / "cnds8_fc7.onnx", x), "full": ort_fp32,
                 "pool5": ort_runner(tmp / "cnds8_pool5.onnx", x)}, BATCH, args.rounds, args.seconds)
    row(f"| fc7-feature export vs full export (onnxruntime) | {r['fc7']:.1f} vs {r['full']:.1f} img/s "
        f"| {r['fc7'] / r['full']:.2f}x (pool5 export: {r['pool5'] / r['full']:.2f}x) |")

    # 4a: int8 vs fp32 on the CNDS-8 trunk (speed; calibrated on random input, which fixes speed, not accuracy)
    calib = [np.random.default_rng(i).standard_normal((4, *net.input.dims), dtype=np.float32) for i in range(4)]
    int8 = quantize_int8((tmp / "cnds8.onnx").read_bytes(), calib, "input")
    r = compare({"int8": ort_runner(int8, x), "fp32": ort_fp32}, BATCH, args.rounds, args.seconds)
    row(f"| CNDS-8 trunk int8 vs fp32 (onnxruntime, static QDQ per-channel) | {r['int8']:.1f} vs {r['fp32']:.1f} "
        f"img/s | **{r['int8'] / r['fp32']:.2f}x** (goal >= 1.8x) |")

    # 4b: int8 vs fp32 on a trained Fashion-MNIST model: accuracy on all 10,000 test images, and speed
    fm = compile_spec(ROOT / "specs/fmnist_cnn8.cnds")
    ckpt = trained_fmnist(args)
    export_onnx(fm, tmp / "fm.onnx", weights=ckpt)
    rep = export_onnx(fm, tmp / "fm_int8.onnx", weights=ckpt, precision="int8", calibration="fashion-mnist",
                      calibration_size=1024, validation_size=10_000).precision_report
    xf = np.random.default_rng(0).standard_normal((64, *fm.input.dims), dtype=np.float32)
    r = compare({"int8": ort_runner(tmp / "fm_int8.onnx", xf), "fp32": ort_runner(tmp / "fm.onnx", xf)}, 64,
                args.rounds, args.seconds)
    row(f"| fmnist_cnn8 ({ckpt.name}) int8 vs fp32 top-1 on {rep.examples:,} test images | {rep.top1:.2%} vs "
        f"{rep.top1_fp32:.2%} | **{(rep.top1 - rep.top1_fp32) * 100:+.2f} points** (goal >= -1) |")
    row(f"| fmnist_cnn8 int8 vs fp32 speed (batch 64) | {r['int8']:.0f} vs {r['fp32']:.0f} img/s "
        f"| {r['int8'] / r['fp32']:.2f}x |")

    # 5: CNDS-8 vs GoogLeNet, both exported with the same exporter settings
    import torchvision

    g = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True).eval()
    gx = np.random.default_rng(0).standard_normal((BATCH, 3, 224, 224), dtype=np.float32)
    g_full = torch_to_onnx(g, torch.zeros(2, 3, 224, 224), "input", ["logits"], DEFAULT_OPSET)
    g.fc = torch.nn.Identity()
    g_feat = torch_to_onnx(g, torch.zeros(2, 3, 224, 224), "input", ["pool"], DEFAULT_OPSET)
    r = compare({"cnds8": ort_fp32, "googlenet": ort_runner(g_full, gx),
                 "cnds8_fc7": ort_runner(tmp / "cnds8_fc7.onnx", x), "googlenet_pool": ort_runner(g_feat, gx)},
                BATCH, args.rounds, args.seconds)
    row(f"| CNDS-8 (227^2) vs GoogLeNet (224^2), classification, onnxruntime fp32 | {r['cnds8']:.1f} vs "
        f"{r['googlenet']:.1f} img/s | CNDS-8 at {r['cnds8'] / r['googlenet']:.2f}x GoogLeNet's speed |")
    row(f"| CNDS-8 fc7 (4096-d) vs GoogLeNet pool (1024-d) feature extraction | {r['cnds8_fc7']:.1f} vs "
        f"{r['googlenet_pool']:.1f} img/s | CNDS-8 at {r['cnds8_fc7'] / r['googlenet_pool']:.2f}x |")

    print("\n| measurement | figures | ratio |\n|---|---|---|")
    print("\n".join(rows))
    print(f"\n{THREADS} threads; onnxruntime {__import__('onnxruntime').__version__}, torch {torch.__version__}, "
          f"batch {BATCH} unless stated; best of {args.rounds} alternating rounds of {args.seconds:g} s; "
          f"load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end ({os.cpu_count()} CPUs).")


if __name__ == "__main__":
    sys.exit(main())
