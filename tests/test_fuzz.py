"""Property-based robustness of the frontend: a damaged spec or IR file gives a CndsError, never a crash.

Every shipped spec (``specs/*.cnds``, read at test time) is mutated by hypothesis: lines deleted,
duplicated or swapped, tokens deleted or replaced, tokens of the language (and garbage) inserted, numbers
replaced by wrong ones (0, -1, huge, floats where integers go). ``compile_text`` must then either return
a checked network or raise a :class:`CndsError` whose rendering points into the text it was given. The
IR reader gets the same treatment: a mutated IR JSON document loads or raises :class:`IRFormatError`.

The runs are derandomized and use no example database, so CI sees the same ~3,600 cases every time.
Failures found while writing this file are pinned as regression cases in ``test_errors.py``.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnds_compiler.errors import CndsError, IRFormatError
from cnds_compiler.frontend import compile_spec, compile_text
from cnds_compiler.passes import DEFAULT_PIPELINE, PassPipeline
from cnds_compiler.serialize import dumps, loads

from .conftest import SPECS, shipped_specs

# Mutations often leave a value unused: the warning is expected here, the errors are what is checked.
pytestmark = pytest.mark.filterwarnings("ignore::cnds_compiler.errors.SpecWarning")

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@cache
def _specs() -> tuple[tuple[str, str], ...]:
    """(file name, text) of every shipped spec, read once per session."""
    found = tuple((p.name, p.read_text(encoding="utf-8")) for p in shipped_specs())
    assert found, f"no specs found in {SPECS}"
    return found


def test_there_are_specs_to_fuzz():
    names = [name for name, _ in _specs()]
    assert "places_cnds8.cnds" in names and len(names) >= 3


# ---- the vocabulary mutations draw from ------------------------------------------------------------

KEYWORDS = ["network", "extends", "input", "classes", "init", "pooling", "block", "supervise",
            "unsupervise", "train", "data", "loss", "weight", "decay"]
OPS = ["conv2d", "maxpool", "avgpool", "relu", "dropout", "lrn", "batchnorm", "gap", "linear", "conv", "fc",
       "cnov2d", "conv2d(", "linear(classes)", "maxpool(2)", "conv2d(8, 3)", "relu(1)"]
WORDS = ["optimizer", "lr", "lr_policy", "epochs", "batch", "momentum", "weight_decay", "seed", "mean", "std",
         "mirror", "resize", "ceil", "floor", "sgd", "adam", "softmax", "hinge", "none", "true", "false",
         "step(0.1, every=2)", "multistep(milestones=[])", "cosine", "gaussian", "kaiming", "xavier", "classes",
         "stride=", "pad=", "groups=3", "dilation=0", "bias=none", "round=", "p=", "k=", "c", "n", "s",
         "conv1", "conv3_2", "fc8", "pool5", "conv1_relu", "__channels__", "x_{1..3}:", "y_{3..1}:",
         "z_{1..100000}:", "w_{1,1}:"]
PUNCTUATION = ["(", ")", "{", "}", "[", "]", ",", ":", "=", "..", "-", "+", "*", "/", "#", '"', "\n", "\\\n",
               "\n}\n", "{\n", "\n\n"]
NUMBERS = ["0", "-1", "1", "2", "3", "7", "0.5", "2.5", "1e400", "1e-400", ".5", "1.", "1x1x1", "0x8x8",
           "3x227x227", "99999999999999999999", "1" + "0" * 400, "9" * 5000, "-" * 300 + "1",
           "1" + "+1" * 400]
STRINGS = ['"digits_cnds8.cnds"', '"places_cnds8.cnds"', '"missing.cnds"', '""', '"."', '"a\x00b"', '"t"']
GARBAGE = ["@", "$", "!", "?", ";", "\t", "\x00", "\r", "\r\n", "\u2603", "\u00e9", "\u0663", "\u00b2", "\ufeff",
           "`", "'", "%", "&", "|", "~"]
VOCABULARY = KEYWORDS + OPS + WORDS + PUNCTUATION + NUMBERS + STRINGS + GARBAGE

WRONG_NUMBERS = ["0", "-1", "-0", "1", "999999999", "99999999999999999999", "1" + "0" * 400, "9" * 5000,
                 "0.5", "2.5", "-3.7", "1e400", "1e-400", "1e308*10", "0.0", "(0)", "3/0", "1/3", "-(2)",
                 "classes", "[1, 2]", "[]", '"4"', "none"]

_TOKEN = re.compile(r'"[^"\n]*"|#[^\n]*|\d+x\d+x\d+|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\.|\S')
_NUMBER = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?")
_NAME_OR_NUMBER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?")


def _blank_comments(text: str) -> str:
    """``text`` with comments replaced by spaces (same length, so match positions still apply)."""
    return re.sub(r'"[^"\n]*"|#[^\n]*', lambda m: m.group() if m.group()[0] == '"' else " " * len(m.group()), text)


# ---- the check every mutation goes through ---------------------------------------------------------


def _check_compiles_or_reports(text: str, name: str) -> None:
    """``text`` compiles to a checked network, or raises a CndsError that renders and points into it."""
    try:
        net = compile_text(text, name, base_dir=SPECS)
    except CndsError as e:
        rendered = e.render()
        assert rendered.split("\n")[0] == e.headline()
        assert not any(c in e.headline() for c in "\r\n\x00"), repr(e.headline())
        assert e.message and e.kind
        if e.span is None:
            return
        src = e.span.source
        loc = e.span.location()
        assert e.headline().startswith(f"{src.name}:{loc.line}:{loc.column}: "), e.headline()
        assert 1 <= loc.line <= src.text.count("\n") + 1 and loc.column >= 1
        assert "^" in rendered
        if src.name == name:
            # the error points into the text given (parse_text adds a final newline when missing);
            # a spec without statements is reported against an empty stand-in source
            assert src.text in (text if text.endswith("\n") else text + "\n", "\n")
        else:
            # or into an unmodified shipped spec it extends
            assert Path(src.name).resolve().parent == SPECS.resolve(), src.name
    else:
        assert net.shapes_known
        assert all(op.params is not None for layer in net.all_layers() for op in layer.ops)


def _pick(seq, i: int):
    return seq[i % len(seq)]


positions = st.integers(min_value=0, max_value=10**6)
spec_choice = st.integers(min_value=0, max_value=999)  # taken modulo the number of specs


# ---- line mutations --------------------------------------------------------------------------------

line_mutation = st.tuples(st.sampled_from(["delete", "duplicate", "swap", "move"]), positions, positions)


def _apply_line(lines: list[str], mutation) -> list[str]:
    kind, a, b = mutation
    if not lines:
        return lines
    i, j = a % len(lines), b % len(lines)
    lines = list(lines)
    if kind == "delete":
        del lines[i]
    elif kind == "duplicate":
        lines.insert(j, lines[i])
    elif kind == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    else:
        lines.insert(j, lines.pop(i))
    return lines


@settings(FUZZ, max_examples=700)
@given(spec=spec_choice, mutations=st.lists(line_mutation, min_size=1, max_size=4))
def test_line_mutations(spec, mutations):
    name, text = _specs()[spec % len(_specs())]
    lines = text.splitlines(keepends=True)
    for m in mutations:
        lines = _apply_line(lines, m)
    _check_compiles_or_reports("".join(lines), name)


# ---- token mutations -------------------------------------------------------------------------------

IDENTIFIERS = [w for w in KEYWORDS + OPS + WORDS if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", w)]
NUMERALS = [n for n in NUMBERS + WRONG_NUMBERS if re.fullmatch(r"[0-9.eE+-]+", n)]

token_mutation = st.tuples(
    st.sampled_from(["delete", "replace", "insert", "insert_spaced", "append_line"] + ["replace_like"] * 6),
    positions,
    st.sampled_from(VOCABULARY),
    positions,
)


def _apply_token(text: str, mutation) -> str:
    kind, where, word, other = mutation
    if kind == "replace_like":
        # a name for a name, a number for a number: mostly still parses, so the later passes get fuzzed
        found = list(_NAME_OR_NUMBER.finditer(_blank_comments(text)))
        if not found:
            return text
        tok = _pick(found, where)
        s, e = tok.span()
        pool = IDENTIFIERS if tok.group()[0].isalpha() or tok.group()[0] == "_" else NUMERALS
        return text[:s] + _pick(pool, other) + text[e:]
    tokens = [t for t in _TOKEN.finditer(text) if not t.group().startswith("#")]  # not inside comments
    if kind == "append_line":
        lines = text.splitlines(keepends=True)
        i = where % (len(lines) + 1)
        return "".join(lines[:i]) + word + "\n" + "".join(lines[i:])
    if not tokens:
        return word + text
    tok = _pick(tokens, where)
    s, e = tok.span()
    if kind == "delete":
        return text[:s] + text[e:]
    if kind == "replace":
        return text[:s] + word + text[e:]
    if kind == "insert":
        return text[:s] + word + text[s:]
    return text[:s] + " " + word + " " + text[s:]


@settings(FUZZ, max_examples=1300)
@given(spec=spec_choice, mutations=st.lists(token_mutation, min_size=1, max_size=3))
def test_token_mutations(spec, mutations):
    name, text = _specs()[spec % len(_specs())]
    for m in mutations:
        text = _apply_token(text, m)
    _check_compiles_or_reports(text, name)


# ---- character mutations ---------------------------------------------------------------------------

char_mutation = st.tuples(
    st.sampled_from(["delete", "delete", "delete_run", "insert", "insert", "truncate"]),
    positions,
    st.integers(min_value=1, max_value=40),
    st.sampled_from(GARBAGE + PUNCTUATION + ["x", "_", "0", " "]),
)


def _apply_char(text: str, mutation) -> str:
    kind, where, length, char = mutation
    if not text:
        return char
    i = where % len(text)
    if kind == "delete":
        return text[:i] + text[i + 1 :]
    if kind == "delete_run":
        return text[:i] + text[i + length :]
    if kind == "insert":
        return text[:i] + char + text[i:]
    return text[:i]


@settings(FUZZ, max_examples=600)
@given(spec=spec_choice, mutations=st.lists(char_mutation, min_size=1, max_size=4))
def test_character_mutations(spec, mutations):
    name, text = _specs()[spec % len(_specs())]
    for m in mutations:
        text = _apply_char(text, m)
    _check_compiles_or_reports(text, name)


# ---- wrong numbers ---------------------------------------------------------------------------------


@settings(FUZZ, max_examples=600)
@given(
    spec=spec_choice,
    mutations=st.lists(st.tuples(positions, st.sampled_from(WRONG_NUMBERS)), min_size=1, max_size=3),
)
def test_wrong_numbers(spec, mutations):
    name, text = _specs()[spec % len(_specs())]
    for where, number in mutations:
        found = list(_NUMBER.finditer(text))
        if not found:
            break
        s, e = _pick(found, where).span()
        text = text[:s] + number + text[e:]
    _check_compiles_or_reports(text, name)


# ---- the IR reader ---------------------------------------------------------------------------------


@cache
def _ir_documents() -> tuple[tuple[str, str], ...]:
    return tuple((p.stem + ".json", dumps(compile_spec(p))) for p in shipped_specs())


def _paths(doc, prefix=()):
    """Every (path, value) of a JSON document, the root included."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


WRONG_VALUES = [None, 0, -1, 1, 10**30, 1.5, -0.5, float("1e300"), "x", "", "conv3d", [], {}, True, False,
                [0, 0, 0], [0, -5, 3], [99, 0, 1], [0, 10**9, 10**9 + 1], {"name": "x"}]

json_mutation = st.tuples(
    st.sampled_from(["set", "delete", "duplicate_item", "drop_item", "rename_key"]),
    positions,
    st.sampled_from(range(len(WRONG_VALUES))),
)


def _apply_json(doc, mutation):
    kind, where, value_index = mutation
    candidates = [(p, v) for p, v in _paths(doc) if p]
    path, value = _pick(candidates, where)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if kind == "set":
        parent[last] = json.loads(json.dumps(WRONG_VALUES[value_index]))
    elif kind == "delete":
        del parent[last]
    elif kind == "rename_key" and isinstance(parent, dict):
        parent[str(last) + "_"] = parent.pop(last)
    elif kind in ("duplicate_item", "drop_item") and isinstance(value, list) and value:
        if kind == "duplicate_item":
            value.append(json.loads(json.dumps(value[0])))
        else:
            value.pop()
    return doc


def _check_ir_loads_or_reports(text: str, name: str) -> None:
    try:
        net = loads(text, name)
    except IRFormatError as e:
        assert e.headline().startswith(f"{name}: invalid IR: "), e.headline()
        assert e.render()
        return
    # what loads must also go through the passes cleanly (the CLI runs them on IR files)
    try:
        PassPipeline.from_names(DEFAULT_PIPELINE).apply(net)
    except CndsError as e:
        assert e.render()


@settings(FUZZ, max_examples=250)
@given(
    spec=spec_choice,
    mutations=st.lists(json_mutation, min_size=1, max_size=3),
)
def test_ir_json_mutations(spec, mutations):
    name, text = _ir_documents()[spec % len(_ir_documents())]
    doc = json.loads(text)
    for m in mutations:
        if not isinstance(doc, (dict, list)) or not doc:
            break
        doc = _apply_json(doc, m)
    _check_ir_loads_or_reports(json.dumps(doc), name)


@settings(FUZZ, max_examples=150)
@given(spec=spec_choice, mutations=st.lists(char_mutation, min_size=1, max_size=3))
def test_ir_text_mutations(spec, mutations):
    name, text = _ir_documents()[spec % len(_ir_documents())]
    for m in mutations:
        text = _apply_char(text, m)
    _check_ir_loads_or_reports(text, name)


@pytest.mark.parametrize("name", [p.stem + ".json" for p in shipped_specs()])
def test_unmutated_ir_round_trips(name):
    """The baseline the IR fuzzers mutate: every shipped spec's IR loads back to the same network."""
    text = dict(_ir_documents())[name]
    assert dumps(loads(text, name)) == text
