"""The deployment runtime: works without torch, prepares images exactly like the training evaluation
transform, classifies and extracts features with what the export's metadata says, and its CLIs fail
with one clear line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from cnds_runtime import Classifier, CndsModel, FeatureExtractor, ImageError, ModelError, Preprocessor
from cnds_runtime.cli import extract_main, predict_main
from cnds_runtime.providers import CPU, CUDA, choose_providers, gpu_usable
from onnx import TensorProto, helper
from PIL import Image

from cnds_compiler import compile_spec
from cnds_compiler.lowering.onnx_export import export_onnx

from .conftest import SPECS, run_reader_gone

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """fmnist_cnds8 exported with fc7, pool5 and logits, and with fc7 only; digits_cnds8 with logits; a plain
    ONNX file."""
    d = tmp_path_factory.mktemp("models")
    fm = compile_spec(SPECS / "fmnist_cnds8.cnds")
    out = {"fmnist": d / "fmnist.onnx", "fc7": d / "fc7.onnx", "digits": d / "digits.onnx", "plain": d / "plain.onnx"}
    export_onnx(fm, out["fmnist"], features=["fc7", "pool5", "logits"])
    export_onnx(fm, out["fc7"], features=["fc7"])
    export_onnx(compile_spec(SPECS / "digits_cnds8.cnds"), out["digits"])
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "plain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    plain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(plain, str(out["plain"]))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Grey and RGB images of assorted sizes, one corrupt file, in a folder tree."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    (d / "sub").mkdir()
    for name, size, mode in [("a.png", (28, 28), "L"), ("b.jpg", (41, 33), "RGB"), ("sub/c.png", (20, 64), "RGB"),
                             ("d.bmp", (100, 90), "L")]:
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / name)
        paths[name] = d / name
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    paths["bad.png"] = d / "bad.png"
    paths["dir"] = d
    return paths


# ---- no torch ---------------------------------------------------------------------------------------


def test_runtime_runs_without_torch(models, images, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None          # any `import torch` now raises ImportError
        sys.modules["cnds_compiler"] = None
        import numpy as np
        from cnds_runtime import Classifier, FeatureExtractor
        from cnds_runtime.cli import extract_main, predict_main
        clf = Classifier({str(models["fmnist"])!r})
        preds = clf.predict([{str(images["a.png"])!r}, {str(images["b.jpg"])!r}], top_k=3)
        assert len(preds) == 2 and len(preds[0].labels) == 3, preds
        feats = FeatureExtractor({str(models["fc7"])!r})([{str(images["a.png"])!r}])
        assert feats.shape == (1, 256) and feats.dtype == np.float32
        assert extract_main([{str(models["fc7"])!r}, {str(images["a.png"])!r}, "--out", {str(tmp_path / "f.npz")!r}]) == 0
        assert predict_main([{str(models["fmnist"])!r}, {str(images["a.png"])!r}]) == 0
        loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "cnds_compiler", "torchvision")
                  and sys.modules[m] is not None]
        assert not loaded, loaded
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok") and r.stderr == ""


def test_runtime_source_never_imports_torch_or_compiler():
    for path in (ROOT / "runtime" / "cnds_runtime").glob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "cnds_compiler" not in text.replace("``cnds_compiler", ""), path


# ---- preprocessing ----------------------------------------------------------------------------------


def torchvision_pipeline(channels, resize, crop, mean, std):
    from torchvision import transforms as T

    steps = [T.Grayscale(1)] if channels == 1 else []
    steps += [T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


@pytest.mark.parametrize(
    "channels, resize, crop, mean, std",
    [
        (3, (256, 256), (227, 227), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        (3, (40, 48), (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        (1, (28, 28), (28, 28), (0.286,), (0.353,)),
        (1, (36, 36), (32, 30), (0.1,), (0.3,)),
    ],
)
def test_preprocessing_matches_torchvision(channels, resize, crop, mean, std, images):
    pre = Preprocessor(channels, crop, resize, mean, std)
    tv = torchvision_pipeline(channels, resize, crop, mean, std)
    for name in ("a.png", "b.jpg", "sub/c.png", "d.bmp"):
        with Image.open(images[name]) as f:
            img = f.convert("RGB")
        ours = pre(images[name])
        theirs = tv(img).numpy()
        assert ours.shape == theirs.shape == (channels, *crop)
        pixel_error = np.abs(ours - theirs) * np.asarray(std, np.float32).reshape(-1, 1, 1)
        assert pixel_error.max() <= 1 / 255 + 1e-6, (name, pixel_error.max())


def test_preprocessing_equals_training_eval_transform(images):
    """The image-folder dataset of cnds-train, in evaluation mode, gives the same tensors (same PIL ops)."""
    from cnds_compiler.data import ImageFolderDataset

    files = [str(images[n]) for n in ("a.png", "b.jpg", "sub/c.png", "d.bmp")]
    for c, resize, crop, mean, std in [(3, (64, 64), (56, 56), (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)),
                                       (1, (28, 28), (28, 28), (0.286,), (0.353,))]:
        ds = ImageFolderDataset([(f, 0) for f in files], out_shape=(c, *crop), resize=resize, mean=mean,
                                std=std, train=False, mirror=False, ten_crop=False, strict=True,
                                location="test")
        pre = Preprocessor(c, crop, resize, mean, std)
        for i, f in enumerate(files):
            np.testing.assert_allclose(pre(f), ds[i][0].numpy(), atol=1e-6)


def test_inputs_as_paths_pil_and_arrays_agree(models, images):
    model = CndsModel(models["fmnist"])
    path = images["b.jpg"]
    with Image.open(path) as f:
        pil = f.convert("RGB")
    arr = np.asarray(pil)
    a, b, c = (model.preprocess(x) for x in (path, pil, arr))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(model.preprocess(arr / 255.0), a, atol=1e-6)  # float arrays in [0, 1]
    batch = np.stack([arr, arr])  # N x H x W x C
    feats = FeatureExtractor(model, "fc7")
    np.testing.assert_allclose(feats(batch), feats([path, path]), atol=1e-6)
    with Image.open(images["a.png"]) as f:
        grey = np.asarray(f)  # 28 x 28
    grey_batch = np.stack([grey, grey[::-1], grey])  # N x H x W: three grey images, not one 28x3 colour image
    out = feats(grey_batch)
    assert out.shape[0] == 3
    np.testing.assert_allclose(out[0], feats([images["a.png"]])[0], atol=1e-6)
    assert not np.allclose(out[0], out[1])


def test_grey_model_takes_colour_images_and_vice_versa(models, images):
    model = CndsModel(models["fmnist"])
    assert model.preprocess(images["b.jpg"]).shape == (1, 28, 28)
    assert model.metadata.resize == (28, 28)  # no data.resize in the spec: straight to the input size


# ---- classifier and extractor -----------------------------------------------------------------------


def test_classifier_uses_metadata_class_names(models, images):
    clf = Classifier(models["fmnist"])
    assert clf.class_names[:3] == ("t-shirt", "trouser", "pullover")
    files = [images["a.png"], images["b.jpg"], images["d.bmp"]]
    probs = clf.probabilities(files, batch_size=2)
    assert probs.shape == (3, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    preds = clf.predict(files, top_k=20)
    assert len(preds[0].labels) == 10  # top-k clamps to the class count
    assert preds[1].label == clf.class_names[int(np.argmax(probs[1]))]
    assert list(preds[1].scores) == sorted(preds[1].scores, reverse=True)
    digits = Classifier(models["digits"])  # a spec without names: the class indices
    assert digits.class_names == tuple(str(i) for i in range(10))


def test_feature_extractor_matches_model_run(models, images):
    model = CndsModel(models["fmnist"], threads=1)
    fx = FeatureExtractor(model, layer="fc7")
    files = [images["a.png"], images["sub/c.png"], images["d.bmp"]]
    feats = fx(files, batch_size=2)
    direct = model.run(model.preprocess.batch(files), ["fc7"])["fc7"]
    np.testing.assert_allclose(feats, direct, atol=1e-6)
    assert fx.shape == (256,) and feats.shape == (3, 256)
    with pytest.raises(ModelError, match="several outputs"):
        FeatureExtractor(model)
    with pytest.raises(ModelError, match="no output 'conv2'.*--features conv2"):
        FeatureExtractor(model, layer="conv2")
    assert FeatureExtractor(models["fc7"]).output.name == "fc7"


def test_features_only_export_is_not_a_classifier(models):
    with pytest.raises(ModelError, match="no logits output"):
        Classifier(models["fc7"])


def test_bad_images_raise_or_are_skipped(models, images):
    fx = FeatureExtractor(models["fc7"])
    with pytest.raises(ImageError, match="bad.png: not an image file"):
        fx([images["a.png"], images["bad.png"]])
    with pytest.raises(ImageError, match="missing.png: no such image file"):
        fx([images["dir"] / "missing.png"])
    batches = list(fx.iter_batches([images["a.png"], images["bad.png"], images["d.bmp"]], skip_bad=True))
    assert [str(p) for p in batches[0].items] == [str(images["a.png"]), str(images["d.bmp"])]
    assert len(batches[0].skipped) == 1 and batches[0].outputs["fc7"].shape == (2, 256)


def test_not_a_cnds_model(models, tmp_path):
    with pytest.raises(ModelError, match="not a cnds export"):
        CndsModel(models["plain"])
    junk = tmp_path / "junk.onnx"
    junk.write_text("hello")
    with pytest.raises(ModelError, match="junk.onnx: not an ONNX model"):
        CndsModel(junk)
    with pytest.raises(ModelError, match="nope.onnx: no such model file"):
        CndsModel(tmp_path / "nope.onnx")


# ---- providers --------------------------------------------------------------------------------------


def test_cpu_provider_without_gpu_and_no_log_spam(models, capfd, monkeypatch):
    import cnds_runtime.providers as providers

    monkeypatch.setattr(providers, "gpu_usable", lambda: False)
    assert choose_providers("auto") == [CPU]
    with pytest.raises(ModelError, match="device 'cuda' requested"):
        choose_providers("cuda")
    model = CndsModel(models["digits"])
    model.run(np.zeros((2, 1, 8, 8), np.float32))
    assert model.providers == [CPU] and not model.on_gpu
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_usable(), reason="needs a CUDA GPU")
def test_cuda_provider_matches_cpu(models, images):
    gpu = CndsModel(models["fmnist"], device="cuda")
    cpu = CndsModel(models["fmnist"], device="cpu")
    assert gpu.providers[0] == CUDA
    x = cpu.preprocess.batch([images["a.png"], images["b.jpg"]])
    np.testing.assert_allclose(gpu.run(x)["logits"], cpu.run(x)["logits"], atol=1e-3)


# ---- CLIs -------------------------------------------------------------------------------------------


def test_extract_cli_writes_features_and_paths(models, images, tmp_path, capsys):
    out = tmp_path / "feats.npz"
    rc = extract_main([str(models["fmnist"]), str(images["dir"]), "--layer", "fc7", "--out", str(out),
                       "--skip-bad", "--progress", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert rc == 0 and f"wrote {out}: 4 images x fc7 (256), skipped 1 unreadable" in captured.out
    assert "bad.png: not an image file" in captured.err
    # the bar counts the skipped file too: its last state is 5/5 (earlier redraws depend on timing)
    assert re.findall(r"(\d+)/5", captured.err)[-1] == "5"
    data = np.load(out)
    paths = list(data["paths"])
    assert data["features"].shape == (4, 256) and len(paths) == 4 and str(data["layer"]) == "fc7"
    assert paths == sorted(paths) and paths[-1].endswith("sub/c.png")
    expected = FeatureExtractor(models["fmnist"], "fc7")(paths)
    np.testing.assert_allclose(data["features"], expected, atol=1e-6)


def test_predict_cli(models, images, capsys):
    rc = predict_main([str(models["fmnist"]), str(images["a.png"]), str(images["b.jpg"]), "--top-k", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 2 and lines[0].startswith(f"{images['a.png']}: ")
    names = Classifier(models["fmnist"]).class_names
    assert lines[0].count("%") == 2 and any(n in lines[0] for n in names)
    rc = predict_main([str(models["fmnist"]), str(images["a.png"]), "--json", "-k", "1"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["path"] == str(images["a.png"]) and doc["top"][0]["class"] in names


@pytest.mark.parametrize(
    "main, args, message",
    [
        (predict_main, ["{plain}", "{a}"], "plain.onnx: not a cnds export"),
        (predict_main, ["{junk}", "{a}"], "junk.onnx: not an ONNX model"),
        (predict_main, ["{fc7}", "{a}"], "no logits output"),
        (predict_main, ["{fmnist}", "{bad}"], "bad.png: not an image file Pillow can read"),
        (predict_main, ["{fmnist}", "{missing}"], "missing.png: no such image file"),
        (extract_main, ["{fmnist}", "{a}"], "several outputs"),
        (extract_main, ["{fmnist}", "{a}", "--layer", "conv2"], "no output 'conv2'"),
        (extract_main, ["{nope}", "{a}"], "nope.onnx: no such model file"),
        (extract_main, ["{fc7}", "{empty}"], "no image files found"),
    ],
)
def test_cli_errors_are_one_line(main, args, message, models, images, tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_text("hello")
    (tmp_path / "empty").mkdir()
    fill = {"plain": models["plain"], "fc7": models["fc7"], "fmnist": models["fmnist"], "a": images["a.png"],
            "bad": images["bad.png"], "missing": tmp_path / "missing.png", "junk": junk,
            "nope": tmp_path / "nope.onnx", "empty": tmp_path / "empty"}
    rc = main([a.format(**{k: str(v) for k, v in fill.items()}) for a in args] + ["--out", str(tmp_path / "o.npz")]
              if main is extract_main else [a.format(**{k: str(v) for k, v in fill.items()}) for a in args])
    err = capsys.readouterr().err
    assert rc == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.npz").exists()


def test_cli_subprocess_has_no_traceback(models, images):
    r = subprocess.run([sys.executable, "-c", "import sys; from cnds_runtime.cli import predict_main; "
                        "sys.exit(predict_main(sys.argv[1:]))", str(models["plain"]), str(images["a.png"])],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("cnds-predict: error: ") and "Traceback" not in r.stderr


def test_predict_to_a_reader_that_left_ends_quietly_with_the_sigpipe_code(models, images):
    code, _, err = run_reader_gone([sys.executable, "-c", "import sys; from cnds_runtime.cli import predict_main; "
                                    "sys.exit(predict_main(sys.argv[1:]))", str(models["digits"]), str(images["a.png"])])
    assert (code, err) == (141, "")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_predict_output_that_cannot_be_written_is_one_line(models, images):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-c", "import sys; from cnds_runtime.cli import predict_main; "
                            "sys.exit(predict_main(sys.argv[1:]))", str(models["digits"]), str(images["a.png"])],
                           stdout=full, stderr=subprocess.PIPE, text=True)
    assert (r.returncode, r.stderr) == (1, "cnds-predict: error: cannot write the output (No space left on device)\n")


def test_predict_escapes_a_name_its_stdout_cannot_encode(models, images, tmp_path):
    import os
    import shutil

    named = tmp_path / "caf\u00e9.png"
    shutil.copy(images["a.png"], named)
    r = subprocess.run([sys.executable, "-c", "import sys; from cnds_runtime.cli import predict_main; "
                        "sys.exit(predict_main(sys.argv[1:]))", str(models["digits"]), str(named)],
                       capture_output=True, env=dict(os.environ, PYTHONIOENCODING="ascii"))
    assert r.returncode == 0 and r.stdout.startswith(str(tmp_path).encode() + b"/caf\\xe9.png: ") and r.stderr == b""


@pytest.mark.parametrize("threads", ["0", "-1", "100000"])
def test_thread_counts_outside_1_to_1024_are_usage_errors(models, images, tmp_path, threads, capsys):
    """onnxruntime starts every thread it is told to: --threads 100000 hung the command, silently."""
    for main, extra in ((predict_main, []), (extract_main, ["--out", str(tmp_path / "f.npz")])):
        with pytest.raises(SystemExit) as e:
            main([str(models["digits"]), str(images["a.png"]), "--threads", threads, *extra])
        assert e.value.code == 2 and "--threads must be between 1 and 1024" in capsys.readouterr().err
    assert not (tmp_path / "f.npz").exists()


def test_predict_quotes_a_name_with_a_line_break_so_each_result_stays_one_line(models, images, tmp_path, capsys):
    import shutil

    odd = tmp_path / "a\nb.png"
    shutil.copy(images["a.png"], odd)
    assert predict_main([str(models["digits"]), str(odd), str(images["a.png"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(ascii(str(odd)) + ": ") and lines[1].startswith(str(images["a.png"]))


def test_16_bit_grey_png_is_scaled_like_its_8_bit_twin(tmp_path):
    from cnds_runtime.preprocess import eight_bit, open_image
    from PIL import Image

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    img = open_image(tmp_path / "wide.png")
    assert img.mode.startswith("I")  # Pillow's 16-bit grey
    got = np.asarray(eight_bit(img).convert("RGB"), dtype=np.int32)
    want = np.asarray(Image.fromarray((ramp // 257).astype(np.uint8)).convert("RGB"), dtype=np.int32)
    assert np.abs(got - want).max() <= 1 and got.max() == 255 and got.min() == 0
    assert np.asarray(img.convert("L")).mean() > 250  # what Pillow alone does: clipped to white
