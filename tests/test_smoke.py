import subprocess
import sys

import torch

from cnds_compiler import compile_spec
from cnds_compiler.backends.pytorch import build_module

from .conftest import SPECS


def test_places_cnds8_paper_shapes():
    net = compile_spec(SPECS / "places_cnds8.cnds")
    assert str(net.layer("pool5").out_shape) == "512x4x4"
    assert net.layer("fc6").in_shape.numel == 8192
    fc1 = net.branch("conv3_2").layers[2]
    assert fc1.name == "fc1" and fc1.ops[0].name == "conv3_2.fc1" and fc1.in_shape.numel == 10816


def test_module_forward_backward_cpu():
    net = compile_spec(SPECS / "places_cnds8.cnds")
    m = build_module(net, seed=0)
    out = m(torch.randn(1, 3, 227, 227), branches="all")
    assert out.logits.shape == (1, 205) and out.aux["conv3_2"].shape == (1, 205)
    (out.logits.sum() + out.aux["conv3_2"].sum()).backward()
    assert m.conv1.weight.grad is not None


def test_cli_bad_spec_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.cnds"
    bad.write_text("network x\n@@ broken\n")
    r = subprocess.run([sys.executable, "-m", "cnds_compiler.cli", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{bad}:2:1: syntax error" in r.stderr and "Traceback" not in r.stderr
