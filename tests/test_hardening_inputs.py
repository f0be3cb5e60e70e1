"""Issue 12, families 4 and 5: inputs that would hang or explode, and deployed models whose metadata lies.

Every case is generated (over file kinds, roles, sizes and seeds) and must end, within a time bound, in
the project's own one-line error naming the file (``line:col`` where there is a spec line), or in the
documented skip. A regression that blocks (a FIFO opened for reading) fails the bound instead of hanging
the suite: :func:`bounded` runs the call in a thread, and :func:`unblock_fifos_after` opens the FIFOs'
write ends after the bound so a blocked reader wakes up.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from cnds_runtime import CndsModel, ModelError
from cnds_runtime.cli import extract_main, predict_main
from cnds_runtime.errors import ImageError
from cnds_runtime.metadata import ModelMetadata
from cnds_runtime.preprocess import MAX_IMAGE_PIXELS, expand_paths, image_files_under
from PIL import Image

from cnds_compiler.cli import compile_main
from cnds_compiler.errors import (
    ArgumentError,
    DataError,
    IRFormatError,
    MemoryBudgetError,
    SpecIncludeError,
    SpecSyntaxError,
)
from cnds_compiler.frontend import compile_spec
from cnds_compiler.io import MAX_TEXT_BYTES
from cnds_compiler.lang.merge import MAX_EXTENDS_DEPTH
from cnds_compiler.parser import MAX_REPEAT, parse_file
from cnds_compiler.serialize import MAX_JSON_DEPTH, dumps, loads

from .conftest import SPECS

BOUND_S = 30.0
"""Generous wall-clock bound per call: far above the milliseconds a refusal takes, far below a hang."""

SMALL = "network small\ninput 1x8x8\nclasses 2\nc: conv2d(4, 3, pad=1) relu\nf: linear(classes)\n"


def bounded(fn, *args, seconds: float = BOUND_S, **kwargs):
    """``fn(*args)`` in a daemon thread; fail (not hang) when it has not returned after ``seconds``."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def unblock_fifos_after(paths, seconds: float = BOUND_S + 1) -> None:
    """Open each FIFO's write end after ``seconds`` (a reader that blocked in open() then sees EOF)."""

    def opener():
        time.sleep(seconds)
        for p in paths:
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    threading.Thread(target=opener, daemon=True).start()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err, err
    return lines[0]


# ---- non-regular and oversized files as specs, extends targets, IR and prototxt ---------------------------


def make_hostile(kind: str, path: Path) -> None:
    """A file at ``path`` of the given hostile kind."""
    if kind == "fifo":
        os.mkfifo(path)
        unblock_fifos_after([path])
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    elif kind == "oversized":
        with open(path, "wb") as f:  # sparse: no disk used
            f.truncate(MAX_TEXT_BYTES + 1)
    elif kind == "self-link":
        path.symlink_to(path.name)
    elif kind == "missing":
        pass
    else:
        raise AssertionError(kind)


HOSTILE_KINDS = ("fifo", "dev-zero", "folder", "oversized", "self-link", "missing")
ROLES = ("spec", "extends", "ir", "prototxt")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_text_inputs_are_one_line(kind, role, tmp_path, capsys):
    suffix = {"spec": ".cnds", "extends": ".cnds", "ir": ".json", "prototxt": ".prototxt"}[role]
    hostile = tmp_path / f"hostile{suffix}"
    make_hostile(kind, hostile)
    if role == "prototxt":
        from cnds_compiler.importers.cli import import_main

        start = time.monotonic()
        code = bounded(import_main, [str(hostile), "-o", str(tmp_path / "out.cnds")])
        named, line = str(hostile), one_line(capsys.readouterr().err)
        assert not (tmp_path / "out.cnds").exists()
    else:
        target = hostile
        if role == "extends":
            target = tmp_path / "derived.cnds"
            target.write_text(f'network derived\nextends "{hostile.name}"\n')
        start = time.monotonic()
        code = bounded(compile_main, [str(target)])
        line = one_line(capsys.readouterr().err)
        named = f"{target}:2:1" if role == "extends" else str(hostile)
    assert time.monotonic() - start < BOUND_S
    assert code == 1 and line.startswith(named), line
    words = {"fifo": "fifo", "dev-zero": "character device", "folder": "folder", "oversized": "over the limit",
             "self-link": "loop", "missing": "no such"}[kind]
    assert words in line.lower(), line


def test_a_spec_at_the_size_limit_is_still_read(tmp_path):
    spec = tmp_path / "padded.cnds"
    spec.write_text(SMALL + "#" * (MAX_TEXT_BYTES - len(SMALL) - 1) + "\n")
    assert parse_file(spec).path == str(spec)


# ---- repetitions whose total exceeds the limit --------------------------------------------------------


def _ranges(rng: random.Random, total: int) -> list[tuple[int, int]]:
    """Disjoint ascending ranges, each within the per-range limit, adding up to ``total`` layers."""
    out, start = [], rng.randint(0, 5)
    while total > 0:
        n = min(total, rng.randint(1, MAX_REPEAT))
        out.append((start, start + n - 1))
        start += n + rng.randint(1, 3)
        total -= n
    return out


REPEAT_TOTALS = [MAX_REPEAT + 1, MAX_REPEAT + 7, 2 * MAX_REPEAT, 5 * MAX_REPEAT + 3] + [
    random.Random(k).randint(MAX_REPEAT + 1, 50 * MAX_REPEAT) for k in range(12)
]


@pytest.mark.parametrize("total", REPEAT_TOTALS)
def test_repetition_total_over_a_label_is_one_error_at_the_label(total, tmp_path):
    rng = random.Random(total)
    items = ",".join(f"{a}..{b}" if a != b else str(a) for a, b in _ranges(rng, total))
    dotted = rng.random() < 0.5
    label = f"c.{{{items}}}" if dotted else f"c_{{{items}}}"
    spec = tmp_path / "rep.cnds"
    spec.write_text(f"network rep\ninput 1x8x8\nclasses 2\n{label}: relu\nf: linear(classes)\n")
    with pytest.raises(SpecSyntaxError) as e:
        bounded(compile_spec, spec)
    assert (e.value.line, e.value.column) == (4, 2 if dotted else 3)  # the repetition after the name
    assert f"makes {total:,} layers, more than {MAX_REPEAT}" in e.value.message


@pytest.mark.parametrize("total", [MAX_REPEAT, 999, 500])
def test_repetition_totals_within_the_limit_compile(total, tmp_path):
    rng = random.Random(total)
    items = ",".join(f"{a}..{b}" if a != b else str(a) for a, b in _ranges(rng, total))
    spec = tmp_path / "rep.cnds"
    spec.write_text(f"network rep\ninput 1x8x8\nclasses 2\nc_{{{items}}}: relu\nf: linear(classes)\n")
    net = bounded(compile_spec, spec)
    assert sum(1 for st in net.statements if st.name.startswith("c_")) == total


@pytest.mark.parametrize("outer,inner", [(60, 60), (200, 30), (11, 500), (1000, 6), (75, 75)])
def test_repetition_times_block_expansion_is_one_error_at_the_spec_statement(outer, inner, tmp_path, monkeypatch):
    """A repeated statement whose graph block itself repeats multiplies the node count: the limit is
    checked as nodes are made and the error points at the spec's statement (the block's line as a note)."""
    import sys

    monkeypatch.setattr(sys.modules["cnds_compiler.lang.lower"], "MAX_NODES", 3000)  # the product, not the limit's size, is under test
    spec = tmp_path / "nest.cnds"
    spec.write_text(f"network nest\ninput 1x8x8\nclasses 2\nblock g() {{ x_{{1..{inner}}}: relu\n  out: relu }}\n"
                    f"a_{{1..{outer}}}: g()\nf: linear(classes)\n")
    with pytest.raises(ArgumentError) as e:
        bounded(compile_spec, spec)
    assert (e.value.line, e.value.column) == (6, 1)
    assert "more than 3,000 nodes" in e.value.message and e.value.notes[0][0].location().line == 4


# ---- extends chains and IR nesting against the recursion limit -----------------------------------------


def _chain(tmp_path: Path, length: int) -> Path:
    """``s0 extends s1 extends ... s<length>``; the last one is a whole spec."""
    for i in range(length):
        (tmp_path / f"s{i}.cnds").write_text(f'network s{i}\nextends "s{i + 1}.cnds"\n')
    (tmp_path / f"s{length}.cnds").write_text(SMALL)
    return tmp_path / "s0.cnds"


@pytest.mark.parametrize("length", [MAX_EXTENDS_DEPTH + 1, MAX_EXTENDS_DEPTH + 2, 100, 1500])
def test_extends_chain_past_the_depth_limit_is_one_error(length, tmp_path):
    with pytest.raises(SpecIncludeError) as e:
        bounded(compile_spec, _chain(tmp_path, length))
    assert f"deeper than {MAX_EXTENDS_DEPTH} bases" in e.value.message
    assert e.value.span.source.name.endswith(f"s{MAX_EXTENDS_DEPTH}.cnds") and e.value.line == 2


@pytest.mark.parametrize("length", [1, MAX_EXTENDS_DEPTH])
def test_extends_chain_within_the_limit_compiles(length, tmp_path):
    assert bounded(compile_spec, _chain(tmp_path, length)).num_classes == 2


def _nest(depth: int, rng: random.Random) -> str:
    opens = "".join(rng.choice(["[", '{"k":']) for _ in range(depth))
    closes = "".join("]" if c == "[" else "}" for c in reversed([c for c in opens if c in "[{"]))
    return opens + "1" + closes


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, MAX_JSON_DEPTH + 5, 1000, 5000, 200_000])
@pytest.mark.parametrize("where", ["name", "train", "node attrs"])
def test_ir_json_nested_past_the_limit_is_one_error(depth, where, tmp_path, capsys):
    doc = json.loads(dumps(compile_spec(SPECS / "digits_cnds8.cnds")))
    placeholder = "__deep__"
    if where == "name":
        doc["name"] = placeholder
    elif where == "train":
        doc["train"]["extra"] = placeholder
    else:
        doc["nodes"][1]["attrs"]["extra"] = placeholder
    path = tmp_path / "deep.json"
    path.write_text(json.dumps(doc).replace(json.dumps(placeholder), _nest(depth, random.Random(depth))))
    code = bounded(compile_main, [str(path)])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"{path}: invalid IR: ") and f"nested more than {MAX_JSON_DEPTH}" in line


def test_brackets_inside_strings_do_not_count_as_nesting():
    doc = json.loads(dumps(compile_spec(SPECS / "digits_cnds8.cnds")))
    doc["sources"][0]["text"] += "#" + "[" * 10_000 + "{" * 10_000 + "\n"
    assert loads(json.dumps(doc)).name == "digits_cnds8"


# ---- seeds outside the RNGs' range -------------------------------------------------------------------


BAD_SEEDS = ["-1", "-9223372036854775808", str(2**31), str(2**32), str(2**64), str(10**30), "1e3", "seven"]


@pytest.mark.parametrize("seed", BAD_SEEDS)
@pytest.mark.parametrize("command", ["train", "probe", "compile"])
def test_seed_flags_outside_the_range_are_usage_errors(command, seed, tmp_path, capsys):
    from cnds_compiler.probe.cli import probe_main
    from cnds_compiler.train.cli import train_main

    spec = str(SPECS / "digits_cnds8.cnds")
    main, args = {
        "train": (train_main, [spec, "--out", str(tmp_path / "run"), f"--seed={seed}"]),
        "probe": (probe_main, [spec, f"--seed={seed}", "--no-plot"]),
        "compile": (compile_main, [spec, "--emit", "onnx", "-o", str(tmp_path / "m.onnx"), f"--seed={seed}"]),
    }[command]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "argument --seed:" in err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("seed", [2**31, 2**32, 2**64, 10**30])
def test_spec_and_ir_seeds_outside_the_range_are_refused(seed, tmp_path):
    spec = tmp_path / "s.cnds"
    spec.write_text(SMALL + f"train {{ seed {seed} }}\n")
    with pytest.raises(ArgumentError) as e:
        compile_spec(spec)
    assert (e.value.line, e.value.column) == (6, 14) and "seed must be <= 2147483647" in e.value.message
    doc = json.loads(dumps(compile_spec(SPECS / "digits_cnds8.cnds")))
    doc["train"]["seed"] = seed
    with pytest.raises(IRFormatError, match=r"train\.seed|train/seed|seed"):
        loads(json.dumps(doc), "x.json")


# ---- memory: refused with the figure and the budget before anything is allocated -----------------------


WIDE = "network wide\ninput 3x64x64\nclasses 10\nfc1: linear({width})\nfc2: linear(classes)\n"


@pytest.mark.parametrize("width", [1 << 16, 1 << 20, 1 << 24, 10**9])
def test_parameters_over_the_budget_refused_before_building(width, tmp_path, capsys):
    from cnds_compiler.backends.pytorch import build_module
    from cnds_compiler.memory import parameter_count

    spec = tmp_path / "wide.cnds"
    spec.write_text(WIDE.format(width=width))
    net = compile_spec(spec)
    need = parameter_count(net) * 4
    with pytest.raises(MemoryBudgetError) as e:  # one byte short
        bounded(build_module, net, memory_budget=need - 1)
    assert e.value.path == str(spec) and f"({parameter_count(net):,})" in e.value.message
    code = bounded(compile_main, [str(spec), "--emit", "onnx", "-o", str(tmp_path / "w.onnx"),
                                  "--memory-budget", str(need / 2 / 1024**3)])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"{spec}: too large: needs about ") and "--memory-budget" in line
    assert not (tmp_path / "w.onnx").exists()


def test_parameter_estimate_is_the_modules_real_count():
    from cnds_compiler.backends.pytorch import build_module
    from cnds_compiler.memory import parameter_count

    for name in ("digits_cnds8", "digits_inception", "digits_resnet"):
        net = compile_spec(SPECS / f"{name}.cnds")
        assert parameter_count(net) == sum(p.numel() for p in build_module(net).parameters())


def test_activation_estimate_counts_every_saved_output():
    """The activation part is the sum of the real forward outputs' sizes (a hook on every module)."""
    import torch

    from cnds_compiler.backends.pytorch import build_module
    from cnds_compiler.memory import training_estimate

    net = compile_spec(SPECS / "digits_cnds8.cnds")
    est = training_estimate(net, 5, "sgd", 0.9)
    model = build_module(net)
    by_node = {n.name: n.out_shape.numel for n in net.nodes}
    seen = {}
    for name, module in model.named_modules():
        node = name.removeprefix("aux.")
        if node in by_node:
            module.register_forward_hook(lambda m, i, o, node=node: seen.__setitem__(node, o[0].numel()))
    model.train()
    model(torch.zeros(5, 1, 8, 8))
    assert seen and all(by_node[k] == v for k, v in seen.items())
    assert est.activation_bytes == 4 * 5 * sum(by_node.values())
    assert est.grad_bytes == est.param_bytes == est.optimizer_bytes  # SGD with momentum: one buffer


@pytest.mark.parametrize("batch,budget_mib", [(64, 1), (32, 2), (256, 8), (16, 0.5)])
def test_training_over_the_budget_refused_before_any_file(batch, budget_mib, tmp_path, capsys):
    from cnds_compiler.memory import training_estimate
    from cnds_compiler.train.cli import train_main

    spec = SPECS / "digits_cnds8.cnds"
    need = training_estimate(compile_spec(spec), batch, "sgd", 0.9).total
    assert need > budget_mib * 2**20  # the generated case is really over
    out = tmp_path / "run"
    code = bounded(train_main, [str(spec), "--out", str(out), "--batch-size", str(batch),
                                "--memory-budget", str(budget_mib / 1024), "--no-progress"])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"{spec}: too large: needs about ")
    assert f"activations for a batch of {batch}" in line and "(--memory-budget)" in line
    assert not out.exists()  # the run folder this refused command created is not left behind, empty


def test_a_refused_run_keeps_a_run_folder_it_did_not_create(tmp_path, capsys):
    from cnds_compiler.train.cli import train_main

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = bounded(train_main, [str(SPECS / "digits_cnds8.cnds"), "--out", str(out), "--batch-size", "64",
                                "--memory-budget", str(1 / 1024), "--no-progress"])
    assert code == 1 and "too large" in one_line(capsys.readouterr().err)
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]



@pytest.mark.parametrize("args,message", [
    (["--val-split", "0.9999"], "leaves no training sample"),
    (["--val-split", "0.00001"], "leaves no validation sample"),
    (["--limit-train", "1"], "fewer than one batch"),
    (["--prefetch", "2"], "--prefetch needs loader worker processes"),
    (["--data", "imagefolder:/nonexistent/cnds"], "/nonexistent/cnds"),
], ids=["split-all", "split-none", "tiny-train", "prefetch-no-workers", "missing-folder"])
def test_a_refused_run_leaves_no_run_folder(args, message, tmp_path, capsys):
    """Every check that can refuse a run comes before its first write, so the folder it made is removed."""
    from cnds_compiler.train.cli import train_main

    out = tmp_path / "new" / "run"
    argv = [str(SPECS / "digits_cnds8.cnds"), "--data", "digits", "--out", str(out), "--epochs", "1", "--no-progress"]
    code = bounded(train_main, argv + args)
    line = one_line(capsys.readouterr().err)
    assert code == 1 and message in line
    assert not out.exists()

@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_memory_budget_must_be_positive(value, tmp_path, capsys):
    from cnds_compiler.train.cli import train_main

    with pytest.raises(SystemExit) as e:  # a usage error, before anything runs
        train_main([str(SPECS / "digits_cnds8.cnds"), "--out", str(tmp_path / "r"), f"--memory-budget={value}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "--memory-budget: must be a positive number of GiB" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "lots"])
def test_memory_budget_from_the_environment_must_be_positive(value, tmp_path, capsys, monkeypatch):
    from cnds_compiler.train.cli import train_main

    monkeypatch.setenv("CNDS_MEMORY_BUDGET_GIB", value)
    code = train_main([str(SPECS / "digits_cnds8.cnds"), "--out", str(tmp_path / "r"), "--no-progress"])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "bad argument: CNDS_MEMORY_BUDGET_GIB must be a positive number of GiB" in line
    assert not (tmp_path / "r").exists()


# ---- images: folders with loops, FIFOs and devices named like images, decompression bombs ------------------


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` (a bomb's header: a few dozen bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def make_bad_image(kind: str, path: Path, rng: random.Random) -> str:
    """A file named like an image that must not be read as one; returns a word its message holds."""
    if kind == "fifo":
        os.mkfifo(path)
        unblock_fifos_after([path])
        return "FIFO"
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
        return "character device"
    if kind == "self-link":
        path.symlink_to(path.name)
        return "symlink loop"
    if kind == "broken-link":
        path.symlink_to("nowhere.png")
        return "broken symlink"
    if kind == "bomb":
        side = math.isqrt(MAX_IMAGE_PIXELS) + rng.randint(1, 200_000)
        png_header_only(path, side, side + rng.randint(0, 1000))
        return "decompression bomb"
    raise AssertionError(kind)


BAD_IMAGE_KINDS = ("fifo", "dev-zero", "self-link", "broken-link", "bomb")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from cnds_compiler.lowering.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("model")
    (d / "tiny.cnds").write_text(SMALL + 'data { mean 0.5  std 0.25 }\n')
    export_onnx(compile_spec(d / "tiny.cnds"), d / "tiny.onnx")
    return d / "tiny.onnx"


def good_image(path: Path) -> None:
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3).save(path)


def two_class_folder(tmp_path: Path):
    """``tmp_path/data/{train,val}/{a,b}/ok.png`` and the 2-class net (SMALL) that trains on it."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            good_image(root / split / cls / "ok.png")
    spec = tmp_path / "two.cnds"
    spec.write_text(SMALL)
    return root, compile_spec(spec)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("kind", BAD_IMAGE_KINDS)
def test_bad_image_files_one_line_or_skipped(kind, seed, tiny_model, tmp_path, capsys):
    bad = tmp_path / f"bad{seed}.png"
    word = make_bad_image(kind, bad, random.Random(seed))
    good = tmp_path / "good.png"
    good_image(good)
    code = bounded(predict_main, [str(tiny_model), str(bad), str(good)])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    line = one_line(captured.err)
    assert line.startswith(f"cnds-predict: error: {bad}: ") and word in line, line
    code = bounded(predict_main, [str(tiny_model), str(bad), str(good), "--skip-bad"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.startswith(f"{good}: ")
    assert captured.err.strip().splitlines() == [line.replace("error: ", "skipped ", 1)]


@pytest.mark.parametrize("kind", BAD_IMAGE_KINDS)
def test_bad_image_files_in_a_training_folder_are_unreadable_samples(kind, tmp_path):
    from cnds_compiler.data import Unreadable, load_source

    root, net = two_class_folder(tmp_path)
    bad = root / "train" / "a" / "x.png"
    word = make_bad_image(kind, bad, random.Random(1))
    splits = bounded(load_source, f"imagefolder:{root}", net)
    items = [bounded(splits.train.__getitem__, i) for i in range(len(splits.train))]
    unreadable = [x for x in items if isinstance(x, Unreadable)]
    assert [u.path for u in unreadable] == [str(bad)] and word in unreadable[0].reason


LOOPS = {
    "self": [("d/loop", ".")],
    "parent": [("d/sub/up", "..")],
    "root": [("d/sub/deeper/top", "../..")],
    "two-step": [("d/a/to_b", "../b"), ("d/b/to_a", "../a")],
    "absolute": [("d/sub/abs", None)],
}


@pytest.mark.parametrize("shape", list(LOOPS))
def test_symlink_loops_in_image_folders_are_one_error(shape, tmp_path, tiny_model, capsys):
    root = tmp_path / "d"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "b").mkdir()
    good_image(root / "sub" / "x.png")
    for link, target in LOOPS[shape]:
        (tmp_path / link).symlink_to(target if target is not None else root)
    with pytest.raises(ImageError, match="symlink loop: leads back to"):
        bounded(image_files_under, root)
    code = bounded(predict_main, [str(tiny_model), str(root), "--skip-bad"])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "symlink loop" in line
    code = bounded(extract_main, [str(tiny_model), str(root), "--layer", "logits", "--out", str(tmp_path / "f.npz")])
    assert code == 1 and "symlink loop" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "f.npz").exists()


def test_symlinked_folders_without_loops_are_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    good_image(real / "x.png")
    root = tmp_path / "d"
    (root / "c").mkdir(parents=True)
    (root / "c" / "linked").symlink_to(real)
    (root / "c" / ".hidden.png").write_bytes(b"")
    assert image_files_under(root) == [str(root / "c" / "linked" / "x.png")]
    assert expand_paths([root]) == [root / "c" / "linked" / "x.png"]


@pytest.mark.parametrize("width,height", [(10, 10), (10, 11), (1, 100), (101, 1), (7, 13)])
def test_pixel_limit_is_checked_from_the_header(width, height, tmp_path, monkeypatch):
    import cnds_runtime.preprocess as pre

    monkeypatch.setattr(pre, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "img.png"
    Image.new("L", (width, height), 7).save(path)
    if width * height <= 100:
        assert np.asarray(pre.open_image(path)).sum() == 7 * width * height
    else:
        with pytest.raises(ImageError, match=f"is {width}x{height} = {width * height:,} pixels, over the limit of 100"):
            pre.open_image(path)


# ---- family 5: the runtime refuses a model whose metadata is inconsistent --------------------------------


def _with_props(model_path: Path, out: Path, change) -> Path:
    m = onnx.load(str(model_path))
    props = {p.key: p.value for p in m.metadata_props}
    change(props)
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, props)
    onnx.save(m, str(out))
    return out


INCONSISTENT = {
    "std zero": ("cnds.std", "[0.0]", "cnds.std"),
    "std nan": ("cnds.std", "[NaN]", "cnds.std"),
    "std inf": ("cnds.std", "[Infinity]", "cnds.std"),
    "std too many": ("cnds.std", "[0.5, 0.5, 0.5]", "cnds.std"),
    "mean as text": ("cnds.mean", '"0.5"', "cnds.mean"),
    "mean too many": ("cnds.mean", "[0.1, 0.2]", "cnds.mean"),
    "mean bool": ("cnds.mean", "[true]", "cnds.mean"),
    "classes vs logits": ("cnds.num_classes", "3", "cnds.outputs"),
    "classes zero": ("cnds.num_classes", "0", "cnds.num_classes"),
    "classes float": ("cnds.num_classes", "2.0", "cnds.num_classes"),
    "class names count": ("cnds.class_names", '["a", "b", "c"]', "cnds.class_names"),
    "class names twice": ("cnds.class_names", '["a", "a"]', "cnds.class_names"),
    "class names numbers": ("cnds.class_names", "[1, 2]", "cnds.class_names"),
    "input 2-d": ("cnds.input_shape", "[8, 8]", "cnds.input_shape"),
    "input zero": ("cnds.input_shape", "[1, 0, 8]", "cnds.input_shape"),
    "input vs graph": ({"cnds.input_shape": "[1, 9, 9]", "cnds.crop": "[9, 9]", "cnds.resize": "[9, 9]"}, None,
                       "cnds.input_shape"),
    "input huge": ("cnds.input_shape", f"[1, {2**40}, 8]", "cnds.input_shape"),
    "crop vs input": ("cnds.crop", "[4, 4]", "cnds.crop"),
    "resize negative": ("cnds.resize", "[-8, 8]", "cnds.resize"),
    "resize text": ("cnds.resize", '"big"', "cnds.resize"),
    "outputs not list": ("cnds.outputs", "{}", "cnds.outputs"),
    "output shape": ("cnds.outputs", '[{"name": "logits", "layer": "f", "shape": [2, 1]}]', "cnds.outputs"),
    "output twice": ("cnds.outputs", '[{"name": "logits", "layer": "f", "shape": [2]}, '
                     '{"name": "logits", "layer": "f", "shape": [2]}]', "cnds.outputs"),
    "input name empty": ("cnds.input_name", '""', "cnds.input_name"),
    "version text": ("cnds.format_version", '"1"', "cnds.format_version"),
    "not json": ("cnds.std", "[0.5", "cnds.std"),
    "deep json": ("cnds.weights", "[" * 100_000 + "]" * 100_000, "cnds.weights"),
    "huge int": ("cnds.num_classes", "9" * 5000, "cnds.num_classes"),
    "missing classes": ("cnds.num_classes", None, "cnds.num_classes"),
    "missing outputs": ("cnds.outputs", None, "cnds.outputs"),
}


@pytest.mark.parametrize("case", list(INCONSISTENT))
def test_models_with_inconsistent_metadata_are_refused_naming_the_field(case, tiny_model, tmp_path, capsys):
    key, value, named = INCONSISTENT[case]

    def change(props):
        for k, v in (key.items() if isinstance(key, dict) else [(key, value)]):
            if v is None:
                del props[k]
            else:
                props[k] = v

    bad = _with_props(tiny_model, tmp_path / "bad.onnx", change)
    with pytest.raises(ModelError) as e:
        bounded(CndsModel, bad)
    assert e.value.path == str(bad) and named in e.value.message, e.value.message
    good = tmp_path / "good.png"
    good_image(good)
    assert predict_main([str(bad), str(good)]) == 1
    assert one_line(capsys.readouterr().err) == f"cnds-predict: error: {bad}: {e.value.message}"


def test_the_untouched_model_loads(tiny_model):
    md = CndsModel(tiny_model).metadata
    assert md.std == (0.25,) and md.mean == (0.5,) and md.logits_output.shape == (md.num_classes,)


FUZZ_CASES = 1200


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2, 3, 8, 10, 2**31, 2**63, -(2**70), 10**400])
    if kind == 3:
        return rng.choice([0.0, -0.0, 0.5, -3.5, 1e308, 1e-320, math.nan, math.inf, -math.inf])
    if kind in (4, 5):
        return rng.choice(["", "logits", "input", "a", "x" * 1000, "\u00e9\u0000", "[1]"])
    if kind in (6, 7):
        return [rng.choice([0, 1, 2, 8, 0.5, -1]) for _ in range(rng.randrange(5))]
    if kind in (8, 9):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["name", "layer", "shape", "x"]): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _mutate(props: dict[str, str], rng: random.Random) -> dict[str, str]:
    props = dict(props)
    keys = sorted(k for k in props if k != "cnds.format")
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(keys)
        action = rng.randrange(8)
        if action == 0:
            props.pop(key, None)
        elif action == 1 and key in props:
            props[key] = props[key][: rng.randrange(len(props[key]) + 1)]  # truncated JSON
        elif action == 2:
            props[key] = json.dumps(_random_json(rng), allow_nan=True)
        elif action == 3 and key in props:  # one element of a list changed, or the list resized
            try:
                value = json.loads(props[key])
            except ValueError:
                value = None
            if isinstance(value, list):
                if value and rng.random() < 0.5:
                    value[rng.randrange(len(value))] = _random_json(rng, 2)
                else:
                    value = value + value if rng.random() < 0.5 else value[:-1]
                props[key] = json.dumps(value)
        elif action == 4:
            props[key] = "[" * rng.choice([10, 100, 5000]) + "]" * rng.choice([0, 10, 5000])
        elif action == 5 and key in props:  # a number nudged
            props[key] = props[key].replace(rng.choice("0123456789"), rng.choice(["0", "-", "1e999", ""]))
        elif action == 6:
            props["cnds." + rng.choice(["extra", "new_field"])] = json.dumps(_random_json(rng))
        else:
            props[key] = rng.choice(["", "null", "NaN", "{}", "[]", "\"\"", "true", "-0"])
    return props


def _invariants_hold(md: ModelMetadata) -> None:
    """What the runtime relies on, for metadata it accepted."""
    c, h, w = md.input_shape
    assert all(isinstance(d, int) and d >= 1 for d in md.input_shape)
    for values in (md.mean, md.std):
        assert len(values) in (0, c) and all(math.isfinite(v) for v in values)
    assert all(v != 0 for v in md.std)
    assert not md.class_names or len(md.class_names) == md.num_classes == len(set(md.class_names))
    if md.logits_output is not None:
        assert md.logits_output.shape == (md.num_classes,)
    assert md.resize is None or isinstance(md.resize, int) or len(md.resize) == 2


def test_metadata_reader_fuzz_only_model_errors_escape(tiny_model):
    """1,200 mutations of a real export's metadata (seeded): each is accepted with every invariant the
    runtime relies on holding, or refused with a ModelError naming the model; nothing else escapes."""
    real = {p.key: p.value for p in onnx.load(str(tiny_model)).metadata_props}
    rng = random.Random(12)
    outcomes = {"accepted": 0, "refused": 0}

    def run_all():
        for _ in range(FUZZ_CASES):
            props = _mutate(real, rng)
            try:
                md = ModelMetadata.from_props(props, "fuzz.onnx")
            except ModelError as e:
                assert e.path == "fuzz.onnx" and "\n" not in str(e)
                outcomes["refused"] += 1
                continue
            _invariants_hold(md)
            outcomes["accepted"] += 1

    bounded(run_all, seconds=120)
    assert outcomes["refused"] + outcomes["accepted"] == FUZZ_CASES
    assert outcomes["refused"] > FUZZ_CASES // 2 and outcomes["accepted"] > 0  # both sides really exercised


def test_metadata_fuzz_through_real_model_files(tiny_model, tmp_path):
    """A sample of the same mutations written into real ONNX files and loaded by CndsModel."""
    real = {p.key: p.value for p in onnx.load(str(tiny_model)).metadata_props}
    rng = random.Random(5)
    refused = 0
    for i in range(40):
        props = _mutate(real, rng)
        path = _with_props(tiny_model, tmp_path / f"m{i}.onnx", lambda p, props=props: (p.clear(), p.update(props)))
        try:
            model = bounded(CndsModel, path)
        except ModelError as e:
            assert e.path == str(path)
            refused += 1
            continue
        _invariants_hold(model.metadata)
    assert refused > 0


@pytest.mark.parametrize("shape", ["parent", "root"])
def test_symlink_loop_in_a_training_folder_is_one_data_error(shape, tmp_path):
    from cnds_compiler.data import load_source

    root, net = two_class_folder(tmp_path)
    link = root / "train" / "b" / "again"
    link.symlink_to(".." if shape == "parent" else root)
    with pytest.raises(DataError, match="symlink loop: leads back to") as e:
        bounded(load_source, f"imagefolder:{root}", net)
    assert e.value.path == str(link)
