"""Golden IR files: the checked IR of a few shipped specs, compared as JSON text.

A golden file is ``to_json_dict(net, include_sources=False)``: every node, shape, cost and setting, and
spans as (file index, start, end) offsets, without file names or texts, so it is the same from any
working directory. After an intended change, regenerate and review the diff:

    CNDS_ACCEPT=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import difflib
import json
import os

import pytest

from cnds_compiler import compile_spec
from cnds_compiler.ir import Network
from cnds_compiler.serialize import to_json_dict

from .conftest import ROOT, SPECS

GOLDEN = ROOT / "tests" / "golden"
GOLDEN_SPECS = ("places_cnds8", "imagenet_cnds13", "fmnist_cnds8", "digits_cnds8", "imagenet_cnn5")
ACCEPT = os.environ.get("CNDS_ACCEPT") == "1"


def _format(value, indent: int = 0) -> str:
    """JSON with one key per line, but lists of plain values (shapes, spans, strides) on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_format(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _format(v, indent + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value, ensure_ascii=False)


def render(net: Network) -> str:
    return _format(to_json_dict(net, include_sources=False)) + "\n"


def accept_command(stem: str) -> str:
    return f'CNDS_ACCEPT=1 python -m pytest "tests/test_golden.py::test_ir_matches_golden[{stem}]"'


@pytest.mark.parametrize("stem", GOLDEN_SPECS)
def test_ir_matches_golden(stem: str):
    actual = render(compile_spec(SPECS / f"{stem}.cnds"))
    golden = GOLDEN / f"{stem}.ir.json"
    if ACCEPT:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual, encoding="utf-8")
        return
    if not golden.exists():
        pytest.fail(f"no golden file {golden.relative_to(ROOT)}; create it (then review it) with\n  "
                    + accept_command(stem), pytrace=False)
    expected = golden.read_text(encoding="utf-8")
    if actual != expected:
        diff = list(difflib.unified_diff(expected.splitlines(), actual.splitlines(), "golden", "now", lineterm="", n=3))
        shown = "\n".join(diff[:60]) + (f"\n... ({len(diff) - 60} more diff lines)" if len(diff) > 60 else "")
        pytest.fail(f"IR of specs/{stem}.cnds differs from {golden.relative_to(ROOT)}:\n{shown}\n"
                    f"if the change is intended, regenerate with\n  {accept_command(stem)}", pytrace=False)


def test_rendering_is_independent_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    relative = render(compile_spec("specs/places_cnds8.cnds"))
    monkeypatch.chdir(tmp_path)
    absolute = render(compile_spec(SPECS / "places_cnds8.cnds"))
    assert relative == absolute
    assert str(ROOT) not in absolute and "places_cnds8.cnds" not in absolute


def test_no_stale_golden_files():
    stale = sorted(p.name for p in GOLDEN.glob("*.ir.json") if p.name.removesuffix(".ir.json") not in GOLDEN_SPECS)
    assert not stale, f"golden files without a spec in GOLDEN_SPECS: {stale}"
