"""Lowering to ONNX: every shipped spec's trunk exports and matches PyTorch, branches are provably gone,
feature outputs prune the graph, metadata round-trips, reduced precision works, and the CLI's user
errors are one line with exit code 1 (usage errors: exit code 2)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cnds_runtime.metadata import ModelMetadata
from onnx import TensorProto, numpy_helper

from cnds_compiler import __version__, compile_spec
from cnds_compiler.backends.pytorch import AUX_PREFIX, CndsNet, build_module
from cnds_compiler.checkpoint import save_checkpoint
from cnds_compiler.cli import compile_main
from cnds_compiler.errors import CheckpointError, ExportError, UnknownNameError, UnsupportedError
from cnds_compiler.ir import Network
from cnds_compiler.lowering import parse_features, plan_deploy
from cnds_compiler.lowering.onnx_export import (
    export_onnx,
    load_weights,
    make_metadata,
    prove_no_branches,
)

from .conftest import SPECS, shipped_specs

ort = pytest.importorskip("onnxruntime")


@cache
def compiled(stem: str) -> Network:
    return compile_spec(SPECS / f"{stem}.cnds")


def small_random_state(net: Network, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of ``build_module(net)`` (branches too), random and scaled by fan-in so activations
    stay O(1) through any depth: a parity test that sees real numbers, not a vanished signal."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    shapes = {k: tuple(v.shape) for k, v in build_module(net, materialize=False).state_dict().items()}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return state


def torch_reference(net: Network, state: dict[str, torch.Tensor]) -> CndsNet:
    """The training module (branches included) holding ``state``, in eval mode."""
    module = build_module(net, materialize=False)
    module.load_state_dict(state, assign=True)
    return module.eval()


def session(path: Path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(stem, features)`` → (model path, weights, report) of a small spec exported with small
    random weights, cached for the module."""
    folder = tmp_path_factory.mktemp("exports")

    @cache
    def export(stem: str, features: str | None = None) -> tuple[Path, dict[str, torch.Tensor], object]:
        net = compiled(stem)
        state = small_random_state(net)
        out = folder / f"{stem}-{(features or 'logits').replace(',', '-')}.onnx"
        report = export_onnx(net, out, weights=state, features=parse_features(features))
        return out, state, report

    return export


# ---- every shipped spec: trunk parity ---------------------------------------------------------------


def trunk_key(net: Network) -> str:
    """Specs with equal keys lower to the same graph: they differ only in branches, initialisation or
    training settings, none of which reach a deploy graph (its weights come from a checkpoint)."""

    def settings(attrs) -> dict:
        out = {k: v for k, v in dataclasses.asdict(attrs).items() if k != "init"}
        if hasattr(attrs, "init"):
            out["bias"] = attrs.init.bias is not None  # a bias term is part of the graph, its value is not
        return out

    ops = [(op.name, op.kind, settings(op.attrs)) for layer in net.trunk for op in layer.ops]
    return repr((net.input, net.num_classes, net.class_names, ops, net.data))


def trunk_groups() -> list[list[Path]]:
    groups: dict[str, list[Path]] = {}
    for spec in shipped_specs():
        groups.setdefault(trunk_key(compile_spec(spec)), []).append(spec)
    return list(groups.values())


@pytest.mark.parametrize("specs", trunk_groups(), ids=lambda g: "+".join(p.stem for p in g))
def test_trunk_parity_every_shipped_spec(specs: list[Path], tmp_path: Path):
    """Each distinct deploy trunk among the shipped specs is exported once (specs that share a trunk,
    e.g. CNDS-8 and CNN-8, lower to the same graph) and matches the training module in eval mode."""
    net = compile_spec(specs[0])
    state = small_random_state(net)
    out = tmp_path / "model.onnx"
    report = export_onnx(net, out, weights=state)
    assert report.parity.ok and report.parity.max_abs_diff <= 1e-4 * max(1.0, report.parity.max_abs_ref)
    assert report.proof.weight_ops[0] == report.proof.weight_ops[1]
    # every branch removed, and every branch weight compared byte for byte with the graph's initializers
    assert report.proof.branches == tuple(h.name for h in net.supervision_heads)
    assert report.proof.tensors_compared == sum(1 for k, v in state.items() if k.startswith(AUX_PREFIX) and v.dim() >= 2)
    x = torch.randn(2, *net.input.dims, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = torch_reference(net, state)(x).logits.numpy()
    (got,) = session(out).run(["logits"], {"input": x.numpy()})
    assert got.shape == (2, net.num_classes)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    for other in specs[1:]:  # same graph: the same deploy plan, only the branches differ
        plan = plan_deploy(compile_spec(other))
        assert trunk_key(plan.network) == trunk_key(report.plan.network)
        assert plan.outputs == report.plan.outputs


# ---- branches --------------------------------------------------------------------------------------


def test_branches_absent_from_graph(exported):
    net = compiled("fmnist_cnds8")
    path, state, report = exported("fmnist_cnds8")
    model = onnx.load(str(path))
    branch_ops = {op.name for b in net.branches for layer in b.layers for op in layer.ops}
    names = [n.name for n in model.graph.node] + [i.name for i in model.graph.initializer]
    assert not any("aux" in n for n in names)
    assert not any(part in branch_ops for n in names for part in n.replace(".", "/").split("/"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 8 and ops.count("Gemm") == 3  # the trunk's, nothing of the branch
    # no initializer holds a branch weight, byte for byte
    aux = {k: v.numpy() for k, v in state.items() if k.startswith(AUX_PREFIX) and v.dim() >= 2}
    assert aux
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        assert not any(a.shape == b.shape and np.array_equal(a, b) for b in aux.values())
    floats = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type == TensorProto.FLOAT)
    trunk = sum(v.numel() for k, v in state.items() if not k.startswith(AUX_PREFIX) and v.is_floating_point())
    assert floats <= trunk
    assert report.proof.branches == ("conv3_2",) and report.proof.tensors_compared == len(aux)


def test_branch_residue_is_detected(exported):
    net = compiled("fmnist_cnds8")
    path, state, _ = exported("fmnist_cnds8")
    plan = plan_deploy(net)
    weights = load_weights(net, state)
    trunk = sum(v.numel() for k, v in state.items() if not k.startswith(AUX_PREFIX))
    clean = onnx.load(str(path))
    prove_no_branches(clean, plan, weights, trunk)

    by_name = onnx.load(str(path))
    by_name.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "aux.conv3_2.conv.bias"))
    with pytest.raises(ExportError, match="branch names"):
        prove_no_branches(by_name, plan, weights, trunk + 3)

    by_value = onnx.load(str(path))  # a branch weight smuggled in under an innocent name
    fc1 = state["aux.conv3_2.fc1.weight"].numpy()
    by_value.graph.initializer.append(numpy_helper.from_array(fc1, "innocent"))
    with pytest.raises(ExportError, match="equal to branch weights"):
        prove_no_branches(by_value, plan, weights, trunk + fc1.size)


def test_export_leaves_given_weights_untouched(tmp_path: Path):
    net = compiled("digits_cnds8")
    state = small_random_state(net)
    before = {k: v.clone() for k, v in state.items()}
    export_onnx(net, tmp_path / "m.onnx", weights=state, precision="fp16")
    assert all(torch.equal(before[k], state[k]) for k in state)


# ---- feature outputs and pruning --------------------------------------------------------------------


@pytest.mark.parametrize(
    "features, outputs, gemms",
    [
        ("fc7", ["fc7"], 2),
        ("fc7,logits", ["fc7", "logits"], 3),
        ("pool5", ["pool5"], 0),
        ("pool5,fc7", ["pool5", "fc7"], 2),
        ("fc8", ["logits"], 3),
    ],
)
def test_feature_outputs_and_pruning(features, outputs, gemms, exported):
    net = compiled("fmnist_cnds8")
    path, state, report = exported("fmnist_cnds8", features)
    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output] == outputs
    assert [n.op_type for n in model.graph.node].count("Gemm") == gemms
    kept = {n.name.split("/")[1] for n in model.graph.node if n.name.count("/") >= 2}
    assert not kept & set(report.plan.pruned)
    x = torch.randn(3, *net.input.dims, generator=torch.Generator().manual_seed(2))
    module = torch_reference(net, state)
    layers = [report.plan.outputs[i][1] for i in range(len(outputs))]
    with torch.inference_mode():
        ref = module.forward_layers(x, layers)
    got = session(path).run(outputs, {"input": x.numpy()})
    for layer, g in zip(layers, got, strict=True):
        r = ref[layer].numpy()
        assert g.shape == r.shape and np.abs(g - r).max() <= 1e-4 * max(1.0, np.abs(r).max())


def test_feature_export_is_cheaper_and_pruned(exported):
    full = onnx.load(str(exported("fmnist_cnds8")[0]))
    fc7 = onnx.load(str(exported("fmnist_cnds8", "fc7")[0]))
    names = {i.name for i in fc7.graph.initializer}
    assert "fc8.weight" not in names and "fc8.weight" in {i.name for i in full.graph.initializer}
    assert exported("fmnist_cnds8", "fc7")[2].plan.pruned == ("fc8",)
    assert exported("fmnist_cnds8", "pool5")[2].plan.pruned == ("fc6", "fc7", "fc8")


def test_dynamic_batch(exported):
    path, _, _ = exported("digits_cnds8")
    s = session(path)
    assert s.get_inputs()[0].shape[0] == "batch"
    for n in (1, 5):
        (y,) = s.run(None, {"input": np.zeros((n, 1, 8, 8), np.float32)})
        assert y.shape == (n, 10)


def test_unknown_and_branch_features_are_errors():
    net = compiled("fmnist_cnds8")
    with pytest.raises(UnknownNameError, match=r"'fc9'.*did you mean 'fc8'") as e:
        plan_deploy(net, ["fc9"])
    assert e.value.path.endswith("fmnist_cnds8.cnds")
    with pytest.raises(UnsupportedError, match=r"'fc1' \(branch 'conv3_2'\)"):
        plan_deploy(net, ["fc7", "fc1"])
    assert parse_features(" fc7, pool5,fc7 ") == ("fc7", "pool5")


# ---- metadata ---------------------------------------------------------------------------------------


def test_metadata_round_trip(exported):
    net = compiled("fmnist_cnds8")
    path, _, report = exported("fmnist_cnds8", "fc7,logits")
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    md = ModelMetadata.from_props(props)
    assert md == report.metadata == make_metadata(report.plan, "input", "fp32", "state dict given in memory")
    assert md.spec_name == "fmnist_cnds8" and md.ir_hash == net.digest() and md.cnds_version == __version__
    assert md.class_names == net.class_names and md.num_classes == 10
    assert md.input_shape == (1, 28, 28) and md.resize == (28, 28) and md.crop == (28, 28)
    assert md.mean == (0.286,) and md.std == (0.353,)
    assert [(o.name, o.layer, o.shape) for o in md.outputs] == [("fc7", "fc7", (256,)), ("logits", "fc8", (10,))]
    assert md.logits_output.layer == "fc8"
    assert ModelMetadata.from_props(md.to_props()) == md
    assert model.producer_name == "cnds" and model.graph.name == "fmnist_cnds8"


def test_metadata_of_resized_rgb_spec():
    md = make_metadata(plan_deploy(compiled("places_cnds8")), "input", "fp32", "")
    assert md.resize == (256, 256) and md.crop == (227, 227) and len(md.mean) == 3 and md.class_names == ()


# ---- weights ----------------------------------------------------------------------------------------


def test_checkpoint_weights_and_mismatch(tmp_path: Path):
    net = compiled("digits_cnds8")
    state = small_random_state(net)
    ckpt = tmp_path / "run.pt"
    save_checkpoint(ckpt, {"model": state, "epoch": 3, "spec_name": net.name, "ir_hash": net.digest()})
    report = export_onnx(net, tmp_path / "m.onnx", weights=ckpt)
    assert report.metadata.weights == "run.pt (epoch 3)" and not report.notes
    other = compiled("fmnist_cnds8")
    with pytest.raises(CheckpointError, match="not from 'fmnist_cnds8'"):
        export_onnx(other, tmp_path / "o.onnx", weights=ckpt)
    assert not (tmp_path / "o.onnx").exists()


def test_no_weights_means_seeded_initialisation(tmp_path: Path):
    net = compiled("digits_cnn8")
    a = export_onnx(net, tmp_path / "a.onnx")
    export_onnx(net, tmp_path / "b.onnx")
    c = export_onnx(net, tmp_path / "c.onnx", seed=1)
    assert "untrained" in a.metadata.weights and any("untrained" in n for n in a.notes)

    def weights(p):
        return [numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer]

    assert all(np.array_equal(x, y) for x, y in zip(weights(tmp_path / "a.onnx"), weights(tmp_path / "b.onnx"), strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(weights(tmp_path / "a.onnx"), weights(tmp_path / "c.onnx"), strict=True))
    assert c.metadata.weights.endswith("seed 1")


def test_export_is_quiet(tmp_path: Path, capfd):
    export_onnx(compiled("digits_cnds8"), tmp_path / "m.onnx")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# ---- reduced precision ------------------------------------------------------------------------------


def test_fp16_export(tmp_path: Path, exported):
    net = compiled("fmnist_cnds8")
    _, state, _ = exported("fmnist_cnds8")
    report = export_onnx(net, tmp_path / "h.onnx", weights=state, precision="fp16", features=["fc7", "logits"])
    model = onnx.load(str(tmp_path / "h.onnx"))
    assert {i.data_type for i in model.graph.initializer if i.name.endswith("weight")} == {TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in model.graph.output)
    assert report.metadata.precision == "fp16" and report.parity.tolerance is None
    assert report.parity.max_abs_diff <= 1e-2 * max(1.0, report.parity.max_abs_ref)
    assert report.precision_report.speed > 0


def test_int8_export_with_array_calibration(tmp_path: Path):
    net = compiled("digits_cnds8")
    state = small_random_state(net)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((32, 1, 8, 8)).astype(np.float32) for _ in range(2)]
    val = [(rng.standard_normal((64, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 64))]
    report = export_onnx(net, tmp_path / "q.onnx", weights=state, precision="int8", calibration=calib,
                         validation=val)
    model = onnx.load(str(tmp_path / "q.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert report.metadata.precision == "int8" and report.precision_report.examples == 64
    assert report.precision_report.top1 is not None and 0 <= report.precision_report.agreement <= 1
    assert report.parity.max_abs_diff < 0.5 * max(1.0, report.parity.max_abs_ref)
    assert not any("aux" in i.name for i in model.graph.initializer)


def test_cli_int8_with_data_source(tmp_path: Path, capsys):
    out = tmp_path / "q.onnx"
    rc = compile_main([str(SPECS / "digits_cnn8.cnds"), "--emit", "onnx", "-o", str(out), "--precision", "int8",
                       "--calibration-data", "digits", "--calibration-size", "64", "--val-size", "200"])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "int8 accuracy: top-1" in text and "on 200 validation images" in text and "int8 speed:" in text
    assert "untrained" in text


# ---- CLI --------------------------------------------------------------------------------------------


def test_cli_export_prints_checks(tmp_path: Path, capsys):
    out = tmp_path / "m.onnx"
    rc = compile_main([str(SPECS / "digits_cnds8.cnds"), "--emit", "onnx", "-o", str(out), "--features", "fc7"])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "onnx.checker (full check): passed" in text
    assert "branches removed: conv3_2; graph proven branch-free" in text
    assert "max |diff|" in text and "ok" in text
    assert "outputs: fc7 (128); pruned above: fc8" in text
    assert "untrained" in text


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnds_compiler.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--emit", "onnx"], 2, "--emit onnx needs -o"),
        (["--weights", "x.pt"], 2, "--weights only apply to --emit onnx"),
        (["--emit", "onnx", "-o", "m.onnx", "--precision", "int8"], 2, "needs --calibration-data"),
        (["--emit", "onnx", "-o", "m.onnx", "--calibration-data", "digits"], 2, "only applies to --precision int8"),
        (["--emit", "onnx", "-o", "m.onnx", "--val-data", "digits"], 2, "--val-data measures"),
    ],
)
def test_cli_usage_errors(args, code, message, capsys):
    with pytest.raises(SystemExit) as e:
        compile_main([str(SPECS / "digits_cnds8.cnds"), *args])
    assert e.value.code == code and message in capsys.readouterr().err


def test_cli_user_errors_are_one_line(tmp_path: Path, capsys):
    spec = str(SPECS / "digits_cnds8.cnds")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    cases = [
        (["--weights", str(tmp_path / "missing.pt")], "missing.pt: checkpoint error: no such checkpoint"),
        (["--weights", str(junk)], "junk.pt: checkpoint error: not a torch checkpoint file (it is text"),
        (["--weights", str(wrong)], "wrong.pt: checkpoint error: weights do not fit"),
        (["--features", "fc9"], "digits_cnds8.cnds: unknown name: --features: no trunk layer named 'fc9'"),
        (["--features", "classifier"], "belong to supervision branches"),
        (["-o", str(junk / "m.onnx")], "output error: cannot write"),
    ]
    for extra, message in cases:
        rc = compile_main([spec, "--emit", "onnx", "-o", str(tmp_path / "m.onnx"), *extra])
        err = capsys.readouterr().err
        assert rc == 1 and message in err, (extra, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_error_has_no_traceback(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "cnds_compiler.cli", str(SPECS / "digits_cnds8.cnds"), "--emit", "onnx",
                        "-o", str(tmp_path / "m.onnx"), "--weights", str(tmp_path / "missing.pt")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "missing.pt: checkpoint error" in r.stderr


def test_checking_still_never_imports_torch_or_onnx():
    code = ("import sys; from cnds_compiler.cli import compile_main; import cnds_compiler.lowering; "
            f"assert compile_main([{str(SPECS / 'fmnist_cnds8.cnds')!r}, '-q']) == 0; "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_dynamo_exporter_graph_is_clean_too(tmp_path: Path):
    """The default exporter is TorchScript (dynamo=False: fast, quiet, no onnxscript); the dynamo exporter,
    where installed, must give a branch-free graph that agrees too."""
    pytest.importorskip("onnxscript")
    from cnds_compiler.lowering.onnx_export import build_deploy_module

    net = compiled("fmnist_cnds8")
    state = small_random_state(net)
    plan = plan_deploy(net)
    module = build_deploy_module(plan, load_weights(net, state))
    x = torch.randn(2, *net.input.dims)
    program = torch.onnx.export(module, (x,), dynamo=True, input_names=["input"], output_names=["logits"],
                                opset_version=18, verbose=False)
    program.save(str(tmp_path / "d.onnx"))
    model = onnx.load(str(tmp_path / "d.onnx"))
    trunk = sum(v.numel() for k, v in state.items() if not k.startswith(AUX_PREFIX))
    prove_no_branches(model, plan, load_weights(net, state), trunk)
    (got,) = session(tmp_path / "d.onnx").run(None, {model.graph.input[0].name: x.numpy()})
    with torch.inference_mode():
        (ref,) = module(x)
    assert np.abs(got - ref.numpy()).max() <= 1e-4 * max(1.0, float(ref.abs().max()))
