"""``cnds-compile``, driven in-process (``CompileCLI(args).run()`` / ``compile_main(args)``) as xdsl-opt's
tests do, plus a few subprocess runs for what only a fresh interpreter shows: exit codes, no traceback,
and that checking a spec never imports torch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest

from cnds_compiler.cli import CompileCLI, compile_main
from cnds_compiler.errors import CndsError, ShapeError, SupervisionError
from cnds_compiler.passes import DEFAULT_PIPELINE, get_all_passes
from cnds_compiler.serialize import schema

from .conftest import ROOT, SPECS, run_reader_gone

DIGITS = SPECS / "digits_cnds8.cnds"

# Two supervision branches, so the diagram must draw two dashed red clusters.
TWO_BRANCHES = """\
network two
input 1x16x16
classes 4
block conv(c) = conv2d(c, 3, pad=1) relu
conv1: conv(8)
pool1: maxpool(2)
conv2: conv(16)
pool2: maxpool(2)
conv3: conv(16)
fc4: linear(classes)
supervise conv1 weight 0.2 {
  pool: avgpool(4)
  fc: linear(classes)
}
supervise conv2 loss hinge weight 0.3 decay none {
  fc: linear(classes)
}
"""

# The 3x3 kernel on line 4 cannot apply to a 2x2 map.
BAD = "network bad\ninput 1x2x2\nclasses 2\nc: conv2d(4, 3)\nf: linear(2)\n"


@pytest.fixture
def write(tmp_path):
    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = compile_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ---- success: the summary ---------------------------------------------------------------------------


def test_summary_on_stdout(capsys):
    code, out, err = run_cli(capsys, DIGITS)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"network digits_cnds8: input 1x8x8, 10 classes  ({DIGITS})"
    rows = {line.split()[0]: line for line in lines if re.match(r"^\*? *\w", line) and len(line.split()) > 3}
    assert re.search(r"conv2d 16 3x3 p1 \+ relu +1x8x8 +16x8x8 +160 ", rows["conv1"])
    assert re.search(r"64x2x2 +64x1x1 ", rows["pool5"])
    assert any(line.startswith("-- branch 'conv3_2' on conv3_2 (softmax loss") for line in lines)
    assert "* classifier" in out


def test_class_is_constructible_from_an_argument_list(capsys):
    cli = CompileCLI([str(DIGITS), "-q"])
    assert cli.args.spec == str(DIGITS) and cli.args.quiet
    assert cli.run() == 0
    assert capsys.readouterr() == ("", "")


# ---- errors -----------------------------------------------------------------------------------------


def test_bad_spec_exit_1_headline_and_caret(capsys, write):
    bad = write("bad.cnds", BAD)
    code, out, err = run_cli(capsys, bad)
    assert code == 1 and out == ""
    lines = err.rstrip("\n").split("\n")
    assert lines[0] == f"{bad}:4:4: shape error: c: 3x3 kernel does not fit the 2x2 input (pad 0)"
    assert lines[1] == "   4 | c: conv2d(4, 3)"
    assert lines[2] == "     |    ^^^^^^^^^^^^"
    assert "Traceback" not in err


def test_hint_is_printed(capsys, write):
    bad = write("typo.cnds", BAD.replace("c: conv2d(4, 3)", "c: cnov2d(4, 3)"))
    code, _, err = run_cli(capsys, bad)
    assert code == 1
    assert err.startswith(f"{bad}:4:4: unknown name: unknown op or block 'cnov2d'")
    assert err.rstrip().endswith("hint: did you mean 'conv2d'?")


def test_traceback_flag_reraises(write):
    bad = write("bad.cnds", BAD)
    with pytest.raises(ShapeError) as info:
        compile_main([str(bad), "--traceback"])
    assert (info.value.line, info.value.column) == (4, 4)


def test_missing_spec_file_is_one_line_naming_the_path(capsys, tmp_path):
    missing = tmp_path / "nowhere" / "missing.cnds"
    code, out, err = run_cli(capsys, missing)
    assert code == 1 and out == ""
    assert err == f"{missing}: error: no such spec file\n"


def test_missing_ir_file_is_one_line_naming_the_path(capsys, tmp_path):
    missing = tmp_path / "missing.json"
    code, _, err = run_cli(capsys, missing)
    assert code == 1
    assert err.startswith(f"{missing}: invalid IR: no such IR file") and err.count("\n") == 1


def test_bad_spec_in_a_subprocess_has_no_traceback(write):
    bad = write("bad.cnds", BAD)
    r = subprocess.run([sys.executable, "-m", "cnds_compiler.cli", str(bad)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"{bad}:4:4: shape error: ")
    assert "^^^^" in r.stderr and "Traceback" not in r.stderr


# ---- --emit ir and reading IR back -----------------------------------------------------------------


def test_emit_ir_writes_schema_valid_json_that_reads_back(capsys, tmp_path):
    out_file = tmp_path / "x.json"
    code, out, err = run_cli(capsys, DIGITS, "--emit", "ir", "-o", out_file)
    assert code == 0 and err == "" and out == f"wrote {out_file}\n"
    doc = json.loads(out_file.read_text())
    jsonschema.Draft202012Validator(schema()).validate(doc)
    assert doc["name"] == "digits_cnds8" and [h["tap"] for h in doc["heads"][1:]] == ["conv3_2_relu"]

    code, from_ir, err = run_cli(capsys, out_file)
    assert code == 0 and err == ""
    _, from_spec, _ = run_cli(capsys, DIGITS)
    # the same table; only the path in the title differs
    assert from_ir.splitlines()[1:] == from_spec.splitlines()[1:]
    assert str(out_file) in from_ir.splitlines()[0]


def test_emit_ir_to_stdout_is_json(capsys):
    code, out, _ = run_cli(capsys, DIGITS, "--emit", "ir")
    assert code == 0 and json.loads(out)["ir_version"] == 2


def test_broken_ir_file_is_reported(capsys, tmp_path):
    path = tmp_path / "broken.json"
    doc = json.loads(compile_main_ir(capsys))
    doc["nodes"][1]["kind"] = "conv3d"
    path.write_text(json.dumps(doc))
    code, _, err = run_cli(capsys, path)
    assert code == 1
    assert err.startswith(f"{path}: invalid IR: 1 schema violation(s): $.nodes[1].kind: 'conv3d'")


def compile_main_ir(capsys) -> str:
    assert compile_main([str(DIGITS), "--emit", "ir"]) == 0
    return capsys.readouterr().out


# ---- --emit dot ------------------------------------------------------------------------------------


def test_dot_has_a_dashed_red_cluster_per_branch(capsys, write):
    spec = write("two.cnds", TWO_BRANCHES)
    code, dot, _ = run_cli(capsys, spec, "--emit", "dot")
    assert code == 0
    clusters = re.findall(r"subgraph cluster_(\w+) \{(.*?)\n  \}", dot, re.S)
    assert [name for name, _ in clusters] == ["conv1", "conv2"]
    for name, body in clusters:
        assert "style=dashed; color=red;" in body
        assert f"t_{name} -> b_{name}_" in dot and f"t_{name} " not in body  # hangs off its tap, drawn outside
    assert "supervision branch on conv2 (hinge, α₀=0.3)" in dot
    assert dot.count("subgraph cluster_") == 2 and dot.rstrip().endswith("}")


def test_dot_without_branches_has_no_cluster(capsys):
    code, dot, _ = run_cli(capsys, SPECS / "digits_cnn8.cnds", "--emit", "dot")
    assert code == 0 and "digraph" in dot and "cluster" not in dot


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not on PATH (apt-get install graphviz)")
def test_dot_renders_svg(capsys, tmp_path):
    svg = tmp_path / "net.svg"
    code, out, err = run_cli(capsys, DIGITS, "--emit", "dot", "-o", svg)
    assert code == 0 and out == f"wrote {svg}\n", err
    text = svg.read_text()
    assert "<svg" in text and "conv3_2" in text and "supervision branch on conv3_2" in text
    assert not list(tmp_path.glob(".*.tmp"))
    png = tmp_path / "net.PNG"  # an upper-case extension is still an image (it was written as Graphviz text)
    code, out, err = run_cli(capsys, DIGITS, "--emit", "dot", "-o", png)
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG", err


# ---- passes: -p, --time-passes ---------------------------------------------------------------------


def _timed_passes(err: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^ *([\w-]+): +[0-9.]+ ms$", err, re.M)]


def test_time_passes_lists_every_pass(capsys):
    code, _, err = run_cli(capsys, DIGITS, "--time-passes")
    assert code == 0
    assert _timed_passes(err) == ["lower", *DEFAULT_PIPELINE]
    assert set(get_all_passes()) - set(DEFAULT_PIPELINE) == {"prune"}  # prune runs on request (deploy)


def test_time_passes_on_ir_input_times_the_read(capsys, tmp_path):
    ir = tmp_path / "x.json"
    assert compile_main([str(DIGITS), "--emit", "ir", "-o", str(ir), "-q"]) == 0
    code, _, err = run_cli(capsys, ir, "--time-passes", "-q")
    assert code == 0 and _timed_passes(err) == ["read-ir", *DEFAULT_PIPELINE]


def test_pass_subset_runs_only_those(capsys, write):
    # a branch on fc2 (after the last conv) is found by check-supervision, which this subset leaves out
    spec = write("late.cnds", "network late\ninput 1x8x8\nclasses 2\nconv1: conv2d(4, 3) relu\nfc2: linear(8) relu\n"
                 "fc3: linear(classes)\nsupervise fc2 {\n  fc: linear(classes)\n}\n")
    code, out, err = run_cli(capsys, spec, "-p", "verify,infer-shapes", "--time-passes")
    assert code == 0, err
    assert _timed_passes(err) == ["lower", "verify", "infer-shapes"]  # the lowering stage is timed too
    assert out == "late: checked (3 layers, 1 branches)\n"
    with pytest.raises(SupervisionError) as info:
        compile_main([str(spec), "--traceback"])
    assert (info.value.line, info.value.column) == (7, 11)


def test_print_between_passes(capsys):
    code, out, _ = run_cli(capsys, DIGITS, "-p", "verify,infer-shapes", "--print-between-passes")
    assert code == 0
    assert re.findall(r"^// ---- IR after ([\w-]+) ----$", out, re.M) == ["lower", "verify", "infer-shapes"]
    after_verify = out.split("// ---- IR after infer-shapes ----")[0].split("// ---- IR after verify ----")[1]
    after_verify = after_verify.split("\n", 1)[1]
    assert json.loads(after_verify)["nodes"][1]["out_shape"] is None


@pytest.mark.parametrize(
    "passes, message",
    [
        ("verify,nope", r"unknown pass 'nope' \(passes: verify, check-supervision, infer-shapes, count-costs, prune\)"),
        ("count-costs", r"pass 'count-costs' needs 'infer-shapes' to run before it"),
        ("infer-shapes", r"pass 'infer-shapes' needs 'verify' to run before it"),
    ],
)
def test_bad_pass_list_is_a_usage_error(capsys, passes, message):
    with pytest.raises(SystemExit) as info:
        compile_main([str(DIGITS), "-p", passes])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: cnds-compile")
    assert re.search(r"cnds-compile: error: " + message, err), err
    assert "Traceback" not in err


def test_usage_error_exit_code_in_a_subprocess():
    r = subprocess.run([sys.executable, "-m", "cnds_compiler.cli", str(DIGITS), "-p", "nope"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown pass 'nope'" in r.stderr and "Traceback" not in r.stderr


# ---- checking never imports torch ------------------------------------------------------------------

NO_TORCH = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None  # any `import torch` from here on raises ImportError
    from cnds_compiler.cli import compile_main
    from cnds_compiler import compile_spec

    spec, out = sys.argv[1], sys.argv[2]
    net = compile_spec(spec)
    assert net.shapes_known
    assert compile_main([spec, "-q"]) == 0
    assert compile_main([spec]) == 0
    assert compile_main([spec, "--emit", "ir", "-o", out + "/x.json"]) == 0
    assert compile_main([out + "/x.json", "-q"]) == 0
    assert compile_main([spec, "--emit", "dot", "-o", out + "/x.dot"]) == 0
    assert json.load(open(out + "/x.json"))["name"] == net.name
    assert "subgraph cluster_" in open(out + "/x.dot").read()
    assert sys.modules["torch"] is None
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx", "onnxruntime"))
    assert loaded == ["torch"], loaded
    print("NO-TORCH-OK")
    """
)


def test_checking_never_imports_torch(tmp_path):
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(DIGITS), str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("NO-TORCH-OK")
    assert "network digits_cnds8" in r.stdout


@pytest.mark.skipif(shutil.which("cnds-compile") is None, reason="the cnds-compile console script is not installed")
def test_console_script(tmp_path):
    r = subprocess.run(["cnds-compile", str(DIGITS), "--emit", "ir", "-o", str(tmp_path / "x.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["cnds-compile", str(tmp_path / "x.json"), "-q"], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_output_over_an_input_is_refused_before_any_work(capsys, tmp_path):
    spec = tmp_path / "net.cnds"
    spec.write_text(DIGITS.read_text())
    before = spec.read_bytes()
    code, _, err = run_cli(capsys, spec, "--emit", "ir", "-o", spec)
    assert code == 1 and "-o would overwrite the spec" in err and spec.read_bytes() == before
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not really a checkpoint, and it must stay as it is")
    code, _, err = run_cli(capsys, spec, "--emit", "onnx", "--weights", weights, "-o", weights)
    assert code == 1 and "-o would overwrite --weights" in err and weights.read_bytes().startswith(b"not really")


def test_output_to_a_reader_that_left_ends_quietly_with_the_sigpipe_code():
    """``cnds-compile … | head``: once head exits, the next write fails; the command stops as a Unix tool
    would (128 + SIGPIPE), without a traceback or "Exception ignored" at exit."""
    code, _, err = run_reader_gone([sys.executable, "-m", "cnds_compiler.cli", str(SPECS / "googlenet_cnds.cnds"),
                                    "--emit", "ir"], cwd=ROOT)
    assert (code, err) == (141, "")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_output_that_cannot_be_written_is_one_line_not_a_traceback():
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "cnds_compiler.cli", str(DIGITS), "--emit", "ir"], stdout=full,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert (r.returncode, r.stderr) == (1, "cnds-compile: error: cannot write the output (No space left on device)\n")


def test_a_stdout_that_cannot_encode_a_character_gets_it_escaped():
    """``PYTHONIOENCODING=ascii`` (or a latin-1 terminal): the summary's α₀ is written escaped, as Python
    writes stderr, not a UnicodeEncodeError traceback."""
    import os

    r = subprocess.run([sys.executable, "-m", "cnds_compiler.cli", str(DIGITS)], capture_output=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONIOENCODING="ascii"))
    assert r.returncode == 0 and b"\\u03b1\\u2080=0.3" in r.stdout and r.stderr == b""


def test_a_byte_order_mark_is_not_text_and_a_non_utf8_byte_is_placed(tmp_path):
    from cnds_compiler import compile_spec

    bom = tmp_path / "bom.cnds"
    bom.write_bytes(b"\xef\xbb\xbf" + DIGITS.read_bytes())  # as Windows editors save UTF-8
    assert compile_spec(bom).digest() == compile_spec(DIGITS).digest()
    latin = tmp_path / "latin.cnds"
    latin.write_bytes(DIGITS.read_bytes().replace(b"conv2: conv(32)", b"conv2: conv(32) # caf\xe9"))
    with pytest.raises(CndsError) as e:
        compile_spec(latin)
    assert e.value.render() == (f"{latin}: error: cannot read spec file: not UTF-8 text (line 13, column 22: "
                                "byte 0xe9; save it as UTF-8)")
