"""``python -m benchmarks.paper --fast``: the paper reproduction runs end to end and its page reports its runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import paper
from cnds_compiler.data import FASHION_MNIST_DIR

from .conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("curves.png", "fig2a_probe_cnn8_caffe.png", "fig2a_probe_cnn8_bias0.png", "fig2a_probe_cnds13_caffe.png",
           "fig2a_probe_cnds13_bias0.png", "fig2bd_gradients.png", "fig2bd_gradients_gauss.png")

needs_fmnist = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                                  reason="Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    out, page, figures = tmp / "runs", tmp / "PAPER.md", tmp / "figures"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.paper", "--fast", "--out", str(out), "--page", str(page),
         "--figures", str(figures)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    return {"out": out, "page": page, "text": page.read_text(), "figures": figures, "results": results,
            "stdout": proc.stdout}


@needs_fmnist
def test_fast_mode_writes_page_table_and_figures(fast_run):
    text, figures = fast_run["text"], fast_run["figures"]
    assert text.startswith("# The paper at small scale")
    assert "python -m benchmarks.paper --fast" in text
    for row in paper.ROWS:  # one Table 1 line per row, trained
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| {row.label} | {row.convs} |")), None)
        assert line is not None, row.label
        assert "not run" not in line
    for claim in range(1, 6):
        assert re.search(rf"^\| {claim} \| .+ \| \*\*[^*]+\*\*", text, re.M), f"claim {claim} has no verdict"
    for name in FIGURES:
        png = figures / name
        assert png.read_bytes()[:8] == PNG_MAGIC, name
    links = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert len(links) >= 6
    for link in links:  # every image the page shows exists where the page points
        assert (fast_run["page"].parent / link).is_file(), link


@needs_fmnist
def test_page_numbers_come_from_the_runs(fast_run):
    import torch

    from cnds_compiler import compile_spec
    from cnds_compiler.backends.pytorch import build_module
    from cnds_compiler.checkpoint import load_checkpoint
    from cnds_compiler.data import load_source, make_loader
    from cnds_compiler.train.trainer import evaluate

    res, text = fast_run["results"], fast_run["text"]
    assert {r["row"] for r in res["records"]} == {row.key for row in paper.ROWS}
    for rec in res["records"]:
        # results.json's per-epoch numbers are the trainer's own log
        logged = [json.loads(line) for line in (Path(rec["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert [m["val_top1_error"]["main"] for m in logged] == [e["val_top1_error"] for e in rec["epochs"]]
        # the table prints them
        row = paper.ROW[rec["row"]]
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row.label} | {row.convs} |"))
        assert f"| {rec['test_top1_error'] * 100:.2f} | {rec['test_top5_error'] * 100:.2f} |" in line
        assert (Path(rec["run_dir"]) / "gradients.json").is_file()
    # the final test error is the final weights' error: evaluate one checkpoint again
    rec = next(r for r in res["records"] if r["row"] == "cnds8")
    net = compile_spec(ROOT / rec["spec"])
    model = build_module(net)
    model.load_state_dict(load_checkpoint(Path(rec["run_dir"]) / "last.pt", net)["model"])
    data = load_source("fashion-mnist", net, limit_train=1, limit_val=paper.FAST.test, seed=0)
    top1, top5, _ = evaluate(model, make_loader(data.val, 256, shuffle=False), torch.device("cpu"), model.branch_names)
    assert top1["main"] == pytest.approx(rec["test_top1_error"])
    assert top5["main"] == pytest.approx(rec["test_top5_error"])
    # the init-from row really started from its CNN-5
    vgg = next(r for r in res["records"] if r["row"] == "cnn8_vgg")
    assert vgg["init_from"].endswith("cnn5/seed0/last.pt")


@needs_fmnist
def test_onnx_runtime_accuracy_is_reported(fast_run):
    onnx = fast_run["results"]["onnx"]
    best = min(fast_run["results"]["records"], key=lambda r: r["test_top1_error"])
    assert (onnx["row"], onnx["seed"]) == (best["row"], best["seed"])
    assert Path(onnx["onnx"]).is_file()
    # the torch-free runtime reproduces the model's test accuracy (at most one image in 100 differs)
    assert abs(onnx["runtime_top1_error"] - onnx["torch_top1_error"]) <= 0.01
    assert f"test accuracy {100 * (1 - onnx['runtime_top1_error']):.2f} %" in fast_run["text"]
    assert "test accuracy through cnds_runtime" in fast_run["stdout"]


@needs_fmnist
def test_probe_and_gradient_sections_report_the_runs(fast_run):
    res, text = fast_run["results"], fast_run["text"]
    cnn8 = res["probes"]["cnn8"]["variants"]
    for variant in cnn8.values():
        assert variant["seeds"][0]["message"] in text
    he = res["gradients"]["he"]
    assert set(paper.GRAD_LAYERS) <= set(he)
    ratio = he["conv1"]["whole"][0]
    assert f"{ratio:.2f}×" in text


def test_epochs_to_reach_and_verdicts():
    rec = {"epochs": [{"epoch": 1, "val_top1_error": 0.5}, {"epoch": 2, "val_top1_error": 0.2},
                      {"epoch": 3, "val_top1_error": 0.1}]}
    assert paper.epochs_to_reach(rec, 0.2) == 2
    assert paper.epochs_to_reach(rec, 0.05) is None
    rows = {"a": {0: {"test_top1_error": 0.10}, 1: {"test_top1_error": 0.12}},
            "b": {0: {"test_top1_error": 0.11}, 1: {"test_top1_error": 0.115}}}
    assert paper._better(rows, "a", "b")["verdict"] == "mixed"
    assert paper._better(rows, "b", "a")["verdict"] == "failed"
    rows["a"][1]["test_top1_error"] = 0.105
    assert paper._better(rows, "a", "b")["verdict"] == "held"
    assert paper._better(rows, "a", "missing")["verdict"] == "not run"
    assert paper.fmt_pm([0.1, 0.12]) == "11.00 ± 1.00"
    assert paper.fmt_pm([0.1]) == "10.00"
