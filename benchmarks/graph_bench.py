"""Graph-spec benchmarks for GoogLeNet (specs/googlenet.cnds): ratios measured side by side in one run.

1. ``cnds-compile specs/googlenet.cnds`` vs ``python -c "import torch"`` (whole processes, interleaved):
   checking a graph spec never imports torch; goal ≤ 1/5 of the import.
2. The compiled GoogLeNet training step (both auxiliary heads, eq. 1 loss, backward) vs a hand-written
   ``nn.Module`` of the same net holding the same weights (checked equal first); goal ≤ 1.02x.
3. Inference of the deploy trunk: onnxruntime vs PyTorch eager (the compiled deploy module), and vs
   torchvision's ``googlenet`` (batchnorm, 3x3 "5x5" paths; 6.6 M parameters) in eager mode.

Competitors are interleaved round by round and medians reported (the machines are shared and noisy).

    python -m benchmarks.graph_bench [--rounds 7] [--batch 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnds_compiler import compile_spec
from cnds_compiler.backends.pytorch import (  # the dropout kernel the compiled module runs
    Dropout,
    build_module,
)
from cnds_compiler.lowering import plan_deploy
from cnds_compiler.lowering.onnx_export import Weights, build_deploy_module, export_onnx
from cnds_compiler.lowering.parity import cpu_session

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "googlenet.cnds"
AUX_WEIGHT = 0.3


# ---- the hand-written twin of specs/googlenet.cnds --------------------------------------------------
def _conv(cin: int, cout: int, k: int = 1, s: int = 1, p: int = 0) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, s, p)


class HandInception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()
        self.b1, self.b3_reduce, self.b3 = _conv(cin, c1), _conv(cin, c3r), _conv(c3r, c3, 3, p=1)
        self.b5_reduce, self.b5, self.pool_proj = _conv(cin, c5r), _conv(c5r, c5, 5, p=2), _conv(cin, cp)
        self.pool = nn.MaxPool2d(3, 1, 1, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            F.relu(self.b1(x), inplace=True),
            F.relu(self.b3(F.relu(self.b3_reduce(x), inplace=True)), inplace=True),
            F.relu(self.b5(F.relu(self.b5_reduce(x), inplace=True)), inplace=True),
            F.relu(self.pool_proj(self.pool(x)), inplace=True),
        ], 1)


class HandAux(nn.Module):
    def __init__(self, cin: int, classes: int) -> None:
        super().__init__()
        self.conv, self.fc, self.classifier = _conv(cin, 128), nn.Linear(2048, 1024), nn.Linear(1024, classes)
        self.drop = Dropout(0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(F.avg_pool2d(x, 5, 3, ceil_mode=True)), inplace=True)
        x = self.drop(F.relu(self.fc(torch.flatten(x, 1)), inplace=True))
        return self.classifier(x)


TABLE = {"3a": (192, 64, 96, 128, 16, 32, 32), "3b": (256, 128, 128, 192, 32, 96, 64),
         "4a": (480, 192, 96, 208, 16, 48, 64), "4b": (512, 160, 112, 224, 24, 64, 64),
         "4c": (512, 128, 128, 256, 24, 64, 64), "4d": (512, 112, 144, 288, 32, 64, 64),
         "4e": (528, 256, 160, 320, 32, 128, 128), "5a": (832, 256, 160, 320, 32, 128, 128),
         "5b": (832, 384, 192, 384, 48, 128, 128)}


class HandGoogLeNet(nn.Module):
    """BVLC GoogLeNet written by hand with the compiled module's parameter names."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1, self.conv2_reduce, self.conv2 = _conv(3, 64, 7, 2, 3), _conv(64, 64), _conv(64, 192, 3, p=1)
        self.lrn = nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0)
        for name, args in TABLE.items():
            self.add_module(f"inception_{name}", HandInception(*args))
        self.classifier, self.drop = nn.Linear(1024, classes), Dropout(0.4)
        self.aux = nn.ModuleDict({"loss1": HandAux(512, classes), "loss2": HandAux(528, classes)})

    def forward(self, x: torch.Tensor, with_aux: bool = True):
        pool = lambda t: F.max_pool2d(t, 3, 2, ceil_mode=True)  # noqa: E731
        x = self.lrn(pool(F.relu(self.conv1(x), inplace=True)))
        x = pool(self.lrn(F.relu(self.conv2(F.relu(self.conv2_reduce(x), inplace=True)), inplace=True)))
        x = pool(self.inception_3b(self.inception_3a(x)))
        x = self.inception_4a(x)
        aux1 = self.aux["loss1"](x) if with_aux else None
        x = self.inception_4d(self.inception_4c(self.inception_4b(x)))
        aux2 = self.aux["loss2"](x) if with_aux else None
        x = pool(self.inception_4e(x))
        x = self.inception_5b(self.inception_5a(x))
        x = self.drop(F.avg_pool2d(x, 7, 1, ceil_mode=True))
        return self.classifier(torch.flatten(x, 1)), aux1, aux2


# ---- measurements ---------------------------------------------------------------------------------------
def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def bench_check_vs_import(rounds: int) -> dict:
    compile_cmd = [sys.executable, "-m", "cnds_compiler.cli", str(SPEC), "-q"]
    import_cmd = [sys.executable, "-c", "import torch"]
    times: dict[str, list[float]] = {"cnds-compile googlenet.cnds": [], "import torch": []}
    for _ in range(rounds):
        for name, cmd in (("cnds-compile googlenet.cnds", compile_cmd), ("import torch", import_cmd)):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    result = {k: _median_ms(v) for k, v in times.items()}
    result["ratio"] = result["cnds-compile googlenet.cnds"] / result["import torch"]
    return result


def _step(model, x, y, compiled: bool) -> None:
    if compiled:
        out = model(x, branches="all")
        main, aux1, aux2 = out.logits, out.aux["loss1"], out.aux["loss2"]
    else:
        main, aux1, aux2 = model(x)
    loss = F.cross_entropy(main, y) + AUX_WEIGHT * (F.cross_entropy(aux1, y) + F.cross_entropy(aux2, y))
    loss.backward()
    model.zero_grad(set_to_none=True)


def bench_training_step(rounds: int, batch: int) -> dict:
    net = compile_spec(SPEC)
    compiled = build_module(net, seed=0)
    hand = HandGoogLeNet(net.num_classes)
    hand.load_state_dict(compiled.state_dict(), strict=True)  # same names, same shapes: the same net
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, net.num_classes, (batch,))
    compiled.eval(), hand.eval()
    with torch.no_grad():
        out, ref = compiled(x, branches="all"), hand(x)
    same = all(torch.allclose(a, b, atol=1e-5) for a, b in
               ((out.logits, ref[0]), (out.aux["loss1"], ref[1]), (out.aux["loss2"], ref[2])))
    if not same:
        raise RuntimeError("compiled and hand-written GoogLeNet differ")
    compiled.train(), hand.train()
    for _ in range(2):  # warm-up
        _step(compiled, x, y, True)
        _step(hand, x, y, False)
    times: dict[str, list[float]] = {"compiled": [], "hand": []}
    for _ in range(rounds):
        for name, model in (("compiled", compiled), ("hand", hand)):
            start = time.perf_counter()
            _step(model, x, y, name == "compiled")
            times[name].append(time.perf_counter() - start)
    result = {f"{k}_ms": _median_ms(v) for k, v in times.items()}
    result["ratio"] = result["compiled_ms"] / result["hand_ms"]
    result["outputs_equal"] = same
    return result


def bench_inference(rounds: int, batch: int) -> dict:
    import torchvision

    net = compile_spec(SPEC)
    state = build_module(net, seed=0).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "googlenet.onnx"
        export_onnx(net, path, weights=state)
        session = cpu_session(path.read_bytes(), threads=torch.get_num_threads())
    deploy = build_deploy_module(plan_deploy(net), Weights(state, "seed 0", False))
    tv = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).eval()
    x = torch.randn(batch, 3, 224, 224)
    runners = {
        "onnxruntime": lambda: session.run(None, {session.get_inputs()[0].name: x.numpy()}),
        "cnds eager": lambda: deploy(x),
        "torchvision googlenet eager": lambda: tv(x),
    }
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        for run in runners.values():
            run()  # warm-up
        for _ in range(rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    result = {f"{k} img/s": batch / statistics.median(v) for k, v in times.items()}
    result["ort_vs_cnds_eager"] = result["onnxruntime img/s"] / result["cnds eager img/s"]
    result["ort_vs_torchvision_eager"] = result["onnxruntime img/s"] / result["torchvision googlenet eager img/s"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = {
        "threads": torch.get_num_threads(),
        "check_vs_import": bench_check_vs_import(args.rounds),
        "training_step": bench_training_step(args.rounds, args.batch),
        "inference": bench_inference(args.rounds, args.batch * 2),
    }
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
