"""The graph language and IR v2: parallel paths, concat and residual adds, named heads, pruning, the one
generator, GoogLeNet and ResNet-18 conformance, and a DAG spec through train → eval → export → predict."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from cnds_compiler import compile_spec
from cnds_compiler.backends.pytorch import build_module
from cnds_compiler.errors import ArgumentError, DuplicateNameError, ShapeError, SpecWarning, UnknownNameError
from cnds_compiler.frontend import compile_text
from cnds_compiler.ir import OpKind
from cnds_compiler.serialize import dumps, from_json_dict, loads

from .conftest import ROOT, SPECS

HEAD = "network g\ninput 1x8x8\nclasses 3\ninit kaiming(bias=0)\n"


def compile_graph(body: str):
    return compile_text(HEAD + body, "g.cnds")


def error_at(exc_type, body: str, line: int, column: int, match: str):
    with pytest.raises(exc_type) as info:
        compile_graph(body)
    e = info.value
    assert (e.line, e.column) == (line, column), e.render()
    assert match in e.message, e.message
    return e


# ---- the language -------------------------------------------------------------------------------------


def test_explicit_inputs_concat_and_add_build_a_graph():
    net = compile_graph(
        "a: conv2d(4, 3, pad=1) relu\n"
        "b: in -> conv2d(2, 1)\n"              # reads the network input, not a
        "c: concat(a, b)\n"                    # 6 channels
        "d: conv2d(6, 3, pad=1)\n"             # reads c
        "e: add(c, d) relu\n"
        "f: gap\nlogits: linear(classes)\n")
    node = {n.name: n for n in net.nodes}
    assert node["b"].inputs == ("input",) and node["c"].inputs == ("a_relu", "b")
    assert node["c"].kind is OpKind.CONCAT and str(node["c"].out_shape) == "6x8x8"
    assert node["e"].kind is OpKind.ADD and node["e"].inputs == ("c", "d") and node["e_relu"].inputs == ("e",)
    model = build_module(net, seed=0)
    x = torch.randn(2, 1, 8, 8)
    a = torch.relu(model.a(x))
    c = torch.cat([a, model.b(x)], 1)
    expected = model.logits(torch.flatten(model.f(torch.relu(c + model.d(c))), 1))
    torch.testing.assert_close(model(x).logits, expected)


def test_graph_block_with_repetition_and_optional_shortcut():
    net = compile_graph(
        "block res(c, s=1, project=0) {\n"
        "  conv: conv2d(c, 3, stride=s, pad=1, bias=none) batchnorm relu\n"
        "  short: in -> conv2d(c, 1, stride=s, bias=none) if project\n"
        "  out: add(conv, short) relu\n"
        "}\n"
        "stem: conv2d(4, 3, pad=1)\n"
        "stage.{0,1}: res(4)\n"
        "down: res(8, s=2, project=1)\n"
        "pool: gap\nfc: linear(classes)\n")
    names = [n.name for n in net.nodes]
    assert "stage.0.conv" in names and "stage.1.out" in names and "down.short" in names
    assert "stage.0.short" not in names  # switched off: the shortcut is `in` itself
    assert net.node("stage.0.out").inputs == ("stage.0.conv_relu", "stem")
    assert str(net.node(net.resolve("down")).out_shape) == "8x4x4"
    assert net.resolve("stage") == net.resolve("stage.1")  # a stage prefix stands for its last block
    state = build_module(net, seed=0).state_dict()
    assert "stage.1.conv.weight" in state and "down.short.weight" in state


def test_two_heads_share_a_tap_and_a_branch_node():
    net = compile_graph(
        "a: conv2d(4, 3, pad=1) relu\nb: conv2d(4, 3, pad=1) relu\np: gap\nfc: linear(classes)\n"
        "supervise a as h1 weight 0.3 { s: conv2d(4, 1) relu; g: gap; l: linear(classes) }\n"
        "supervise a as h2 loss hinge weight 0.1 decay none { g: h1.s -> gap; l: linear(classes) }\n")
    assert [h.name for h in net.heads] == ["main", "h1", "h2"]
    assert net.head("h1").tap == net.head("h2").tap == "a_relu"
    assert {n.name for n in net.head_nodes(net.head("h2"))} == {"h1.s", "h1.s_relu", "h2.g", "h2.l"}
    model = build_module(net, seed=0)
    assert "aux.h1.s.weight" in model.state_dict() and not any(k.startswith("h1") for k in model.state_dict())
    shared = {id(p) for p in model.head_parameters("h2")} & {id(p) for p in model.head_parameters("h1")}
    assert len(shared) == 2  # h1.s weight and bias
    only_h2 = model.head_parameters("h2", excluding_others=True)
    assert [tuple(p.shape) for p in only_h2] == [(3, 4), (3,)]
    out = model(torch.randn(2, 1, 8, 8), branches="all")
    assert set(out.aux) == {"h1", "h2"}
    out = model(torch.randn(2, 1, 8, 8), branches=["h2"])
    assert set(out.aux) == {"h2"}


def test_prune_and_deploy_plan_compute_which_nodes_are_branch_only():
    net = compile_spec(SPECS / "digits_inception.cnds")
    main = net.main_nodes()
    branch_only = {n.name for n in net.nodes} - main
    assert branch_only == {n.name for h in net.supervision_heads for n in net.head_nodes(h)}
    assert all(n.startswith(("loss1.", "loss2.")) for n in branch_only)
    deploy = net.without_branches()
    assert {n.name for n in deploy.nodes} == main and [h.name for h in deploy.heads] == ["main"]
    from cnds_compiler.passes.prune import Prune

    features = Prune(("inception_a.b3",)).apply(net)
    assert features.nodes[-1].name == "inception_a.b3_relu" and not features.heads
    assert len(features.nodes) < len(deploy.nodes)


def test_v1_ir_files_still_load_as_the_same_graph():
    for stem in ("places_cnds8", "imagenet_cnds13", "fmnist_cnds8", "digits_cnds8", "imagenet_cnn5"):
        net = compile_spec(SPECS / f"{stem}.cnds")
        doc = json.loads((ROOT / "tests" / "golden" / "v1" / f"{stem}.ir.json").read_text())
        assert doc["ir_version"] == 1
        doc["sources"] = [{"name": name, "text": text} for name, text in net.sources]
        old = from_json_dict(doc, f"{stem}.ir.json")
        assert old == net and old.digest() == net.digest(), stem
        assert loads(dumps(net)) == net


def test_generated_code_is_readable_and_chain_code_unchanged():
    chain = build_module(compile_spec(SPECS / "digits_cnds8.cnds"), seed=0)
    assert "    x = self.conv1(x)  # 16x8x8  digits_cnds8.cnds:12" in chain.code
    assert "aux['conv3_2'] =" in chain.code
    graph = build_module(compile_spec(SPECS / "digits_inception.cnds"), seed=0)
    assert "torch.cat([" in graph.code and "if 'loss1' in want:" in graph.code
    assert "self.inception_a.b3_reduce(x)" in graph.code


def test_forward_features_ends_at_the_last_node_every_path_passes():
    model = build_module(compile_spec(SPECS / "digits_inception.cnds"), seed=0).eval()
    x = torch.randn(3, 1, 8, 8)
    feats = model.forward_features(x)
    assert feats.shape == (3, 56, 1, 1)  # gap, the last feature map; paths inside an inception are never cuts
    torch.testing.assert_close(model.forward_head(feats), model(x).logits)
    assert model.forward_head(feats, pre_logits=True).shape == (3, 56, 1, 1)  # the classifier statement's input
    assert [f.layer for f in model.feature_info] == ["stem", "inception_a", "pool_a", "inception_b", "pool"]
    got = model.forward_layers(x, ["inception_a.b5", "pool_a"])
    assert got["inception_a.b5"].shape == (3, 8, 8, 8) and got["pool_a"].shape == (3, 40, 4, 4)


# ---- errors -------------------------------------------------------------------------------------------


def test_undefined_input_with_did_you_mean():
    e = error_at(UnknownNameError, "conv_a: conv2d(4, 3)\nb: conv_b -> relu\n", 6, 4, "no value named 'conv_b'")
    assert e.hint == "did you mean 'conv_a'?"


def test_input_defined_later():
    e = error_at(UnknownNameError, "a: conv2d(4, 3)\nb: c -> relu\nc: relu\n", 6, 4, "'c' is defined later")
    assert e.notes and e.notes[0][0].location().line == 7


def test_concat_of_mismatched_maps_shows_each_input():
    e = error_at(ShapeError, "a: conv2d(4, 3)\nb: in -> conv2d(4, 1)\nc: concat(a, b)\n", 7, 4, "equal HxW")
    assert "4x6x6" in e.message and "4x8x8" in e.message
    assert [span.location().line for span, _ in e.notes] == [5, 6]


def test_add_of_mismatched_shapes_shows_each_input():
    e = error_at(ShapeError, "a: conv2d(4, 3, pad=1)\nb: in -> conv2d(2, 1)\nc: add(a, b)\n", 7, 4, "one shape")
    assert "4x8x8, 2x8x8" in e.message and len(e.notes) == 2 and "project the shortcut" in e.hint


def test_value_nothing_uses_is_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = compile_graph("a: conv2d(4, 3)\nside: in -> conv2d(2, 1)\ng: a -> gap\nl: linear(classes)\n")
    found = [w.message for w in caught if isinstance(w.message, SpecWarning)]
    assert len(found) == 1 and "'side' is never used" in str(found[0]) and "g.cnds:6:1" in str(found[0])
    assert "side" not in build_module(net, seed=0).state_dict().keys().__str__()


def test_multi_input_misuse_and_graph_block_misuse():
    error_at(ArgumentError, "a: conv2d(4, 3, pad=1)\nb: a, in -> relu\n", 6, 4, "reads one value, but 2")
    error_at(ArgumentError, "a: conv2d(4, 3)\nb: concat(a)\n", 6, 4, "at least two inputs")
    error_at(ArgumentError, "block q(c) { x: conv2d(c, 1) }\na: q(2) relu\n", 6, 9, "must stand alone")


def test_duplicate_statement_in_a_block_and_duplicate_head_names():
    error_at(DuplicateNameError, "block q(c) {\n x: conv2d(c, 1)\n x: relu\n}\na: q(2)\n", 7, 2, "'x' defined twice")
    error_at(DuplicateNameError, "a: conv2d(4, 3)\ng: gap\nl: linear(classes)\n"
             "supervise a as h { g: gap; l: linear(classes) }\nsupervise a as h { g: gap; l: linear(classes) }\n",
             9, 16, "head 'h' defined twice")


def test_block_bodies_do_not_see_outside_values():
    error_at(UnknownNameError, "top: conv2d(2, 1)\nblock q(c) { x: top -> relu }\na: q(2)\n", 6, 17,
             "no value named 'top'")


# ---- conformance ---------------------------------------------------------------------------------------

# BVLC GoogLeNet's inception table (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj), its input channels,
# and the stem and head layers: facts from the Caffe definition, counted here with the conv/fc formula.
INCEPTION = {
    "3a": (192, 64, 96, 128, 16, 32, 32), "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64), "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64), "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128), "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def caffe_googlenet_counts() -> tuple[int, int, int]:
    trunk = conv(3, 64, 7) + conv(64, 64, 1) + conv(64, 192, 3) + conv(1024, 1000, 1)
    for cin, c1, c3r, c3, c5r, c5, cp in INCEPTION.values():
        trunk += conv(cin, c1, 1) + conv(cin, c3r, 1) + conv(c3r, c3, 3) + conv(cin, c5r, 1) + conv(c5r, c5, 5)
        trunk += conv(cin, cp, 1)
    head = lambda cin: conv(cin, 128, 1) + conv(128 * 4 * 4, 1024, 1) + conv(1024, 1000, 1)  # noqa: E731
    return trunk, head(512), head(528)


def test_googlenet_parameter_counts_equal_the_caffe_definition():
    trunk, loss1, loss2 = caffe_googlenet_counts()
    assert (trunk, loss1, loss2) == (6_998_552, 3_188_840, 3_190_888)  # as README states
    for stem in ("googlenet", "googlenet_cnds"):
        net = compile_spec(SPECS / f"{stem}.cnds")
        assert sum(layer.params for layer in net.trunk) == trunk
        assert [sum(layer.params for layer in b.layers) for b in net.branches] == [loss1, loss2]
        assert [(b.name, b.tap) for b in net.branches] == [("loss1", "inception_4a"), ("loss2", "inception_4d")]
    model = build_module(compile_spec(SPECS / "googlenet.cnds"), materialize=False)
    assert sum(p.numel() for p in model.parameters()) == trunk + loss1 + loss2
    assert sum(v.numel() for v in model.trunk_state_dict().values()) == trunk
    net = compile_spec(SPECS / "googlenet.cnds")
    assert [str(net.node(net.resolve(n)).out_shape) for n in ("pool2", "pool3", "pool4", "pool5")] == [
        "192x28x28", "480x14x14", "832x7x7", "1024x1x1"]  # Caffe's ceil rounding


def test_resnet18_parameter_count_equals_torchvision():
    import torchvision

    reference = sum(p.numel() for p in torchvision.models.resnet18(weights=None).parameters())
    assert reference == 11_689_512
    net = compile_spec(SPECS / "resnet18_cnds.cnds")
    assert sum(layer.params for layer in net.trunk) == reference
    assert [(b.name, b.tap) for b in net.branches] == [("aux2", "layer2.1"), ("aux3", "layer3.1")]
    model = build_module(net, materialize=False)
    assert sum(v.numel() for k, v in model.trunk_state_dict().items() if "running" not in k
               and "num_batches" not in k) == reference


# ---- end to end ----------------------------------------------------------------------------------------


def _env():
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def test_dag_spec_with_two_heads_trains_evaluates_exports_and_predicts(tmp_path):
    spec = SPECS / "digits_inception.cnds"
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "cnds_compiler.train.cli", str(spec), "--data", "digits", "--out",
                        str(out), "--epochs", "6", "--no-progress", "--cpu"], capture_output=True, text=True,
                       env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[-1]["val_top1_error"]) == {"main", "loss1", "loss2"}
    assert rows[1]["alphas"] == pytest.approx({"loss1": 0.25, "loss2": 0.3})  # eq. 2 decay and constant
    assert rows[-1]["val_top1_error"]["main"] < 0.6  # it learns (chance is 0.9)
    ev = subprocess.run([sys.executable, "-c", "from cnds_compiler.train.cli import eval_main; "
                         f"raise SystemExit(eval_main(['{spec}', '{out / 'best.pt'}', '--cpu']))"],
                        capture_output=True, text=True, env=_env())
    assert ev.returncode == 0 and "loss2" in ev.stdout, ev.stderr
    onnx_path = tmp_path / "m.onnx"
    ex = subprocess.run([sys.executable, "-m", "cnds_compiler.cli", str(spec), "--emit", "onnx", "-o", str(onnx_path),
                         "--weights", str(out / "best.pt"), "--features", "inception_a.b3,logits"],
                        capture_output=True, text=True, env=_env(), timeout=600)
    assert ex.returncode == 0, ex.stderr
    assert "branches removed" in ex.stdout or "removed" in ex.stdout
    from cnds_runtime import FeatureExtractor
    from cnds_runtime.cli import predict_main
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    image = tmp_path / "digit.png"
    Image.fromarray((digits.images[0] * 255 / 16).astype(np.uint8)).save(image)
    feats = FeatureExtractor(onnx_path, "inception_a.b3")(np.asarray([digits.images[0] / 16], np.float32))
    assert feats.shape == (1, 16, 8, 8)
    # the same node computed by PyTorch from the same weights
    net = compile_spec(spec)
    model = build_module(net)
    from cnds_compiler.checkpoint import load_checkpoint

    model.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    x = torch.tensor(digits.images[:4] / 16, dtype=torch.float32)[:, None]
    want = model.eval().forward_layers(x, ["inception_a.b3"])["inception_a.b3"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got[names.index("inception_a.b3")], want.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(got[names.index("logits")], model(x).logits.detach().numpy(), atol=1e-4)
    assert predict_main([str(onnx_path), str(image), "--top-k", "1"]) == 0


def test_checkpoints_saved_with_ir_v1_still_load(tmp_path):
    from cnds_compiler.checkpoint import load_checkpoint, save_checkpoint
    from cnds_compiler.errors import CheckpointError

    net = compile_spec(SPECS / "digits_cnds8.cnds")
    doc = json.loads((ROOT / "tests" / "golden" / "v1" / "digits_cnds8.ir.json").read_text())
    doc["sources"] = [{"name": name, "text": text} for name, text in net.sources]
    state = build_module(net, seed=0).state_dict()
    # what a run before the graph IR saved: the v1 IR text and its v1 architecture hash
    save_checkpoint(tmp_path / "v1.pt", {"model": state, "spec_name": net.name, "ir_hash": "9c0ffee0ddba11ad",
                                         "spec_text": json.dumps(doc)})
    assert load_checkpoint(tmp_path / "v1.pt", net)["ir_hash"] == "9c0ffee0ddba11ad"
    other = compile_spec(SPECS / "fmnist_cnds8.cnds")
    with pytest.raises(CheckpointError, match="architecture hash"):
        load_checkpoint(tmp_path / "v1.pt", other)
