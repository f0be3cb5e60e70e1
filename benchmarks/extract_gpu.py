"""Feature extraction with onnxruntime's CUDA provider, in one prepared run of a few minutes (issue 13, item 5).

For the places_cnds8 trunk exported with ``--features fc7`` in fp32 and fp16: model-only throughput on
the GPU (batches prepared beforehand, at batch 32 and 128), and the local pipeline (`extract_local`: JPEG
files → decode/resize/crop/normalise in loader threads → CUDA → features file) against model-only at the
same batch, with the default loader threads and with one per free core. Alternating rounds, medians,
ratios printed, the GPU named. The images are extract_bench's synthetic ImageNet-sized JPEGs.

    python -m benchmarks.extract_gpu [--images 1024] [--rounds 5] [--json out.json]

Without a usable CUDA provider it says why and exits 0 (CI never needs a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.extract_bench import ROOT, make_images, med, rounds


def make_models(work: Path) -> dict[str, Path]:
    """The places_cnds8 trunk to fc7 (spec initialisation, seed 0) in fp32 and fp16, cached in ``work``."""
    from cnds_compiler import compile_spec
    from cnds_compiler.lowering.onnx_export import export_onnx

    net = compile_spec(ROOT / "specs/places_cnds8.cnds")
    models = {}
    for precision in ("fp32", "fp16"):
        path = work / f"cnds8_fc7_{precision}.onnx"
        if not path.exists():
            export_onnx(net, path, features=["fc7"], precision=precision)
        models[precision] = path
    return models


def gpu_name() -> str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "a CUDA GPU (nvidia-smi not found)"
    out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                         text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "a CUDA GPU"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024, help="images per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--work", default=str(ROOT / "runs" / "extract_gpu"), help="cached models and images")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    from cnds_runtime import CndsModel
    from cnds_runtime.errors import ModelError
    from cnds_runtime.extract import extract_local
    from cnds_runtime.pipeline import default_workers
    from cnds_runtime.providers import CUDA, choose_providers

    try:
        choose_providers("cuda")
    except ModelError as e:
        print(f"extract_gpu: {e}; nothing measured (run it where a GPU is available)")
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = make_models(work)
    paths = make_images(work / "jpeg", 96)
    files = [paths[i % len(paths)] for i in range(args.images)]
    cores = os.cpu_count() or 1
    loaders = sorted({default_workers(), max(1, cores - 1)})
    print(f"{gpu_name()}; {cores} CPU cores; {args.images} images a round, {args.rounds} alternating rounds, "
          "medians", flush=True)
    print("\n| measurement | figure | ratio |\n|---|---|---|", flush=True)
    figures: dict = {"gpu": gpu_name(), "cores": cores}
    with tempfile.TemporaryDirectory(prefix="extract-gpu-") as tmp:
        for precision, path in models.items():
            model = CndsModel(path, device="cuda")
            if model.providers[0] != CUDA:
                print(f"extract_gpu: the {precision} session runs on {model.providers}, not CUDA; nothing measured")
                return 1
            for batch in (32, 128):
                x = model.preprocess.batch([paths[i % len(paths)] for i in range(batch)])

                def run_model(m=model, x=x, batch=batch):
                    for start in range(0, args.images, batch):
                        m.run(x[:min(batch, args.images - start)])

                fns = {"model-only": run_model}
                for n in loaders:
                    def run_extract(m=model, n=n, batch=batch, name=f"{precision}_{batch}_{n}.npz"):
                        extract_local(m, files, Path(tmp) / name, batch_size=batch, workers=n)
                    fns[f"extract, {n} loader threads"] = run_extract
                r = rounds(fns, args.rounds)
                base = args.images / med(r.pop("model-only"))
                figures[f"{precision} batch {batch} model-only img/s"] = base
                print(f"| {precision}, batch {batch}: model-only on CUDA (prepared batches) | {base:,.0f} img/s | 1.00 |",
                      flush=True)
                for name, secs in r.items():
                    rate = args.images / med(secs)
                    figures[f"{precision} batch {batch} {name}"] = rate / base
                    print(f"| {precision}, batch {batch}: {name} | {rate:,.0f} img/s | **{rate / base:.3f}** |",
                          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
