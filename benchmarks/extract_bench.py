"""Feature extraction at scale, side by side (run: python -m benchmarks.extract_bench).

1. Local extraction (`extract_local`: JPEG files → features file) vs model-only onnxruntime on the same
   images already prepared, for the CNDS-8 trunk's fc7 in fp32 and int8; with the loader variants
   (serial = the old one-image-at-a-time main thread, threads, processes) and the per-image CPU cost of
   preparing an image, which bounds the ratio on a machine whose cores the model already fills; then the
   same comparison with onnxruntime on one thread in both, so that preparation has a core of its own.
2. The Ray engine with 2 actors vs the local engine on the same images (one local Ray started for it),
   and the per-actor steady-state throughput that the 100 M-image estimate is built on.
3. Peak memory (RSS) of `cnds-extract` for 1,000 vs 10,000 images, each in a fresh process.

Every comparison runs its contenders in alternating rounds and reports the median round. Images are
synthetic JPEGs of ImageNet's typical size (500x375 and 375x500, quality 90), made once. Prints a
Markdown block for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BATCH = 32  # cnds-extract's default batch size
SHARD = 1000  # memory runs: the same shard size for 1k and 10k images (the default, ~32 MB, is 2048 here)


def make_models(work: Path) -> dict[str, Path]:
    """places_cnds8 exported with fc7 (spec initialisation, seed 0), and its int8 version (as infer_bench)."""
    fp32, int8 = work / "cnds8_fc7.onnx", work / "cnds8_fc7_int8.onnx"
    if not (fp32.exists() and int8.exists()):
        from cnds_compiler import compile_spec
        from cnds_compiler.lowering.onnx_export import export_onnx
        from cnds_compiler.lowering.precision import quantize_int8

        net = compile_spec(ROOT / "specs/places_cnds8.cnds")
        export_onnx(net, fp32, features=["fc7"])
        calib = [np.random.default_rng(i).standard_normal((4, *net.input.dims), dtype=np.float32) for i in range(4)]
        int8.write_bytes(quantize_int8(fp32.read_bytes(), calib, "input"))
    return {"fp32": fp32, "int8": int8}


def make_images(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    rng = np.random.default_rng(0)
    for i, p in enumerate(paths):
        w, h = (500, 375) if i % 3 else (375, 500)
        if p.exists():
            continue
        base = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        noisy = np.clip(np.asarray(base, np.float32) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(p, quality=90)
    return paths


def rounds(fns: dict, n_rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each callable, in alternating rounds, after one warm-up call each."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n_rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - start)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def prep_cost(model, paths: list[Path]) -> float:
    """CPU ms to prepare one image (decode, resize, crop, normalise), one thread, best of 3 passes."""
    pre = model.preprocess
    out = np.empty((pre.channels, *pre.size), np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for p in paths:
            pre.normalise_into(pre.load(p), out)
        best = min(best, (time.process_time() - start) / len(paths) * 1e3)
    return best


def local_vs_model(models: dict[str, Path], paths: list[Path], args, tmp: Path, row) -> dict[str, float]:
    from cnds_runtime import CndsModel
    from cnds_runtime.extract import extract_local
    from cnds_runtime.pipeline import default_workers

    rates = {}
    for precision, path in models.items():
        n = args.images if precision == "fp32" else 2 * args.images
        files = [paths[i % len(paths)] for i in range(n)]
        model_only = CndsModel(path, device="cpu")  # onnxruntime's defaults: all cores, spinning threads
        pipelined = CndsModel(path, device="cpu", spinning=False)
        x = model_only.preprocess.batch(paths[:BATCH])

        def run_model(m=model_only, x=x, n=n):
            for start in range(0, n, BATCH):
                m.run(x[:min(BATCH, n - start)])

        def run_extract(m, workers, loader="threads", files=files, precision=precision):
            out = tmp / f"bench_{precision}.npz"
            extract_local(m, files, out, batch_size=BATCH, workers=workers, loader=loader)

        threads = default_workers()
        fns = {"model-only": run_model,
               f"extract, {threads} loader threads (default)": lambda m=pipelined, w=threads: run_extract(m, w),
               "extract, serial (one image at a time, main thread)": lambda m=model_only: run_extract(m, 0),
               "extract, 1 loader process": lambda m=pipelined: run_extract(m, 1, "processes")}
        r = rounds(fns, args.rounds)
        base = n / med(r["model-only"])
        cpu_ms = prep_cost(model_only, paths[:64])
        model_core_ms = os.cpu_count() * 1e3 / base  # core-ms per image if the model used every core all the time
        bound = model_core_ms / (model_core_ms + cpu_ms)
        for name, secs in r.items():
            rate = n / med(secs)
            if name == "model-only":
                row(f"| {precision}: model-only onnxruntime (prepared batches of {BATCH}) | {rate:.1f} img/s | 1.00 |")
            else:
                row(f"| {precision}: {name} | {rate:.1f} img/s | **{rate / base:.3f}** |")
            rates[f"{precision} {name}"] = rate
        row(f"| {precision}: CPU to prepare one image / model core-time per image | {cpu_ms:.2f} ms / "
            f"{model_core_ms:.1f} ms | bound {bound:.3f} |")
        rates[f"{precision} model-only"] = base
    return rates


def ray_vs_local(models: dict[str, Path], paths: list[Path], args, tmp: Path, row) -> dict:
    import ray
    from cnds_runtime import CndsModel
    from cnds_runtime.extract import extract_local, extract_ray
    from cnds_runtime.pipeline import default_workers

    results = {}
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    row(f"| local Ray cluster start (ray.init, {os.cpu_count()} CPUs) | {time.perf_counter() - start:.1f} s | |")
    try:
        for precision in ("fp32", "int8"):
            path = models[precision]
            n = args.ray_images if precision == "fp32" else 2 * args.ray_images
            files = [paths[i % len(paths)] for i in range(n)]
            shard = n // 8
            local_model = CndsModel(path, device="cpu", spinning=False)
            actor_rates: list[float] = []

            def run_local(files=files, precision=precision, m=local_model, shard=shard):
                shutil.rmtree(tmp / f"l_{precision}.parquet.parts", ignore_errors=True)
                extract_local(m, files, tmp / f"l_{precision}.parquet", batch_size=BATCH, workers=default_workers(),
                              shard_size=shard)

            def run_ray(files=files, precision=precision, path=path, shard=shard, rates=actor_rates):
                out = tmp / f"r_{precision}.parquet"
                shutil.rmtree(out, ignore_errors=True)
                s = extract_ray(path, files, out, workers=2, threads=1, batch_size=BATCH, shard_size=shard)
                rates.extend(s.actor_rates)

            r = rounds({"local": run_local, "ray": run_ray}, args.ray_rounds)
            local, rayr = n / med(r["local"]), n / med(r["ray"])
            per_actor = med(actor_rates)
            row(f"| {precision}: Ray engine, 2 actors x 1 thread vs local engine ({n} images, shards of {shard}, "
                f"wall incl. actor start) | {rayr:.1f} vs {local:.1f} img/s | **{rayr / local:.2f}x** |")
            row(f"| {precision}: per-actor steady throughput (median shard; 2 actors sharing 2 cores) | "
                f"{per_actor:.1f} img/s per actor, x2 = {2 * per_actor:.1f} | {2 * per_actor / local:.2f}x local |")
            results[precision] = {"ray": rayr, "local": local, "per_actor": per_actor}
    finally:
        ray.shutdown()
    return results


def peak_rss(model: Path, folder: Path, out: Path) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of `cnds-extract` in a fresh process."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report this (large) parent's RSS
    code = ("import re, sys, time; from cnds_runtime.cli import extract_main; t = time.perf_counter(); "
            "rc = extract_main(sys.argv[1:]); hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()); "
            "print(rc, hwm.group(1), time.perf_counter() - t)")
    r = subprocess.run([sys.executable, "-c", code, str(model), str(folder), "--out", str(out), "--no-progress",
                        "--shard-size", str(SHARD)],
                       capture_output=True, text=True, check=True)
    rc, kib, secs = r.stdout.strip().splitlines()[-1].split()
    assert rc == "0", r.stdout + r.stderr
    return int(kib) / 1024, float(secs)


def memory(models: dict[str, Path], paths: list[Path], args, tmp: Path, row) -> dict:
    from cnds_runtime import CndsModel

    dim = int(np.prod(CndsModel(models["int8"], device="cpu").output("fc7").shape))
    res = {}
    for n in args.memory_images:
        folder = tmp / f"links{n}"
        folder.mkdir()
        for i in range(n):  # links to the same JPEGs: each is still decoded and resized
            os.symlink(paths[i % len(paths)], folder / f"{i:06d}.jpg")
        for fmt in ("npz", "parquet"):
            mib, secs = peak_rss(models["int8"], folder, tmp / f"mem{n}.{fmt}")
            res[(n, fmt)] = mib
            row(f"| int8: peak RSS of cnds-extract, {n:,} images -> .{fmt}, shards of {SHARD} | {mib:.0f} MiB "
                f"({secs:.0f} s) | "
                f"all features would be {n * dim * 4 / 2**20:.0f} MiB |")
    return res


def free_core(models: dict[str, Path], paths: list[Path], args, tmp: Path, row) -> dict[str, float]:
    """The pipeline where preparing images has a core of its own: onnxruntime held to one thread in both
    contenders, so the loader thread runs on the second core. This is the setting the 2-core bound above
    does not limit (a machine with cores to spare, or a GPU doing the model): the ratio says how much of
    the preparation the pipeline hides behind the model."""
    from cnds_runtime import CndsModel
    from cnds_runtime.extract import extract_local

    ratios = {}
    for precision, path in models.items():
        # 4x the images of the other sections: the first batch's preparation cannot overlap anything, and at
        # one model thread it would otherwise be ~4 % of a round
        n = 4 * (args.images if precision == "fp32" else 2 * args.images)
        files = [paths[i % len(paths)] for i in range(n)]
        model_only = CndsModel(path, device="cpu", threads=1)
        pipelined = CndsModel(path, device="cpu", threads=1, spinning=False)
        x = model_only.preprocess.batch(paths[:BATCH])

        def run_model(m=model_only, x=x, n=n):
            for start in range(0, n, BATCH):
                m.run(x[:min(BATCH, n - start)])

        def run_extract(m=pipelined, files=files, precision=precision):
            extract_local(m, files, tmp / f"free_core_{precision}.npz", batch_size=BATCH, workers=1)

        r = rounds({"model": run_model, "extract": run_extract}, args.rounds)
        base, rate = n / med(r["model"]), n / med(r["extract"])
        ratios[precision] = rate / base
        row(f"| {precision}, onnxruntime on 1 thread in both, 1 loader thread on the other core: extract vs "
            f"model-only | {rate:.1f} vs {base:.1f} img/s | **{rate / base:.3f}** |")
    return ratios


def variants(models: dict[str, Path], paths: list[Path], args, tmp: Path, row) -> dict:
    """Where the preparation time goes, and the loader settings that were chosen against."""
    from cnds_runtime import CndsModel
    from cnds_runtime.pipeline import BatchLoader
    from cnds_runtime.preprocess import center_crop, open_image
    from PIL import Image

    model = CndsModel(models["int8"], device="cpu")
    pre = model.preprocess
    (rh, rw), (ch, cw) = pre.resize, pre.size
    imgs = [open_image(p) for p in paths[:64]]
    top, left = int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))

    def box_resize(img):  # resize only the source region the centre crop keeps
        sx, sy = img.size[0] / rw, img.size[1] / rh
        return img.resize((cw, ch), Image.BILINEAR, box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))

    def cpu_ms(fn, items) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            for item in items:
                fn(item)
            best = min(best, (time.process_time() - start) / len(items) * 1e3)
        return best

    crops = [pre.load(p) for p in paths[:64]]
    out = np.empty((pre.channels, ch, cw), np.float32)
    figures = {"decode": cpu_ms(open_image, paths[:64]),
               "resize": cpu_ms(lambda im: im.resize((rw, rh), Image.BILINEAR), imgs),
               "crop": cpu_ms(lambda im: np.asarray(center_crop(im, (ch, cw))), [i.resize((rw, rh)) for i in imgs[:8]]),
               "normalise": cpu_ms(lambda c: pre.normalise_into(c, out), crops),
               "box resize": cpu_ms(box_resize, imgs)}
    diff = [np.abs(np.asarray(box_resize(im), np.int16) - c.astype(np.int16)) for im, c in zip(imgs, crops, strict=True)]
    figures["box max diff"] = max(int(d.max()) for d in diff)
    figures["box differing"] = float(np.mean([np.mean(d > 0) for d in diff]))
    row(f"| prepare one 500x375 JPEG, CPU ms (one thread): decode / resize to {rh}x{rw} / crop / normalise | "
        f"{figures['decode']:.2f} / {figures['resize']:.2f} / {figures['crop']:.2f} / {figures['normalise']:.2f} | |")
    row(f"| not taken: resize only the crop's source box | {figures['box resize']:.2f} ms instead of "
        f"{figures['resize'] + figures['crop']:.2f} | {figures['box differing']:.1%} of pixels differ, by at most "
        f"{figures['box max diff']}/255 |")
    n = 2 * args.images
    files = [paths[i % len(paths)] for i in range(n)]
    spin, calm = CndsModel(models["int8"], device="cpu"), CndsModel(models["int8"], device="cpu", spinning=False)
    x = spin.preprocess.batch(paths[:BATCH])

    def run_model():
        for start in range(0, n, BATCH):
            spin.run(x[:min(BATCH, n - start)])

    def pipe(m, workers):
        def run():
            for prepared in BatchLoader(m.preprocess, batch_size=BATCH, workers=workers)(files):
                m.run(prepared.array)
        return run

    r = rounds({"model": run_model, "1 thread, spinning": pipe(spin, 1), "2 threads, spinning": pipe(spin, 2),
                "1 thread, no spinning": pipe(calm, 1), "2 threads, no spinning (default)": pipe(calm, 2)},
               args.rounds)
    base = n / med(r.pop("model"))
    for name, secs in r.items():
        figures[name] = n / med(secs) / base
        row(f"| int8 loader variants: {name} (vs model-only {base:.1f} img/s) | {n / med(secs):.1f} img/s | "
            f"{figures[name]:.3f} |")
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=64, help="images per fp32 round (int8: twice as many)")
    p.add_argument("--ray-images", type=int, default=192, help="images per fp32 Ray round (int8: twice)")
    p.add_argument("--ray-rounds", type=int, default=3)
    p.add_argument("--memory-images", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000])
    p.add_argument("--skip", default="", help="comma list of sections to skip: local, freecore, variants, ray, memory")
    p.add_argument("--work", default=str(ROOT / "runs" / "extract_bench"), help="cached models and images")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    models = make_models(work)
    paths = make_images(work / "jpeg", 96)
    rows: list[str] = []

    def row(text: str) -> None:
        rows.append(text)
        print(text, flush=True)

    figures: dict = {}
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory(prefix="extract-bench-") as tmp:
        if "local" not in skip:
            figures["local"] = local_vs_model(models, paths, args, Path(tmp), row)
        if "freecore" not in skip:
            figures["free_core"] = free_core(models, paths, args, Path(tmp), row)
        if "variants" not in skip:
            figures["variants"] = variants(models, paths, args, Path(tmp), row)
        if "ray" not in skip:
            figures["ray"] = ray_vs_local(models, paths, args, Path(tmp), row)
        if "memory" not in skip:
            figures["memory"] = {f"{n} {fmt}": v for (n, fmt), v in memory(models, paths, args, Path(tmp), row).items()}
    import onnxruntime

    print("\n| measurement | figure | ratio |\n|---|---|---|")
    print("\n".join(rows))
    print(f"\n{os.cpu_count()} CPUs; onnxruntime {onnxruntime.__version__}; batch {BATCH}; median of {args.rounds} "
          f"alternating rounds ({args.ray_rounds} for Ray); load average {load0:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end; peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB.")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
