"""cnds-import on torchvision models: import time, parameter counts and parity, as a table.

For each model: the time to trace it and write and compile its spec (median of ``--rounds``), its
parameters (torchvision's and the spec's), the max |difference| of the cnds module with torchvision's
weights against torchvision's eval forward on a random batch, and (``--onnx``) of its ONNX export.

    python -m benchmarks.import_bench [--rounds 3] [--onnx] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cnds_compiler.backends.pytorch import build_module
from cnds_compiler.frontend import compile_text
from cnds_compiler.importers.torchvision import MODELS, import_torchvision


def measure(name: str, rounds: int, onnx: bool) -> dict:
    size = 299 if name == "inception_v3" else 224  # its stem needs 299x299
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        imported = import_torchvision(name, (3, size, size))
        net = compile_text(imported.text, f"{name}.cnds")
        times.append(time.perf_counter() - start)
    model = build_module(net, seed=0).eval()
    model.load_state_dict(imported.state_dict())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = imported.model.eval()(x)
        diff = (model(x).logits - ref).abs().max().item()
    row = {"model": name, "import_s": statistics.median(times), "params": imported.params,
           "spec_params": sum(layer.params for layer in net.trunk), "max_abs_diff": diff,
           "statements": len(net.statements)}
    if onnx:
        import onnxruntime as ort

        from cnds_compiler.lowering.onnx_export import export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            export_onnx(net, path, weights=imported.model.state_dict())
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (got,) = session.run(["logits"], {session.get_inputs()[0].name: x.numpy()})
        row["onnx_max_abs_diff"] = float(abs(got - ref.numpy()).max())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--onnx", action="store_true", help="also export each model and compare onnxruntime")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--models", help="comma-separated torchvision names (default: the tested ones)")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else MODELS
    rows = [measure(name, args.rounds, args.onnx) for name in names]
    print("| model | parameters (torchvision = spec) | statements | import + compile | max abs diff vs torchvision |"
          + (" ONNX max abs diff |" if args.onnx else ""))
    print("|---|---|---|---|---|" + ("---|" if args.onnx else ""))
    for r in rows:
        same = "=" if r["params"] == r["spec_params"] else "≠"
        line = (f"| {r['model']} | {r['params']:,} {same} {r['spec_params']:,} | {r['statements']} | "
                f"{r['import_s']:.2f} s | {r['max_abs_diff']:.1e} |")
        if args.onnx:
            line += f" {r['onnx_max_abs_diff']:.1e} |"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
