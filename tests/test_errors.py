"""Every error the frontend can raise: its class, its line and column, its message, its rendering.

In the manner of xdsl's ``check_error``: each case is a spec text, the :class:`CndsError` subclass it
must raise, the 1-based (line, column) the error points at, and a regex its message must match. The
rendered error must start with ``file:line:col: kind: message``, show the offending source line and put
a caret under the column. Cases marked "regression" were found by ``test_fuzz.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cnds_compiler.errors import (
    ArgumentError,
    CndsError,
    DuplicateNameError,
    IRFormatError,
    ShapeError,
    SpecIncludeError,
    SpecSyntaxError,
    SupervisionError,
    UnknownNameError,
)
from cnds_compiler.frontend import compile_spec, compile_text
from cnds_compiler.serialize import dumps, loads

from .conftest import SPECS


def _check_rendering(e: CndsError, name: str, line: int, column: int) -> list[str]:
    """``render()`` is headline, source line, carets under ``column``, then notes and hint."""
    rendered = e.render().split("\n")
    assert rendered[0] == f"{name}:{line}:{column}: {e.kind}: {e.message}"
    source_line = "".join(c if c.isprintable() else " " for c in e.span.source.text.split("\n")[line - 1])
    gutter, _, shown = rendered[1].partition(" | ")
    assert gutter.strip() == str(line) and shown == source_line, rendered[1]
    bar = rendered[2].index("|")
    assert rendered[2][bar + 2 + column - 1] == "^", "caret not under the error column:\n" + e.render()
    assert set(rendered[2][bar + 2 :].strip()) == {"^"}
    return rendered


def check_error(
    text: str,
    error_class: type[CndsError],
    line: int,
    column: int,
    message_regex: str,
    *,
    hint: str | None = None,
    name: str = "t.cnds",
    base_dir: Path = SPECS,
) -> CndsError:
    """Compile ``text``; it must raise exactly ``error_class`` at (line, column) with a matching message."""
    with pytest.raises(CndsError) as info:
        compile_text(text, name, base_dir=base_dir)
    e = info.value
    assert type(e) is error_class, f"expected {error_class.__name__}, got {type(e).__name__}:\n{e.render()}"
    assert (e.line, e.column) == (line, column), e.render()
    assert re.search(message_regex, e.message), f"{message_regex!r} not in {e.message!r}"
    assert e.span.source.name == name
    _check_rendering(e, name, line, column)
    if hint is None:
        assert e.hint is None or "did you mean" not in e.hint, e.render()
    else:
        assert e.hint and re.search(hint, e.hint), e.render()
        assert e.render().split("\n")[-1] == f"hint: {e.hint}"
    return e


def check_file_error(path: Path, error_class, file: Path, line: int, column: int, message_regex: str):
    """Like :func:`check_error` for a spec on disk; the error may point into another file (``file``)."""
    with pytest.raises(CndsError) as info:
        compile_spec(path)
    e = info.value
    assert type(e) is error_class, f"expected {error_class.__name__}, got {type(e).__name__}:\n{e.render()}"
    assert (e.line, e.column) == (line, column), e.render()
    assert re.search(message_regex, e.message), e.message
    assert e.span.source.name == str(file)
    _check_rendering(e, str(file), line, column)
    return e


HEAD = "network n\ninput 1x8x8\nclasses 2\n"  # lines 1-3 of most cases below

# A small supervised network; line numbers are shown on the right.
MINI = """\
network mini
input 3x16x16
classes 10

block conv(c, k=3) = conv2d(c, k, pad=1) relu

conv1: conv(16)
pool1: maxpool(2)
conv2_{1,2}: conv(32)
pool2: maxpool(2)
conv3: conv(64)
pool3: maxpool(2)
fc4: linear(64) relu
fc5: linear(classes)

supervise conv2_2 loss softmax weight 0.3 decay linear {
  pool: avgpool(2)
  fc: linear(classes)
}

train { optimizer sgd  lr 0.01  epochs 3 }
"""
#  1 network mini          7 conv1             13 fc4                19 }
#  5 block conv            9 conv2_{1,2}       14 fc5                21 train
#                          11 conv3            16 supervise conv2_2


def test_mini_compiles():
    net = compile_text(MINI, "mini.cnds", base_dir=SPECS)
    assert [b.tap for b in net.branches] == ["conv2_2"]
    assert str(net.layer("pool3").out_shape) == "64x2x2"


def mini(old: str, new: str) -> str:
    assert MINI.count(old) == 1, old
    return MINI.replace(old, new)


# ---- SpecSyntaxError -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, column, message, hint",
    [
        ("network n\nconv1 conv2d(64, 3)\n", 2, 7, r"unexpected 'conv2d'; expected ':'", r"name and a colon"),
        (HEAD + "c: conv2d(4, 3\n", 4, 15, r"unexpected end of line; expected '\)'", r"unclosed parenthesis"),
        (HEAD + "c: linear(2)\ntrain { epochs 3\n", 5, 17, r"unexpected end of file", r"unclosed `\{`"),
        ("network n\n@@ broken\n", 2, 1, r"unexpected character '@'", None),
        ("network n\ninput 3x8\n", 2, 7, r"expected a shape", r"input takes CxHxW"),
        (HEAD + "c: conv2d(4,, 3)\n", 4, 13, r"unexpected ','", r"argument is missing between commas"),
        (HEAD + "c: linear(2)\ntrain { epochs }\n", 5, 16, r"unexpected '\}'", r"setting needs a name and a value"),
        (HEAD + "c_{3..1}: relu\n", 4, 4, r"empty repetition range 3\.\.1", None),
    ],
    ids=["missing-colon", "unclosed-paren", "unclosed-brace", "bad-character", "bad-shape", "empty-argument",
         "setting-without-value", "empty-range"],
)
def test_syntax_errors(text, line, column, message, hint):
    e = check_error(text, SpecSyntaxError, line, column, message)
    if hint is not None:
        assert e.hint and re.search(hint, e.hint), e.render()
        assert "hint: " in e.render()


def test_syntax_error_in_shipped_spec_points_at_token():
    text = (SPECS / "places_cnds8.cnds").read_text().replace("conv2: conv(128)", "conv2: conv(128,)")
    line = text[: text.index("conv2: conv(128,)")].count("\n") + 1
    check_error(text, SpecSyntaxError, line, 17, r"unexpected '\)'", name="places_cnds8.cnds")


def test_regression_control_character_stays_on_the_headline():
    # regression: a raw '\r' or NUL in the message split the headline over two lines
    e = check_error("network n\x00\n", SpecSyntaxError, 1, 10, r"unexpected character '\\x00'")
    assert "\x00" not in e.headline()
    e = check_error("network n\ninput 1x8x8\rclasses 2\n", SpecSyntaxError, 2, 12, r"'\\r'")
    assert "\r" not in e.headline()
    e = check_error('network "a\x00b"\n', SpecSyntaxError, 1, 9, r"""unexpected '"a\\x00b"'""")
    assert "\x00" not in e.headline()


def test_regression_number_with_too_many_digits():
    # regression: int() refuses > 4300 digits; the ValueError escaped wrapped in lark's VisitError
    check_error(HEAD + "c: linear(" + "1" * 5000 + ")\n", SpecSyntaxError, 4, 11, r"number too large \(5000 digits\)")
    check_error("network n\ninput 1x" + "8" * 5000 + "x8\n", SpecSyntaxError, 2, 7, r"number too large")


def test_regression_deeply_nested_expression():
    # regression: 300 nested '-' (or a 300-term sum) raised RecursionError in the lark Transformer
    e = check_error(HEAD + "c: linear(" + "-" * 300 + "2)\n", SpecSyntaxError, 4, 11, r"nested more than 200")
    assert e.span.text == "-" * 300 + "2"  # the whole expression
    e = check_error(HEAD + "c: linear(1" + "+1" * 300 + ")\n", SpecSyntaxError, 4, 11, r"nested more than 200")
    assert e.span.text == "1" + "+1" * 300
    check_error(HEAD + "c: linear(2)\ndata { mean " + "[" * 250 + "]" * 250 + " }\n", SpecSyntaxError, 5, 13,
                r"nested more than 200")


def test_nesting_below_the_limit_still_compiles():
    net = compile_text(HEAD + "c: linear(" + "-" * 150 + "2)\n", "t.cnds")
    assert net.trunk[0].ops[0].attrs.out_features == 2


def test_regression_huge_repetition_range():
    # regression: `c_{1..999999999}` tried to build a billion layer names
    check_error(HEAD + "c_{1..5000}: relu\nf: linear(2)\n", SpecSyntaxError, 4, 4, r"more than 1000 layers")


# ---- SpecIncludeError ------------------------------------------------------------------------------


def test_extends_missing_file(tmp_path):
    e = check_error('extends "nope.cnds"\nnetwork n\n', SpecIncludeError, 1, 1, r"cannot extend .*nope\.cnds.*no such",
                    base_dir=tmp_path)
    assert str(tmp_path / "nope.cnds") in e.message


def test_extends_cycle(tmp_path):
    (tmp_path / "a.cnds").write_text('extends "b.cnds"\nnetwork a\n')
    (tmp_path / "b.cnds").write_text('# b extends a\nextends "a.cnds"\nnetwork b\n')
    check_file_error(tmp_path / "a.cnds", SpecIncludeError, tmp_path / "b.cnds", 2, 1, r"'a\.cnds' extends itself")


def test_extends_itself(tmp_path):
    (tmp_path / "self.cnds").write_text('network s\nextends "self.cnds"\n')
    check_file_error(tmp_path / "self.cnds", SpecIncludeError, tmp_path / "self.cnds", 2, 1, r"extends itself")


def test_extends_after_layers():
    check_error(HEAD + 'c: linear(2)\nextends "x.cnds"\n', SpecIncludeError, 5, 1, r"'extends' must come before")


def test_regression_extends_path_with_nul_byte():
    # regression: Path.resolve() raised ValueError("embedded null byte")
    e = check_error('extends "a\x00b"\nnetwork n\n', SpecIncludeError, 1, 1, r"cannot extend 'a\\x00b'")
    assert "\x00" not in e.headline()


def test_missing_spec_file_names_the_path(tmp_path):
    missing = tmp_path / "missing.cnds"
    with pytest.raises(SpecIncludeError) as info:
        compile_spec(missing)
    e = info.value
    assert e.span is None and (e.line, e.column) == (None, None)
    assert e.render() == f"{missing}: error: no such spec file"


# ---- UnknownNameError ------------------------------------------------------------------------------


def test_misspelt_op():
    check_error(mini("conv3: conv(64)", "conv3: cnov2d(64, 3)"), UnknownNameError, 11, 8,
                r"unknown op or block 'cnov2d'", hint=r"did you mean 'conv2d'")


def test_misspelt_block_keyword():
    check_error(mini("conv3: conv(64)", "conv3: conv(64, kk=5)"), UnknownNameError, 11, 17,
                r"block 'conv' has no parameter 'kk' \(it takes c, k\)", hint=r"did you mean 'k'")


def test_misspelt_op_keyword():
    check_error(mini("pool: avgpool(2)", "pool: avgpool(2, strid=2)"), UnknownNameError, 17, 20,
                r"avgpool has no parameter 'strid'", hint=r"did you mean 'stride'")


def test_unknown_train_setting():
    check_error(mini("epochs 3", "epoks 3"), UnknownNameError, 21, 33, r"unknown setting 'epoks'",
                hint=r"did you mean 'epochs'")


def test_unknown_section():
    check_error(mini("train {", "trian {"), UnknownNameError, 21, 1, r"unknown section 'trian' \(sections: train, data\)",
                hint=r"did you mean 'train'")


def test_unknown_supervise_setting():
    check_error(mini("decay linear", "decya linear"), UnknownNameError, 16, 43, r"unknown supervise setting 'decya'",
                hint=r"did you mean 'decay'")


def test_tap_that_does_not_exist():
    check_error(mini("supervise conv2_2", "supervise conv2_3"), UnknownNameError, 16, 11,
                r"supervision point 'conv2_3' is not a layer of the trunk", hint=r"did you mean .*'conv2_2'")


def test_unknown_name_in_arithmetic():
    check_error(HEAD + "c: linear(kk + 1)\n", UnknownNameError, 4, 11, r"unknown name 'kk' in arithmetic")


def test_unknown_lr_policy():
    check_error(HEAD + "c: linear(2)\ntrain { lr_policy stepp(0.1) }\n", UnknownNameError, 5, 19,
                r"unknown lr_policy 'stepp'", hint=r"did you mean 'step'")


def test_unknown_init_scheme():
    check_error("network n\ninput 1x8x8\nclasses 2\ninit kaiminng\nc: linear(2)\n", UnknownNameError, 4, 6,
                r"unknown init scheme 'kaiminng'", hint=r"did you mean 'kaiming'")


def test_derived_spec_layer_not_in_base(tmp_path):
    (tmp_path / "base.cnds").write_text(HEAD + "conv1: conv2d(4, 3)\nfc: linear(2)\n")
    check_error('extends "base.cnds"\nnetwork d\nconv: conv2d(8, 3)\n', UnknownNameError, 3, 1,
                r"'conv' is not a layer of the base spec", hint=r"did you mean 'conv1'", base_dir=tmp_path)


# ---- DuplicateNameError ----------------------------------------------------------------------------


def test_duplicate_layer_notes_first_definition():
    e = check_error(mini("fc4: linear(64) relu", "fc4: linear(64) relu\nconv1: conv(8)"), DuplicateNameError, 14, 1,
                    r"layer 'conv1' defined twice")
    (first, note), = e.notes
    assert note == "first defined here" and (first.location().line, first.location().column) == (7, 1)
    rendered = e.render().split("\n")
    assert rendered[3] == "t.cnds:7:1: note: first defined here"
    assert rendered[4].endswith("| conv1: conv(16)") and rendered[5].endswith("| ^^^^^")


@pytest.mark.parametrize(
    "text, line, column, message, note_line",
    [
        (HEAD + "c: linear(2)\ntrain { epochs 3  epochs 4 }\n", 5, 19, r"'epochs' set twice in train", 5),
        (HEAD + "classes 3\nc: linear(2)\n", 4, 1, r"'classes' given twice", 3),
        (HEAD + "c_{1,1}: relu\nf: linear(2)\n", 4, 1, r"layer 'c_1' defined twice", 4),
        (HEAD + "conv1: conv2d(4, 3) relu\nconv1_relu: relu\nf: linear(2)\n", 5, 1,
         r"the name 'conv1_relu' is defined twice", 4),
        (HEAD + "c: conv2d(4, 3)\nf: linear(2)\nsupervise c {\n  g: linear(2)\n}\nsupervise c {\n  g: linear(2)\n}\n",
         9, 11, r"'c' is already supervised", 6),
        (HEAD + "block b(x) = relu\nblock b(y) = relu\nc: linear(2)\n", 5, 7, r"block 'b' defined twice", 4),
    ],
    ids=["setting", "header", "repetition", "op-name-vs-layer", "supervised-twice", "block"],
)
def test_duplicates(text, line, column, message, note_line):
    e = check_error(text, DuplicateNameError, line, column, message)
    assert e.notes and e.notes[0][0].location().line == note_line
    assert "note: " in e.render()


def test_block_hiding_builtin_op():
    check_error(HEAD + "block relu(x) = dropout(0.5)\nc: linear(2)\n", DuplicateNameError, 4, 7,
                r"would hide the built-in op")


# ---- ArgumentError ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, column, message",
    [
        (HEAD + "c: conv2d(4)\n", 4, 4, r"conv2d needs 'kernel'"),
        (HEAD + "c: conv2d(out=4, 3)\n", 4, 18, r"positional argument after a keyword"),
        (HEAD + "c: relu(1)\n", 4, 9, r"relu takes no arguments"),
        (HEAD + "c: conv2d(4, 3, kernel=3)\n", 4, 17, r"'kernel' given twice"),
        (HEAD + "c: conv2d(5, 3, groups=2)\n", 4, 17, r"not divisible by groups 2"),
        (HEAD + "c: linear(2) dropout(1.5)\n", 4, 22, r"dropout p must be in \[0\.0, 0\.99\]"),
        (HEAD + "c: maxpool(2, pad=2)\n", 4, 15, r"pad 2 is more than half the kernel"),
        (HEAD + "c: conv2d(4, 3, stride=sgd)\n", 4, 17, r"stride must be an integer, got 'sgd'"),
        (HEAD + "c: conv2d(0, 3)\n", 4, 11, r"out channels must be >= 1, got 0"),
        (HEAD + "c: conv2d(-1, 3)\n", 4, 11, r"must be >= 1, got -1"),
        (HEAD + "c: conv2d(4, 2.5)\n", 4, 14, r"kernel must be an integer, got 2\.5"),
        (HEAD + "c: linear(2 / 0)\n", 4, 11, r"division by zero"),
        ("network n\ninput 1x8x8\nclasses 1\nc: linear(1)\n", 3, 9, r"classes must be >= 2, got 1"),
        ("network n\ninput 1x8x8\nclasses 2\npooling round\nc: linear(2)\n", 4, 1, r"pooling must be floor or ceil"),
        (HEAD + "block b(x) = linear(x)\nc: b()\n", 5, 4, r"block 'b' needs 'x'"),
        (HEAD + "c: linear(2)\ndata { mean [0.5, 0.5] }\n", 5, 13, r"mean needs 1 or 1 values"),
        (HEAD + "c: linear(2)\ntrain { optimizer sgdd }\n", 5, 19, r"optimizer must be one of sgd"),
    ],
    ids=["missing-required", "positional-after-keyword", "too-many", "given-twice", "groups", "dropout-range",
         "pool-pad", "word-for-int", "zero-channels", "negative-channels", "float-kernel", "division-by-zero",
         "one-class", "pooling-mode", "block-missing-param", "mean-per-channel", "optimizer-choice"],
)
def test_argument_errors(text, line, column, message):
    check_error(text, ArgumentError, line, column, message, hint=r"did you mean 'sgd'" if "sgdd" in text else None)


def test_regression_exponential_block_expansion():
    # regression: `block b0 = b1 b1`, `block b1 = b2 b2`, ... 22 deep took 77 s (2**22 ops); now bounded
    blocks = "".join(f"block b{i}() = b{i + 1}() b{i + 1}()\n" for i in range(22)) + "block b22() = relu\n"
    check_error(HEAD + blocks + "c: b0()\nf: linear(2)\n", ArgumentError, 15, 15,
                r"block 'b12' expands to more than 1000 ops")


def test_long_layer():
    check_error(HEAD + "c: " + "relu " * 1001 + "\nf: linear(2)\n", ArgumentError, 4, 4 + 5 * 1000,
                r"layer 'c' has more than 1000 ops")


@pytest.mark.parametrize(
    "setting, message",
    [
        ("epochs 99999999999", r"epochs must be <= 2147483647, got 99999999999"),  # regression: no upper bound
        ("lr 1e400", r"lr must be a finite number, got inf"),  # regression: inf accepted as a learning rate
        ("lr 1e400 - 1e400", r"lr must be a finite number, got nan"),  # regression: nan passed every range check
        ("lr " + "9" * 400, r"lr is too large"),  # regression: OverflowError in float(int)
        ("lr " + "9" * 400 + " / 3", r"number too large"),  # regression: OverflowError in int / int
        ("batch 1e300", r"batch must be <= 2147483647, got a 301-digit number"),
    ],
)
def test_regression_out_of_range_numbers(setting, message):
    check_error(HEAD + "c: linear(2)\ntrain { " + setting + " }\n", ArgumentError, 5, 9 + len(setting.split()[0]) + 1,
                message)


@pytest.mark.parametrize("shape", ["0x8x8", "1x0x8", "99999x8x8", "1x8x100000"])
def test_regression_input_out_of_range(shape):
    # regression: `input 0x8x8` raised ValueError from Shape; 99999 channels made `mean 0.5` a 99999-tuple
    check_error(f"network n\ninput {shape}\nclasses 2\nc: linear(2)\ndata {{ mean 0.5 }}\n", ArgumentError, 2, 1,
                rf"input {shape} is out of range")


# ---- ShapeError ------------------------------------------------------------------------------------


def test_kernel_larger_than_map_points_at_layer_line():
    e = check_error("network n\ninput 1x2x2\nclasses 2\nc: conv2d(4, 3)\nf: linear(2)\n", ShapeError, 4, 4,
                    r"c: 3x3 kernel does not fit the 2x2 input")
    assert e.span.text == "conv2d(4, 3)"


def test_kernel_too_large_deep_in_shipped_spec():
    # digits: conv5_x sees 2x2 maps; a 3x3 kernel without padding cannot apply
    text = (SPECS / "digits_cnds8.cnds").read_text().replace("conv5_{1,2}: conv(64)", "conv5_{1,2}: conv2d(64, 3)")
    line = text[: text.index("conv5_{1,2}")].count("\n") + 1
    check_error(text, ShapeError, line, 14, r"conv5_1: 3x3 kernel does not fit the 2x2 input", name="digits_cnds8.cnds")


def test_wrong_class_count_at_last_layer():
    check_error(mini("fc5: linear(classes)", "fc5: linear(7)"), ShapeError, 14, 1,
                r"the network ends in 'fc5' with output 7, but the spec declares 10 classes")


def test_wrong_class_count_in_branch():
    e = check_error(mini("  fc: linear(classes)", "  fc: linear(9)"), ShapeError, 18, 3,
                    r"the branch on 'conv2_2' ends in 'fc' with output 9")
    assert "linear(classes)" in e.hint


def test_conv_after_flatten():
    check_error(HEAD + "f: linear(8)\nc: conv2d(4, 3)\n", ShapeError, 5, 4, r"conv2d needs a CxHxW feature map")


def test_pool_window_too_large():
    check_error(HEAD + "p: maxpool(9)\nf: linear(2)\n", ShapeError, 4, 4, r"9x9 pooling window does not fit the 8x8")


# ---- SupervisionError ------------------------------------------------------------------------------


def test_branch_after_last_conv_on_fc():
    text = mini("supervise conv2_2 loss softmax weight 0.3 decay linear {\n  pool: avgpool(2)\n",
                "supervise fc4 loss softmax weight 0.3 decay linear {\n")
    e = check_error(text, SupervisionError, 16, 11, r"branch attached to 'fc4', after the last convolution \('conv3'\)")
    assert "attach it to 'conv3'" in e.hint


def test_branch_after_last_conv_on_pool():
    text = mini("supervise conv2_2 loss softmax weight 0.3 decay linear {\n  pool: avgpool(2)\n",
                "supervise pool3 {\n")
    check_error(text, SupervisionError, 16, 11, r"branch attached to 'pool3', after the last convolution")


def test_last_layer_as_tap():
    text = mini("supervise conv2_2 loss softmax weight 0.3 decay linear {\n  pool: avgpool(2)\n",
                "supervise fc5 {\n")
    check_error(text, SupervisionError, 16, 11, r"'fc5' is the network's output layer")


def test_unsupervise_unsupervised_layer():
    check_error('extends "digits_cnds8.cnds"\nnetwork d\nunsupervise conv3_1\n', SupervisionError, 3, 13,
                r"'conv3_1' is not supervised, nothing to remove", hint=r"did you mean 'conv3_2'")


def test_branch_without_layers():
    check_error(HEAD + "c: conv2d(4, 3)\nf: linear(2)\nsupervise c {\n}\n", SupervisionError, 6, 1,
                r"the branch on 'c' has no layers")


def test_decay_with_explicit_weights():
    text = HEAD + "c: conv2d(4, 3)\nf: linear(2)\nsupervise c weight [0.3, 0.1] decay linear {\n  g: linear(2)\n}\n"
    check_error(text, SupervisionError, 6, 31, r"'decay' does not apply to an explicit list")


# ---- plain CndsError: a missing statement ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, column, message, hint",
    [
        ("input 1x8x8\nclasses 2\nc: linear(2)\n", 1, 1, r"no `network NAME` line", r"network my_net"),
        ("network n\nclasses 2\nc: linear(2)\n", 1, 1, r"no `input CxHxW` line", r"input 3x227x227"),
        ("# comment\nnetwork n\ninput 1x8x8\nc: linear(2)\n", 2, 1, r"no `classes N` line", r"classes 1000"),
        (HEAD, 1, 1, r"defines no layers", None),
    ],
    ids=["network", "input", "classes", "layers"],
)
def test_missing_statements(text, line, column, message, hint):
    e = check_error(text, CndsError, line, column, message)
    if hint:
        assert hint in e.hint


# ---- IRFormatError ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ir_text() -> str:
    return dumps(compile_spec(SPECS / "digits_cnds8.cnds"))


@pytest.fixture
def ir_doc(ir_text) -> dict:
    """A fresh, valid IR document of digits_cnds8 for each test to break."""
    return json.loads(ir_text)


def check_ir_error(doc_or_text, message_regex: str, name: str = "x.json") -> IRFormatError:
    text = doc_or_text if isinstance(doc_or_text, str) else json.dumps(doc_or_text)
    with pytest.raises(CndsError) as info:
        loads(text, name)
    e = info.value
    assert type(e) is IRFormatError, e.render()
    assert (e.line, e.column) == (None, None) and e.path == name
    assert re.search(message_regex, e.message), e.message
    assert e.render().startswith(f"{name}: invalid IR: ")
    return e


def test_ir_schema_violations_report_json_paths(ir_doc):
    ir_doc["nodes"][1]["kind"] = "conv3d"
    ir_doc["num_classes"] = "ten"
    e = check_ir_error(ir_doc, r"^2 schema violation\(s\): ")
    assert "$.num_classes: 'ten' is not of type 'integer'" in e.message
    assert "$.nodes[1].kind: 'conv3d' is not one of" in e.message


def test_ir_missing_field(ir_doc):
    del ir_doc["heads"][1]["tap"]
    check_ir_error(ir_doc, r"\$\.heads\[1\]: 'tap' is a required property")


def test_ir_not_json():
    check_ir_error('{"name": ', r"not JSON: Expecting value at line 1 column 10")


def test_ir_span_outside_its_source(ir_doc):
    ir_doc["nodes"][1]["span"] = [0, 5, 10**6]
    check_ir_error(ir_doc, r"inconsistent IR: span 5\.\.1000000 outside")


def test_ir_errors_after_reload_point_at_spec_lines(ir_doc):
    # a reloaded IR keeps the spec text, so a later pass still reports file:line:col
    ir_doc["heads"][1]["tap"] = "conv9"
    net = loads(json.dumps(ir_doc), "x.json")
    from cnds_compiler.passes import DEFAULT_PIPELINE, PassPipeline

    with pytest.raises(UnknownNameError) as info:
        PassPipeline.from_names(DEFAULT_PIPELINE).apply(net)
    assert info.value.headline().startswith(f"{SPECS / 'digits_cnds8.cnds'}:24:11: unknown name: ")


def test_branch_after_last_conv_is_a_supervision_error_even_when_it_starts_with_a_pool():
    # check-supervision runs before infer-shapes, so the misplaced tap is named, not a shape error inside it
    text = HEAD + "c: conv2d(4, 3) relu\nf: linear(8) relu\nout: linear(2)\nsupervise f { p: avgpool(2); l: linear(2) }\n"
    with pytest.raises(SupervisionError, match="after the last convolution"):
        compile_text(text, "late.cnds")
