"""``python -m benchmarks.paper --fast``: the reproduction runs end to end and its page reports its runs;
the verdict statistics on their own."""

from __future__ import annotations

import json
import math
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
           "fig2a_probe_cnds13_bias0.png", "fig2bd_gradients.png", "fig2bd_gradients_13.png")

needs_fmnist = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                                  reason="Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    out, page, figures = tmp / "runs", tmp / "PAPER.md", tmp / "figures"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "runtime")])}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.paper", "--fast", "--out", str(out), "--page", str(page),
         "--figures", str(figures)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    return {"out": out, "page": page, "text": page.read_text(), "figures": figures, "results": results,
            "stdout": proc.stdout}


def _table_line(text: str, row) -> str | None:
    return next((ln for ln in text.splitlines() if ln.startswith(f"| {row.label} | `specs/")), None)


@needs_fmnist
def test_fast_mode_writes_page_table_and_figures(fast_run):
    text, figures = fast_run["text"], fast_run["figures"]
    assert text.startswith("# The paper at small scale")
    assert "python -m benchmarks.paper --fast" in text
    for row in paper.ROWS:  # one Table 1 line per table row, trained
        line = _table_line(text, row)
        assert (line is not None) == row.in_table, row.label
    for claim in range(1, 7):
        assert re.search(rf"^\| {claim} \| .+ \| .*\*\*(held|not held|inconclusive|untestable)\*\*", text, re.M), claim
    for name in FIGURES:
        assert (figures / name).read_bytes()[:8] == PNG_MAGIC, name
    links = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert len(links) >= 5
    for link in links:  # every image the page shows exists where the page points
        assert (fast_run["page"].parent / link).is_file(), link


@needs_fmnist
def test_pilot_runs_first_and_fixes_init_and_target(fast_run):
    res = fast_run["results"]
    pilot, records = res["pilot"], res["records"]
    assert [t["init"] for t in pilot["trials"]] == [i.key for i in paper.INITS]
    chosen = next(t for t in pilot["trials"] if t["learns"])  # the rule: the first candidate that learns
    assert pilot["chosen"] == chosen["init"] and pilot["target"] == chosen["final_val_top1_error"]
    pilot_done = max(r["finished"] for r in records if r["row"] == "cnn5" and r["seed"] == pilot["seed"])
    deep = [r for r in records if r["row"] != "cnn5"]
    assert deep and all(r["started"] >= pilot_done for r in deep)  # no deep run before the choice
    assert {r["init"] for r in deep} == {pilot["chosen"]}
    assert f"validation error ≤ {pilot['target'] * 100:.2f} %" in fast_run["text"]


@needs_fmnist
def test_page_numbers_come_from_the_runs(fast_run):
    import torch

    from cnds_compiler import compile_spec
    from cnds_compiler.backends.pytorch import build_module
    from cnds_compiler.checkpoint import load_checkpoint
    from cnds_compiler.data import load_source, make_loader
    from cnds_compiler.train.evaluate import evaluate

    res, text = fast_run["results"], fast_run["text"]
    regime = paper.FAST
    init = res["pilot"]["chosen"]
    mine = [r for r in res["records"] if r["init"] == init]
    assert {r["row"] for r in mine} == {row.key for row in paper.ROWS}
    for rec in mine:
        # results.json's per-epoch numbers are the trainer's own log, on the held-out split
        run = Path(rec["run_dir"])
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["val_top1_error"]["main"] for m in logged] == [e["val_top1_error"] for e in rec["epochs"]]
        data = json.loads((run / "data.json").read_text())
        assert data["val_split"] == regime.val_split and data["split_seed"] == regime.split_seed
        assert (run / "gradients.json").is_file()
        row = paper.ROW[rec["row"]]
        if row.in_table:  # the table prints the test errors
            assert f"| {rec['test_top1_error'] * 100:.2f} | {rec['test_top5_error'] * 100:.2f} |" in _table_line(text, row)
    by = {r["row"]: r for r in mine}
    # matched budgets: the VGG row's CNN-5 and CNN-8 epochs add up to every other row's
    assert len(by["cnn5_pre"]["epochs"]) + len(by["cnn8_vgg"]["epochs"]) == len(by["cnds8"]["epochs"]) == regime.epochs
    assert by["cnn8_vgg"]["init_from"].endswith(f"cnn5_pre_{init}/seed0/last.pt")
    # the final test error is the final weights' error on the test set: evaluate one checkpoint again
    rec = by["cnds8"]
    net = compile_spec(ROOT / rec["spec"])
    model = build_module(net)
    model.load_state_dict(load_checkpoint(Path(rec["run_dir"]) / "last.pt", net)["model"])
    test = load_source("fashion-mnist", net, limit_train=1, limit_val=regime.test, seed=0)
    top1, top5, _ = evaluate(model, make_loader(test.val, 256, shuffle=False), torch.device("cpu"), model.branch_names)
    assert top1["main"] == pytest.approx(rec["test_top1_error"]) and top5["main"] == pytest.approx(rec["test_top5_error"])
    # the constant-α row really kept α: its branch weight is the same every epoch, CNDS-8's decays
    assert len({tuple(e["alphas"].values()) for e in by["cnds8_const"]["epochs"]}) == 1
    assert len({tuple(e["alphas"].values()) for e in by["cnds8"]["epochs"]}) == regime.epochs


@needs_fmnist
def test_probe_sweep_and_onnx_are_reported(fast_run):
    res, text = fast_run["results"], fast_run["text"]
    regime = paper.FAST
    n = len(regime.probe_iters) * len(regime.probe_batches) * len(regime.probe_thresholds) * len(regime.probe_seeds)
    for key, *_ in paper.PROBE_NETS:
        for v in res["probes"][key]["variants"].values():
            assert v["n"] == n == len(v["settings"]) and v["matches"] == sum(s["matches"] for s in v["settings"])
            assert f"| {v['matches']} of {v['n']} | {v['share']:.0%} |" in text
    onnx = res["onnx"]
    assert abs(onnx["runtime_top1_error"] - onnx["torch_top1_error"]) <= 0.01
    assert f"test accuracy {100 * (1 - onnx['runtime_top1_error']):.2f} %" in text


def test_t_quantile_matches_the_t_table():
    assert paper.t_quantile(0.975, 2) == pytest.approx(4.302652729749464, rel=1e-9)
    assert paper.t_quantile(0.975, 1) == pytest.approx(12.706204736174707, rel=1e-9)
    assert paper.t_quantile(0.975, 30) == pytest.approx(2.0422724563012373, rel=1e-9)


def test_paired_verdict_categories():
    v = paper.paired_verdict
    # a consistent gain of about a point over 3 seeds: the interval excludes 0
    held = v([0.10, 0.11, 0.12], [0.11, 0.12, 0.13])
    assert held["verdict"] == "held" and held["ci"][0] > 0 and held["wins"] == 3
    assert held["mean_diff"] == pytest.approx(0.01) and held["ci"] == pytest.approx([0.01, 0.01])  # no spread
    # the same wins but noisy: 3 of 3 seeds better is not enough
    noisy = v([0.10, 0.10, 0.10], [0.101, 0.13, 0.105])
    assert noisy["wins"] == 3 and noisy["verdict"] == "inconclusive"
    d = [0.001, 0.03, 0.005]
    half = paper.t_quantile(0.975, 2) * (sum((x - sum(d) / 3) ** 2 for x in d) / 2) ** 0.5 / math.sqrt(3)
    assert noisy["ci"] == pytest.approx([sum(d) / 3 - half, sum(d) / 3 + half])
    assert v([0.12, 0.13, 0.14], [0.10, 0.11, 0.12])["verdict"] == "not held"
    assert v([0.9, 0.9, 0.9], [0.9, 0.9, 0.9], at_chance=(True, True))["verdict"] == "untestable"
    assert v([0.1], [0.2])["verdict"] == "inconclusive"  # one seed: no interval
    assert v([], [])["verdict"] == "not run"


def test_epochs_to_reach_and_censoring():
    def rec(errors):
        return {"epochs": [{"epoch": i + 1, "val_top1_error": e} for i, e in enumerate(errors)]}

    assert paper.epochs_to_reach(rec([0.5, 0.2, 0.1]), 0.2) == 2
    assert paper.epochs_to_reach(rec([0.5, 0.2, 0.1]), 0.05) is None
    regime = paper.FAST  # 2 epochs; the VGG row: 1 CNN-5 epoch, then 1 CNN-8 epoch
    rows = {"cnds8": {0: rec([0.3, 0.1]), 1: rec([0.3, 0.3])},
            "cnn8_vgg": {0: rec([0.1]), 1: rec([0.3])}}
    d = paper.compare_epochs(rows, "cnds8", "cnn8_vgg", 0.2, regime)
    # seed 0: CNDS-8 at epoch 2, the VGG CNN-8 at 1 + 1 (its CNN-5 epoch counts); seed 1: neither, censored at 3
    assert d["reached"] == {"cnds8": [2, None], "cnn8_vgg": [2, None]} and d["diffs"] == [0, 0]
    never = paper.compare_epochs({"cnds8": {0: rec([0.3, 0.3])}, "cnn8_vgg": {0: rec([0.3])}}, "cnds8", "cnn8_vgg",
                                 0.2, regime)
    assert never["verdict"] == "untestable"
