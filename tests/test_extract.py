"""Feature extraction at scale: the parallel loader, the three output formats (round trips against what the
model returns), streaming in shards with flat memory, resume after a kill, the Ray Data engine's equality
with the local one, and bad inputs as one-line errors that lose nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from cnds_runtime import Classifier, CndsModel, FeatureExtractor, Preprocessor
from cnds_runtime.cli import extract_main
from cnds_runtime.extract import ShardExtractor, extract_local, extract_ray
from cnds_runtime.metadata import ModelMetadata
from cnds_runtime.output import read_features
from cnds_runtime.pipeline import BatchLoader
from PIL import Image

from cnds_compiler import compile_spec
from cnds_compiler.lowering.onnx_export import export_onnx

from .conftest import SPECS

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("xmodels")
    net = compile_spec(SPECS / "fmnist_cnds8.cnds")
    out = {"all": d / "all.onnx", "fc7": d / "fc7.onnx"}
    export_onnx(net, out["all"], features=["fc7", "pool5", "logits"])
    export_onnx(net, out["fc7"], features=["fc7"])
    return out


def _write_images(d: Path, n: int, seed: int = 0, size: tuple[int, int] | None = None) -> list[Path]:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = size or (int(rng.integers(20, 70)), int(rng.integers(20, 70)))
        mode, ext = ("RGB", "jpg") if i % 2 else ("L", "png")
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        p = d / f"img{i:04d}.{ext}"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ximages") / "imgs"
    _write_images(d, 23)
    return d


def _sorted_files(d: Path) -> list[str]:
    return sorted(str(p) for p in d.rglob("*") if p.is_file())


# ---- the local pipeline -----------------------------------------------------------------------------


@pytest.mark.parametrize("workers, loader", [(0, "threads"), (2, "threads"), (1, "processes")],
                         ids=["serial", "threads", "processes"])
def test_loader_gives_the_serial_preprocessing(workers, loader, models, folder, tmp_path):
    model = CndsModel(models["all"])
    files = _sorted_files(folder)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    items = files[:7] + [str(bad)] + files[7:]
    load = BatchLoader(model.preprocess, batch_size=5, workers=workers, loader=loader, skip_bad=True)
    got, kept, skipped = [], [], []
    for prepared in load(items):
        got.append(prepared.array.copy())  # the buffer is recycled after the next batch
        kept += prepared.items
        skipped += [(item, str(e)) for item, e in prepared.skipped]
    assert kept == files and len(skipped) == 1 and skipped[0][0] == str(bad) and "not an image" in skipped[0][1]
    np.testing.assert_array_equal(np.concatenate(got), model.preprocess.batch(files))
    with pytest.raises(Exception, match="bad.png: not an image file"):
        list(BatchLoader(model.preprocess, batch_size=5, workers=workers, loader=loader)(items))


@pytest.mark.parametrize("size", [(90, 60), (50, 120), (64, 64)], ids=["landscape", "portrait", "square"])
def test_shorter_side_resize_matches_torchvision(size, tmp_path):
    from torchvision import transforms as T

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = Preprocessor(3, (40, 40), 48, mean, std)(img)
    theirs = T.Compose([T.Resize(48), T.CenterCrop(40), T.ToTensor(), T.Normalize(mean, std)])(img).numpy()
    assert ours.shape == theirs.shape == (3, 40, 40)
    pixel_error = np.abs(ours - theirs) * np.asarray(std, np.float32).reshape(-1, 1, 1)
    assert pixel_error.max() <= 1 / 255 + 1e-6
    md = ModelMetadata("n", "h", "0", "input", (3, 40, 40), 2, (), (), resize=48, mean=mean, std=std)
    assert ModelMetadata.from_props(md.to_props()).resize == 48


# ---- output formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["npy", "npz", "parquet"])
def test_format_round_trip(ext, models, folder, tmp_path, capsys):
    out = tmp_path / f"feats.{ext}"
    args = [str(models["all"]), str(folder), "--out", str(out), "--shard-size", "4", "--batch-size", "3"]
    args += ["--layer", "pool5"] if ext == "npy" else ["--layer", "fc7,pool5", "--top-k", "3"]
    assert extract_main(args) == 0
    assert f"wrote {out}: 23 images x " in capsys.readouterr().out
    files = _sorted_files(folder)
    fx7, fx5 = FeatureExtractor(models["all"], "fc7"), FeatureExtractor(models["all"], "pool5")
    pool5 = fx5(files).reshape(23, -1)  # flattened: one row per image
    assert len(fx5.shape) == 3 and pool5.shape == (23, int(np.prod(fx5.shape)))
    if ext == "npy":
        np.testing.assert_allclose(np.load(out), pool5, atol=1e-6)
        assert Path(str(out) + ".paths.txt").read_text().splitlines() == files
    elif ext == "npz":
        with np.load(out) as z:
            assert z["paths"].tolist() == files and z["layers"].tolist() == ["fc7", "pool5"]
            np.testing.assert_allclose(z["fc7"], fx7(files), atol=1e-6)
            np.testing.assert_allclose(z["pool5"], pool5, atol=1e-6)
            top = z["top_k_index"]
            assert json.loads(str(z["shapes"]))["pool5"] == list(fx5.shape)
    else:
        table = pq.read_table(out)
        assert table.column_names == ["path", "fc7", "pool5", "top_k_index", "top_k_prob", "top_k_label"]
        assert table.column("path").to_pylist() == files
        np.testing.assert_allclose(np.stack(table.column("fc7").to_numpy(zero_copy_only=False)), fx7(files), atol=1e-6)
        np.testing.assert_allclose(read_features(out, "pool5")[1], pool5, atol=1e-6)
        top = np.stack(table.column("top_k_index").to_numpy(zero_copy_only=False))
        assert json.loads(table.schema.metadata[b"cnds.shapes"])["pool5"] == list(fx5.shape)
        clf = Classifier(models["all"])
        assert table.column("top_k_label").to_pylist()[0] == list(clf.predict([files[0]], top_k=3)[0].labels)
    if ext != "npy":
        expected = [list(p.indices) for p in Classifier(models["all"]).predict(files, top_k=3)]
        assert top.tolist() == expected
    assert not (tmp_path / "feats.npz.parts").exists() and sorted(p.name for p in tmp_path.iterdir() if
                                                                  p.name.startswith(".")) == []


def test_memory_stays_flat_as_images_grow(models, tmp_path):
    """Shards bound what is held: 8x the images, not 8x the peak (numpy buffers are traced by tracemalloc)."""
    src = _write_images(tmp_path / "few", 8, size=(28, 28))
    model = CndsModel(models["all"])

    def peak(n: int) -> int:
        paths = [src[i % len(src)] for i in range(n)]
        tracemalloc.start()
        extract_local(model, paths, tmp_path / f"o{n}.npz", layers=["pool5"], shard_size=64, batch_size=32,
                      workers=2)
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size

    small, large = peak(256), peak(2048)
    dim = int(np.prod(model.output("pool5").shape))
    grown = (2048 - 256) * dim * 4  # what holding every feature would add
    assert large - small < grown / 4, (small, large, grown)
    paths, feats = read_features(tmp_path / "o2048.npz")
    assert feats.shape == (2048, dim) and len(paths) == 2048


# ---- resume and bad inputs --------------------------------------------------------------------------


def test_resume_after_kill(models, tmp_path):
    big = _write_images(tmp_path / "big", 4, size=(1200, 1200))
    paths = [str(big[i % 4]) for i in range(160)]
    listing = tmp_path / "list"
    listing.mkdir()
    for i, p in enumerate(paths):  # a folder of 160 links: the command line stays short
        os.symlink(p, listing / f"{i:04d}{Path(p).suffix}")
    out = tmp_path / "feats.parquet"
    cmd = [sys.executable, "-c", "import sys; from cnds_runtime.cli import extract_main; "
           "sys.exit(extract_main(sys.argv[1:]))", str(models["fc7"]), str(listing), "--out", str(out),
           "--shard-size", "10", "--batch-size", "5", "--workers", "0", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / "feats.parquet.parts"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(parts.glob("part-*.npz"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in parts.glob("part-*.npz"))
    assert 2 <= len(finished) < 16 and not out.exists(), finished
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.npz")}
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    done = len(before)
    assert f"resumed: {done} of 16 shards were already done" in r.stdout
    got_paths, got = read_features(out)
    assert got_paths == _sorted_files(listing)
    fx = FeatureExtractor(models["fc7"])
    np.testing.assert_allclose(got[::37], fx(got_paths[::37]), atol=1e-6)
    assert not parts.exists()


def test_corrupt_image_mid_folder_stops_then_resumes_with_skip_bad(models, tmp_path, capsys):
    d = tmp_path / "imgs"
    files = _write_images(d, 12)
    files[7].write_bytes(files[7].read_bytes()[:60])  # truncated mid-file
    out = tmp_path / "f.npz"
    args = [str(models["fc7"]), str(d), "--out", str(out), "--shard-size", "3"]
    assert extract_main(args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{files[7]}: " in err and "rerun with --skip-bad to resume" in err
    assert not out.exists() and sorted(p.name for p in (tmp_path / "f.npz.parts").glob("part-*")) == \
        ["part-00000.npz", "part-00001.npz"]
    assert extract_main(args + ["--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "11 images" in captured.out and "skipped 1 unreadable" in captured.out
    assert "resumed: 2 of 4 shards" in captured.out and f"skipped {files[7]}" in captured.err
    paths, feats = read_features(out)
    assert str(files[7]) not in paths and len(paths) == 11
    np.testing.assert_allclose(feats, FeatureExtractor(models["fc7"])(paths), atol=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{tmp}/f.csv"], "unknown output format '.csv': name the output .npy, .npz or .parquet"),
        (["--out", "{tmp}/f"], "unknown output format '(no extension)'"),
        (["--out", "{model}"], "the output would overwrite the model file"),
        (["--out", "{image}"], "the output would overwrite one of the input images"),
        (["--out", "{tmp}/afile.txt/f.npz"], "cannot write output"),
        (["--out", "{tmp}/f.npy", "--layer", "fc7"], "a .npy file holds one array"),
        (["--out", "{tmp}/f.npz", "--top-k", "2", "--model-fc7"], "--top-k needs the classifier"),
        (["--out", "{tmp}/f.parquet", "--engine", "ray", "--ray-address", "127.0.0.1:1"],
         "cannot reach a Ray cluster at 127.0.0.1:1"),
        (["--out", "{tmp}/f.npz", "--engine", "ray"], "the Ray engine writes a folder of Parquet shards"),
    ],
    ids=["csv", "no-ext", "model", "image", "unwritable", "npy-two-layers", "top-k", "ray-unreachable", "ray-npz"],
)
def test_bad_outputs_are_one_line_and_write_nothing(args, message, models, folder, tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("x")
    image = _sorted_files(folder)[0]
    model = models["fc7"] if "--model-fc7" in args else models["all"]
    before = {p: p.stat().st_mtime_ns for p in (Path(image), model)}
    fill = {"tmp": tmp_path, "model": model, "image": image}
    layer = [] if model == models["fc7"] else ["--layer", "pool5"]
    argv = [str(model), str(folder), *layer] + [a.format(**fill) for a in args if a != "--model-fc7"]
    assert extract_main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_a_line_break_in_an_image_name_is_refused_for_npy_and_kept_whole_in_npz(models, tmp_path, capsys):
    """``NAME.npy.paths.txt`` lists one path per line: a name with a line break would shift every later row's
    name by one, silently. Refused before any work for .npy; .npz (and Parquet) store each path whole."""
    d = tmp_path / "imgs"
    _write_images(d, 2, size=(24, 24))
    odd = d / "a\u2028b.png"  # a line boundary to str.splitlines, as \n and \r are
    (d / "img0000.png").rename(odd)
    args = [str(models["fc7"]), str(d), "--no-progress"]
    assert extract_main([*args, "--out", str(tmp_path / "f.npy")]) == 1
    err = capsys.readouterr().err
    assert "has a line break in its name, so f.npy.paths.txt could not list it" in err and err.count("\n") == 1
    assert not (tmp_path / "f.npy").exists() and not (tmp_path / "f.npy.paths.txt").exists()
    assert extract_main([*args, "--out", str(tmp_path / "f.npz")]) == 0
    assert sorted(read_features(tmp_path / "f.npz")[0]) == sorted([str(odd), str(d / "img0001.jpg")])


def test_parquet_without_pyarrow_and_runtime_without_ray(models, folder, tmp_path):
    """The runtime imports neither Ray nor pyarrow unless asked; without them .npz works and .parquet says why."""
    code = f"""
import sys
sys.modules["pyarrow"] = None; sys.modules["ray"] = None; sys.modules["torch"] = None
from cnds_runtime.cli import extract_main
assert extract_main([{str(models['fc7'])!r}, {str(folder)!r}, "--out", {str(tmp_path / 'a.npz')!r}]) == 0
assert extract_main([{str(models['fc7'])!r}, {str(folder)!r}, "--out", {str(tmp_path / 'a.parquet')!r}]) == 1
assert extract_main([{str(models['fc7'])!r}, {str(folder)!r}, "--out", {str(tmp_path / 'b.parquet')!r},
                     "--engine", "ray"]) == 1
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and "needs pyarrow: pip install pyarrow" in lines[0], lines
    assert (tmp_path / "a.npz").exists() and not (tmp_path / "a.parquet").exists()


# ---- the Ray engine ---------------------------------------------------------------------------------


def test_ray_engine_equals_local_and_resumes(ray_cluster, models, folder, tmp_path, capsys):
    local = tmp_path / "local.parquet"
    assert extract_main([str(models["all"]), str(folder), "--out", str(local), "--layer", "fc7,pool5",
                         "--top-k", "2"]) == 0
    out = tmp_path / "ray.parquet"
    args = [str(models["all"]), str(folder), "--out", str(out), "--layer", "fc7,pool5", "--top-k", "2",
            "--engine", "ray", "--workers", "2", "--shard-size", "6"]
    assert extract_main(args) == 0
    assert f"wrote {out}: 23 images x fc7 (256), pool5" in capsys.readouterr().out
    parts = sorted(p.name for p in out.iterdir())
    assert parts == ["_cnds_extract.json"] + [f"part-{i:05d}.parquet" for i in range(4)]
    a, b = pq.read_table(local), pq.read_table(out).sort_by("path")
    assert a.column("path").to_pylist() == b.column("path").to_pylist() == _sorted_files(folder)
    for col in ("fc7", "pool5", "top_k_prob"):
        x, y = (np.stack(t.column(col).to_numpy(zero_copy_only=False)) for t in (a, b))
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert a.column("top_k_index").to_pylist() == b.column("top_k_index").to_pylist()
    # resume: a lost shard is redone, the others are kept as they are
    kept = {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name != "part-00002.parquet"}
    (out / "part-00002.parquet").unlink()
    assert extract_main(args) == 0
    assert "resumed: 3 of 4 shards were already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert pq.read_table(out).num_rows == 23


def test_ray_engine_corrupt_image_is_one_line(ray_cluster, models, tmp_path, capsys):
    d = tmp_path / "imgs"
    files = _write_images(d, 6)
    files[4].write_bytes(b"garbage")
    out = tmp_path / "r.parquet"
    summary_args = [str(models["fc7"]), str(d), "--out", str(out), "--engine", "ray", "--shard-size", "3"]
    assert extract_main(summary_args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{files[4]}: not an image file" in err, err
    assert not list(out.glob(".*")) and not (out / "part-00001.parquet").exists()
    summary = extract_ray(models["fc7"], [str(p) for p in files], out, shard_size=3, skip_bad=True)
    assert summary.images == 5 and summary.skipped == 1 and len(summary.actor_rates) >= 1


def test_ray_actor_reports_errors_as_data(models, folder, tmp_path):
    """What an actor cannot do (a model missing on its node, an unreadable image) comes back as a row that
    the driver turns into the one-line error, since Ray's wrappers lose the exception's class."""
    kwargs = dict(out=str(tmp_path), layers=["fc7"], top_k=0, batch_size=4, threads=1, skip_bad=False)
    missing = ShardExtractor(str(tmp_path / "not-on-this-node.onnx"), **kwargs)
    files = _sorted_files(folder)[:3]
    row = missing({"shard": np.array([0]), "paths": np.array([files], dtype=object)})
    kind, message, path = json.loads(row["error"][0])
    assert kind == "ModelError" and message == "no such model file" and path.endswith("not-on-this-node.onnx")
    good = ShardExtractor(str(models["fc7"]), **kwargs)
    row = good({"shard": np.array([3]), "paths": np.array([files], dtype=object)})
    assert row["error"][0] == "" and row["rows"][0] == 3 and (tmp_path / "part-00003.parquet").is_file()
    np.testing.assert_allclose(read_features(tmp_path / "part-00003.parquet", "fc7")[1],
                               FeatureExtractor(models["fc7"])(files), atol=1e-6)


def test_ray_restart_setting_follows_what_map_batches_accepts():
    """`max_restarts` goes through Ray's catch-all remote arguments, deprecated for removal in Ray 2.64: it
    is passed where map_batches still takes them and left out where not."""
    from cnds_runtime.extract import _no_restarts

    def with_remote_args(fn, *, batch_size=None, **ray_remote_args): ...

    def without_remote_args(fn, *, batch_size=None, compute=None): ...

    assert _no_restarts(with_remote_args) == {"max_restarts": 0}
    assert _no_restarts(without_remote_args) == {}
