"""cnds-import: Caffe text net definitions (written here, both formats) and torchvision models (parity
with torchvision's own forward), the checkpoint it writes, and the README path end to end on digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnds_compiler import compile_spec
from cnds_compiler.backends.pytorch import build_module
from cnds_compiler.checkpoint import load_checkpoint
from cnds_compiler.errors import SpecSyntaxError, UnsupportedError
from cnds_compiler.frontend import compile_text
from cnds_compiler.importers.caffe import import_caffe
from cnds_compiler.importers.cli import import_main
from cnds_compiler.importers.torchvision import MODELS, import_torchvision

from .conftest import SPECS
from .test_graph import INCEPTION, caffe_googlenet_counts

# ---- Caffe prototxt written by the tests ------------------------------------------------------------------


def conv_layer(name: str, bottom: str, out: int, k: int, stride: int = 1, pad: int = 0, relu: bool = True) -> str:
    text = (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"\n'
            f"  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}\n"
            f"  convolution_param {{ num_output: {out} kernel_size: {k} stride: {stride} pad: {pad}\n"
            f'    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" value: 0.2 }} }} }}\n')
    if relu:
        text += f'layer {{ name: "{name}/relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
    return text


def pool_layer(name: str, bottom: str, kind: str, k: int, stride: int, pad: int = 0) -> str:
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}"\n'
            f"  pooling_param {{ pool: {kind} kernel_size: {k} stride: {stride} pad: {pad} }} }}\n")


def fc_layer(name: str, bottom: str, out: int) -> str:
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}"\n'
            f'  inner_product_param {{ num_output: {out} weight_filler {{ type: "xavier" }} }} }}\n')


def inception(name: str, bottom: str, c1, c3r, c3, c5r, c5, cp) -> str:
    text = conv_layer(f"{name}/1x1", bottom, c1, 1)
    text += conv_layer(f"{name}/3x3_reduce", bottom, c3r, 1) + conv_layer(f"{name}/3x3", f"{name}/3x3_reduce", c3, 3, pad=1)
    text += conv_layer(f"{name}/5x5_reduce", bottom, c5r, 1) + conv_layer(f"{name}/5x5", f"{name}/5x5_reduce", c5, 5, pad=2)
    text += pool_layer(f"{name}/pool", bottom, "MAX", 3, 1, 1) + conv_layer(f"{name}/pool_proj", f"{name}/pool", cp, 1)
    text += (f'layer {{ name: "{name}/output" type: "Concat" bottom: "{name}/1x1" bottom: "{name}/3x3"\n'
             f'  bottom: "{name}/5x5" bottom: "{name}/pool_proj" top: "{name}/output" }}\n')
    return text


def aux_head(name: str, bottom: str) -> str:
    text = pool_layer(f"{name}/ave_pool", bottom, "AVE", 5, 3) + conv_layer(f"{name}/conv", f"{name}/ave_pool", 128, 1)
    text += fc_layer(f"{name}/fc", f"{name}/conv", 1024)
    text += f'layer {{ name: "{name}/relu_fc" type: "ReLU" bottom: "{name}/fc" top: "{name}/fc" }}\n'
    text += (f'layer {{ name: "{name}/drop_fc" type: "Dropout" bottom: "{name}/fc" top: "{name}/fc"\n'
             f"  dropout_param {{ dropout_ratio: 0.7 }} }}\n")
    text += fc_layer(f"{name}/classifier", f"{name}/fc", 1000)
    text += (f'layer {{ name: "{name}/loss" type: "SoftmaxWithLoss" bottom: "{name}/classifier" bottom: "label"\n'
             f'  top: "{name}/loss" loss_weight: 0.3 }}\n')
    return text


def googlenet_prototxt() -> str:
    """A GoogLeNet train_val definition in the current format, written from the layer table (facts)."""
    text = ('name: "GoogleNet"\n'
            'layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }\n'
            "  transform_param { mirror: true crop_size: 224 mean_value: 104 mean_value: 117 mean_value: 123 } }\n"
            'layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }\n'
            "  transform_param { mirror: false crop_size: 224 mean_value: 104 mean_value: 117 mean_value: 123 } }\n")
    text += conv_layer("conv1/7x7_s2", "data", 64, 7, 2, 3) + pool_layer("pool1/3x3_s2", "conv1/7x7_s2", "MAX", 3, 2)
    text += ('layer { name: "pool1/norm1" type: "LRN" bottom: "pool1/3x3_s2" top: "pool1/norm1"\n'
             "  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }\n")
    text += conv_layer("conv2/3x3_reduce", "pool1/norm1", 64, 1) + conv_layer("conv2/3x3", "conv2/3x3_reduce", 192, 3, pad=1)
    text += ('layer { name: "conv2/norm2" type: "LRN" bottom: "conv2/3x3" top: "conv2/norm2"\n'
             "  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }\n")
    text += pool_layer("pool2/3x3_s2", "conv2/norm2", "MAX", 3, 2)
    bottom = "pool2/3x3_s2"
    for key, (_, *widths) in INCEPTION.items():
        name = f"inception_{key}"
        text += inception(name, bottom, *widths)
        bottom = f"{name}/output"
        if key in ("3b", "4e"):
            pool = "pool3/3x3_s2" if key == "3b" else "pool4/3x3_s2"
            text += pool_layer(pool, bottom, "MAX", 3, 2)
            bottom = pool
        if key == "4a":
            text += aux_head("loss1", bottom)
        if key == "4d":
            text += aux_head("loss2", bottom)
    text += pool_layer("pool5/7x7_s1", bottom, "AVE", 7, 1)
    text += ('layer { name: "pool5/drop_7x7_s1" type: "Dropout" bottom: "pool5/7x7_s1" top: "pool5/7x7_s1"\n'
             "  dropout_param { dropout_ratio: 0.4 } }\n")
    text += fc_layer("loss3/classifier", "pool5/7x7_s1", 1000)
    text += ('layer { name: "loss3/loss3" type: "SoftmaxWithLoss" bottom: "loss3/classifier" bottom: "label"\n'
             '  top: "loss3/loss3" loss_weight: 1 }\n'
             'layer { name: "loss3/top-1" type: "Accuracy" bottom: "loss3/classifier" bottom: "label"\n'
             '  top: "loss3/top-1" include { phase: TEST } }\n')
    return text


V1_CHAIN = """name: "SmallV1"
input: "data"
input_dim: 1 input_dim: 1 input_dim: 16 input_dim: 16
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
  weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.01 }
    bias_filler { type: "constant" value: 0.5 } } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "conv2" type: CONVOLUTION bottom: "pool1" top: "conv2" blobs_lr: 1 blobs_lr: 2
  weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 16 kernel_size: 3 pad: 1 } }
layers { name: "relu2" type: RELU bottom: "conv2" top: "conv2" }
layers { name: "fc" type: INNER_PRODUCT bottom: "conv2" top: "fc" blobs_lr: 1 blobs_lr: 2
  inner_product_param { num_output: 5 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "fc" bottom: "label" top: "loss" }
"""


def test_caffe_googlenet_imports_with_the_caffe_parameter_counts(tmp_path):
    path = tmp_path / "train_val.prototxt"
    path.write_text(googlenet_prototxt())
    imported = import_caffe(path)
    net = compile_text(imported.text, str(tmp_path / "googlenet.cnds"))
    trunk, loss1, loss2 = caffe_googlenet_counts()
    assert sum(layer.params for layer in net.trunk) == trunk
    assert [(b.name, sum(layer.params for layer in b.layers)) for b in net.branches] == [("loss1", loss1), ("loss2", loss2)]
    assert [(b.tap, b.schedule.alpha0, b.schedule.kind.value) for b in net.branches] == [
        ("inception_4a.output", 0.3, "constant"), ("inception_4d.output", 0.3, "constant")]
    assert imported.main_loss == "loss3/loss3"  # the greatest loss_weight
    # the same shapes as the hand-written spec of the same network
    ours = compile_spec(SPECS / "googlenet.cnds")
    assert str(net.node(net.resolve("pool5.7x7_s1")).out_shape) == str(ours.node(ours.resolve("pool5")).out_shape)
    assert "conv1.7x7_s2: conv2d(64, 7, stride=2, pad=3, bias=0.2, init=xavier) relu" in imported.text
    assert "inception_3a.output: concat(inception_3a.1x1, inception_3a.3x3, inception_3a.5x5, inception_3a.pool_proj)" in imported.text
    assert "data { mean [0.4824, 0.4588, 0.4078]  std 0.00392157  mirror true }" in imported.text
    assert "train { bias_lr_mult 2  bias_decay 0 }" in imported.text


def test_caffe_v1_layers_format_and_input_dims(tmp_path):
    path = tmp_path / "v1.prototxt"
    path.write_text(V1_CHAIN)
    net = compile_text(import_caffe(path).text, str(tmp_path / "v1.cnds"))
    assert str(net.input) == "1x16x16" and net.num_classes == 5
    assert [layer.name for layer in net.trunk] == ["conv1", "pool1", "conv2", "fc"]
    conv1 = net.node("conv1").attrs.init
    assert (conv1.scheme.value, conv1.std, conv1.bias) == ("gaussian", 0.01, 0.5)
    assert net.train.bias_lr_mult == 2 and net.train.bias_decay == 0
    assert [h.name for h in net.heads] == ["main"]


def test_caffe_unsupported_layers_are_all_reported_with_positions(tmp_path, capsys):
    path = tmp_path / "odd.prototxt"
    path.write_text(V1_CHAIN.replace('layers { name: "relu2" type: RELU', 'layers { name: "relu2" type: PRELU')
                    + 'layer { name: "up" type: "Deconvolution" bottom: "fc" top: "up" }\n')
    with pytest.raises(UnsupportedError) as info:
        import_caffe(path)
    e = info.value
    assert (e.line, e.column) == (13, 1)
    assert "2 layer(s) cnds cannot import" in e.message and "13:1 relu2 (PRELU)" in e.message
    assert "17:1 up (Deconvolution)" in e.message
    out = tmp_path / "odd.cnds"
    assert import_main([str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:13:1: ") and "Traceback" not in err and not out.exists()


def test_caffe_malformed_file_and_missing_file(tmp_path, capsys):
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "x"\nlayer { name: "c" type: "Convolution" \n')
    with pytest.raises(SpecSyntaxError) as info:
        import_caffe(path)
    assert info.value.line == 3
    assert import_main([str(tmp_path / "none.prototxt"), "-o", str(tmp_path / "n.cnds")]) == 1
    assert "none.prototxt: " in capsys.readouterr().err
    path.write_text(V1_CHAIN.replace("num_output: 16 ", ""))  # conv2 without its output count
    assert import_main([str(path), "-o", str(tmp_path / "m.cnds")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:10:1: unsupported: layer 'conv2' (Convolution) has no convolution_param")
    assert not (tmp_path / "m.cnds").exists()


SMALL = """name: "t"
input: "data"
input_dim: 1
input_dim: 1
input_dim: 8
input_dim: 8
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


@pytest.mark.parametrize("old, new, at, message", [
    ("pad: 1 }", "pad_h: 0 pad_w: 1 }", "pad_h", "convolution_param { pad_h } is not imported"),
    ("kernel_size: 3", "kernel_size: 3 kernel_size: 1", "kernel_size: 1", "convolution_param { kernel_size } given per side"),
    ('top: "conv1" }', 'top: "conv1" relu_param { negative_slope: 0.1 } }', "negative_slope", "a leaky ReLU (negative_slope 0.1)"),
    ('top: "loss" }', 'top: "loss" loss_weight: nan }', "loss_weight", "loss_weight must be a finite number >= 0, got 'nan'"),
    ("num_output: 4", 'num_output: "2*2"', "num_output", "num_output } must be a whole number >= 1, got '2*2'"),
    ("kernel_size: 3", "kernel_size: 0", "kernel_size: 0", "kernel_size } must be a whole number >= 1, got 0"),
    ("input_dim: 8\ninput_dim: 8", 'input_dim: "eight"\ninput_dim: 8', 'input_dim: "eight"', "input_dim must be a whole number"),
    ('layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }',
     'layer { name: "other" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 2 '
     'kernel_size: 1 } }', 'layer { name: "other"', "blob 'conv1' is written by layer 'conv1' and again by 'other'"),
    ('layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }',
     'layer { name: "early" type: "InnerProduct" bottom: "conv1" top: "early" inner_product_param { num_output: 3 } }\n'
     'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }', 'layer { name: "relu1"',
     "layer 'relu1' rewrites blob 'conv1' in place after layer 'early' read its earlier value"),
], ids=["pad_h", "kernel-per-side", "leaky-relu", "loss-weight-nan", "string-number", "kernel-0", "input-dim-string",
        "two-writers", "in-place-after-a-reader"])
def test_caffe_fields_cnds_would_drop_or_misread_are_errors_at_their_place(old, new, at, message, tmp_path,
                                                                              capsys):
    """Each imported silently before (exit 0, a different network) or failed with a traceback or against the
    output file: now one line at the prototxt's line:col, nothing written."""
    assert old in SMALL
    path, out = tmp_path / "t.prototxt", tmp_path / "t.cnds"
    text = SMALL.replace(old, new, 1)
    path.write_text(text)
    i = text.index(at)  # the field (or layer) the error is about
    where = f"{text.count(chr(10), 0, i) + 1}:{i - text.rfind(chr(10), 0, i)}"
    assert import_main([str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:{where}: ") and message in err.splitlines()[0], err
    assert "Traceback" not in err and not out.exists()


def test_caffe_small_net_imports_as_is(tmp_path, capsys):
    path, out = tmp_path / "t.prototxt", tmp_path / "t.cnds"
    path.write_text(SMALL)
    assert import_main([str(path), "-o", str(out)]) == 0 and "conv1: conv2d(4, 3, pad=1" in out.read_text()


# ---- torchvision ------------------------------------------------------------------------------------------


# beyond the tested list: an explicit flatten (squeezenet), names that are no words (regnet: block1-0),
# x.mean([2, 3]) as a global pool (mnasnet)
@pytest.mark.parametrize("name", MODELS + ("squeezenet1_0", "regnet_x_400mf", "mnasnet0_5"))
def test_torchvision_import_equals_torchvision(name):
    imported = import_torchvision(name)
    net = compile_text(imported.text, f"{name}.cnds")
    assert sum(layer.params for layer in net.trunk) == imported.params == sum(
        p.numel() for p in imported.model.parameters())
    model = build_module(net, materialize=False)
    assert set(model.state_dict()) == set(imported.state_dict())  # torchvision's names (as words)
    if name in MODELS:
        assert set(model.state_dict()) == set(imported.model.state_dict())  # unchanged
    model = build_module(net, seed=0).eval()
    model.load_state_dict(imported.state_dict())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        diff = (model(x).logits - imported.model.eval()(x)).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "googlenet", "densenet121"])
def test_torchvision_import_exports_to_onnx_within_tolerance(name, tmp_path):
    import onnxruntime as ort

    from cnds_compiler.lowering.onnx_export import export_onnx

    imported = import_torchvision(name)
    net = compile_text(imported.text, f"{name}.cnds")
    state = imported.model.state_dict()
    report = export_onnx(net, tmp_path / "m.onnx", weights=state)
    assert report.parity.ok
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    (got,) = session.run(["logits"], {session.get_inputs()[0].name: x.numpy()})
    with torch.inference_mode():
        ref = imported.model.eval()(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_torchvision_model_with_unsupported_parts_lists_them_all():
    with pytest.raises(UnsupportedError) as info:
        import_torchvision("mobilenet_v2")
    message = info.value.message
    assert "35 construct(s) cnds cannot write" in message and "features.0.2: ReLU6 has no cnds op" in message


def test_torchvision_cli_writes_spec_and_checkpoint(tmp_path, capsys):
    import torchvision

    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    out = tmp_path / "r18.cnds"
    assert import_main(["torchvision:resnet18", "-o", str(out), "--weights", str(weights), "--input", "3x64x64"]) == 0
    assert "11,689,512 parameters" in capsys.readouterr().out
    net = compile_spec(out)
    ckpt = load_checkpoint(out.with_suffix(".pt"), net)  # a cnds checkpoint of exactly this network
    assert torch.equal(ckpt["model"]["layer3.1.conv2.weight"], torch.load(weights)["layer3.1.conv2.weight"])
    assert str(net.input) == "3x64x64" and net.data.resize == (73, 73)
    # bad inputs: one line each, exit 1, nothing written
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    cases = [(["torchvision:resnet17", "-o", str(tmp_path / "a.cnds")], "did you mean 'resnet18'"),
             (["torchvision:resnet18", "-o", str(tmp_path / "b.cnds"), "--weights", str(bad)], "bad.pth: "),
             (["torchvision:resnet18", "-o", str(tmp_path / "c.cnds"), "--weights", str(tmp_path / "no.pth")],
              "no.pth: "),
             (["torchvision:resnet18", "-o", str(tmp_path / "d.cnds"), "--input", "1x8x8"],
              "does not run on a 1x8x8 input (--input): Given groups=1")]
    for args, message in cases:
        assert import_main(args) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) <= 4 and "Traceback" not in err
        assert not Path(args[2]).exists() and not Path(args[2]).with_suffix(".pt").exists()


def _env():
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def test_readme_path_import_supervise_finetune_export_predict(tmp_path):
    """torchvision ResNet-18 with weights → derived spec with two branches → fine-tune on digits with
    --init-from → branch-free ONNX → cnds-predict."""
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    assert import_main(["torchvision:resnet18", "-o", str(tmp_path / "resnet18.cnds"), "--weights", str(weights),
                        "--input", "3x32x32", "-q"]) == 0
    derived = tmp_path / "resnet18_digits.cnds"
    derived.write_text('extends "resnet18.cnds"\nnetwork resnet18_digits\nclasses 10\n'
                       "supervise layer2 as aux2 weight 0.3 { pool: gap; fc: linear(classes) }\n"
                       "supervise layer3 as aux3 weight 0.3 { pool: gap; fc: linear(classes) }\n")
    run = subprocess.run([sys.executable, "-m", "cnds_compiler.train.cli", str(derived), "--data", "digits",
                          "--out", str(tmp_path / "run"), "--epochs", "1", "--limit-train", "256", "--no-progress",
                          "--cpu", "--init-from", str(tmp_path / "resnet18.pt")],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr
    assert "copied" in run.stdout and "fc (weight, bias shape differs)" in run.stdout  # the 1000-class fc: left
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]["val_top1_error"]) == {"main", "aux2", "aux3"}
    onnx_path = tmp_path / "r.onnx"
    ex = subprocess.run([sys.executable, "-m", "cnds_compiler.cli", str(derived), "--emit", "onnx", "-o",
                         str(onnx_path), "--weights", str(tmp_path / "run" / "last.pt")],
                        capture_output=True, text=True, env=_env(), timeout=600)
    assert ex.returncode == 0, ex.stderr
    import onnx

    assert not any("aux" in n.name for n in onnx.load(str(onnx_path)).graph.initializer)
    from cnds_runtime.cli import predict_main
    from PIL import Image
    from sklearn.datasets import load_digits

    image = tmp_path / "d.png"
    Image.fromarray((load_digits().images[3] * 255 / 16).astype(np.uint8)).save(image)
    assert predict_main([str(onnx_path), str(image), "--top-k", "1"]) == 0


RESNET_DEPLOY = """name: "TinyResNet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { eps: 0.001 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "res/conv" type: "Convolution" bottom: "conv1" top: "res/conv"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "res/bn" type: "BatchNorm" bottom: "res/conv" top: "res/conv" }
layer { name: "res/scale" type: "Scale" bottom: "res/conv" top: "res/conv" scale_param { bias_term: true } }
layer { name: "res/sum" type: "Eltwise" bottom: "conv1" bottom: "res/conv" top: "res/sum" eltwise_param { operation: SUM } }
layer { name: "res/relu" type: "ReLU" bottom: "res/sum" top: "res/sum" }
layer { name: "pool" type: "Pooling" bottom: "res/sum" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 4 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_caffe_deploy_file_with_batchnorm_scale_and_residual_sum(tmp_path):
    path = tmp_path / "deploy.prototxt"
    path.write_text(RESNET_DEPLOY)
    text = import_caffe(path).text
    assert "conv1: conv2d(8, 3, pad=1, bias=none) batchnorm(eps=0.001, momentum=0.001) relu" in text
    assert "res.sum: add(conv1, res.conv) relu" in text
    net = compile_text(text, str(tmp_path / "deploy.cnds"))
    assert str(net.input) == "3x16x16" and net.num_classes == 4 and [h.name for h in net.heads] == ["main"]
    # batchnorm + scale = one affine batchnorm: 2 parameters per channel, as Caffe's BatchNorm + Scale hold
    assert net.layer("conv1").params == 8 * 3 * 9 + 2 * 8
    model = build_module(net, seed=0).eval()
    assert model(torch.randn(2, 3, 16, 16)).logits.shape == (2, 4)


def test_caffe_exact_repeats_become_one_repeated_statement(tmp_path):
    layers = "".join(conv_layer(f"conv3_{i}", "data" if i == 1 else f"conv3_{i - 1}", 8, 3, pad=1) for i in (1, 2, 3))
    path = tmp_path / "rep.prototxt"
    path.write_text('name: "Rep"\ninput: "data"\ninput_dim: 1 input_dim: 3 input_dim: 16 input_dim: 16\n' + layers
                    + fc_layer("fc", "conv3_3", 4))
    text = import_caffe(path).text
    assert "conv3_{1,2,3}: conv2d(8, 3, pad=1, bias=0.2, init=xavier) relu" in text
    net = compile_text(text, str(tmp_path / "rep.cnds"))
    assert [layer.name for layer in net.trunk] == ["conv3_1", "conv3_2", "conv3_3", "fc"]
