"""cnds-probe: the paper's gradient rule (section 2), the written spec, and the gradient figures."""

import json
from pathlib import Path

import pytest

from cnds_compiler import compile_spec
from cnds_compiler.errors import CndsError
from cnds_compiler.probe import ProbeSettings, propose, run_probe, write_supervised_spec
from cnds_compiler.probe.rule import HEALTHY, PROPOSED, VANISHES_AT_TOP, final_level

from .conftest import shipped_specs

# An 8-conv net small enough for a few probe iterations in well under a second each.
SMALL8 = """\
# A small 8-conv net for the probe tests (comment kept by --write).
network small8
input 1x16x16
classes 10
init gaussian(std=0.01)
pooling ceil

block conv(c) = conv2d(c, 3, pad=1, bias=0.1) relu
block fc(n) = linear(n, bias=0.1) relu

conv1: conv(8)
conv2: conv(8)
pool2: maxpool(2)          # 8x8
conv3_{1,2}: conv(16)
pool3: maxpool(2)          # 4x4
conv4_{1,2}: conv(16)
pool4: maxpool(2)          # 2x2
conv5_{1,2}: conv(32)
pool5: maxpool(2)          # 1x1
fc6: fc(32)
fc7: fc(32)
fc8: linear(classes)

# the hand-made branch
supervise conv3_2 loss softmax weight 0.3 decay linear { pool: gap; cls: linear(classes) }

data { mirror false }
train { lr 0.01  batch 8  epochs 1 }  # trailing comment
"""

# The healthy variant: Kaiming init and batch norm after every conv.
HEALTHY_SPEC = """\
extends "small8.cnds"
network small8_bn
init kaiming(bias=0)
block conv(c) = conv2d(c, 3, pad=1, bias=0) batchnorm relu
"""

ITERS = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a shared 2-core machine two torch threads can run these tiny nets 10-30x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe")
    (root / "small8.cnds").write_text(SMALL8)
    (root / "small8_bn.cnds").write_text(HEALTHY_SPEC)
    return root


@pytest.fixture(scope="module")
def caffe_bias_probe(specs):
    """N(0, 0.01) weights with the spec's Caffe-style 0.1 biases: a gradient that decays with depth."""
    net = compile_spec(specs / "small8.cnds")
    return net, run_probe(net, ProbeSettings(iters=ITERS, bias="spec"))


# ---- the rule (pure) --------------------------------------------------------------------------------


def test_final_level_is_mean_of_last_quarter():
    assert final_level([1.0] * 6 + [3.0, 5.0]) == pytest.approx(4.0)
    assert final_level([2.0]) == 2.0


def test_rule_first_point_is_where_the_gradient_vanishes():
    # healthy at the top, below 1e-7 from the 4th conv down: the paper's 8-layer picture
    levels = [("c1", 1e-9), ("c2", 2e-9), ("c3", 1e-8), ("c4", 5e-8), ("c5", 2e-7), ("c6", 5e-7),
              ("c7", 1e-6), ("c8", 2e-6)]
    p = propose(levels, 1e-7, min_gap=3)
    assert p.status == PROPOSED
    assert p.points[0].tap == "c4" and p.points[0].index == 4
    # restored at c4 to the top's 2e-6, the gradient decays by 50x to c1: 4e-8 < 1e-7 → one more at c1
    assert p.taps == ("c1", "c4")
    assert p.vanishing == ("c1", "c2", "c3", "c4")


def test_rule_spaces_branches_by_the_measured_decay():
    # 13 conv layers, top 1e-5, a steady 5x decay per layer: vanishes 3 below the top, then every 3
    levels = [(f"conv{i}", 1e-5 * 0.2 ** (13 - i)) for i in range(1, 14)]
    p = propose(levels, 1e-7)
    assert p.taps == ("conv1", "conv4", "conv7", "conv10")
    # where the lower layers stop decaying, the branches stop too (the paper's 10th, 7th, 4th)
    flat = [(n, max(v, levels[3][1])) for n, v in levels]
    assert propose(flat, 1e-7).taps == ("conv4", "conv7", "conv10")


def test_rule_proposes_none_when_healthy_or_vanishing_at_the_top():
    assert propose([("a", 1e-5), ("b", 1e-4)]).status == HEALTHY
    flat = propose([("a", 1e-12), ("b", 1e-12), ("c", 1e-13)])
    assert flat.status == VANISHES_AT_TOP and flat.taps == () and flat.vanishing == ("a", "b", "c")


def test_rule_min_gap():
    levels = [(f"c{i}", 3 * 10.0 ** (-14 + i)) for i in range(1, 9)]  # 10x per layer, top 3e-6
    # restored to 3e-6, the gradient vanishes again two layers down
    assert propose(levels, 1e-7, min_gap=1).taps == ("c2", "c4", "c6")
    assert propose(levels, 1e-7, min_gap=3).taps == ("c3", "c6")


# ---- the probe --------------------------------------------------------------------------------------


def test_probe_finds_vanishing_layers_with_gaussian_init(specs, caffe_bias_probe):
    net, result = caffe_bias_probe
    assert result.layers == ("conv1", "conv2", "conv3_1", "conv3_2", "conv4_1", "conv4_2", "conv5_1", "conv5_2")
    assert all(len(result.history[n]) == ITERS for n in result.layers)
    p = result.propose()
    assert p.status == PROPOSED
    assert len(p.vanishing) >= 4 and "conv1" in p.vanishing and "conv5_2" not in p.vanishing
    levels = dict(p.levels)
    first = p.points[0]
    assert levels[first.tap] < 1e-7
    deeper = result.layers[result.layers.index(first.tap) + 1:]
    assert deeper and all(levels[n] >= 1e-7 for n in deeper)  # the first point is the crossing
    # the rule's standard, zero biases: the gradient is below the threshold everywhere, even at the top
    zero = run_probe(net, ProbeSettings(iters=3, lr=0)).propose()
    assert zero.status == VANISHES_AT_TOP and len(zero.vanishing) == 8 and zero.taps == ()


def test_probe_proposes_none_for_kaiming_and_batchnorm(specs):
    net = compile_spec(specs / "small8_bn.cnds")
    result = run_probe(net, ProbeSettings(iters=ITERS, init="spec"))
    p = result.propose()
    assert p.status == HEALTHY and p.taps == () and p.vanishing == ()


def test_probe_is_deterministic_under_a_seed(specs, caffe_bias_probe):
    net, result = caffe_bias_probe
    again = run_probe(net, ProbeSettings(iters=ITERS, bias="spec"))
    assert again.history == result.history
    assert again.propose() == result.propose()
    other = run_probe(net, ProbeSettings(iters=ITERS, bias="spec", seed=1))
    assert other.history != result.history


# ---- the written spec -------------------------------------------------------------------------------


def _comments(text: str) -> list[str]:
    """Comments outside supervise blocks (the only text --write may delete)."""
    found, inside = [], False
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        if code.lstrip().startswith("supervise"):
            inside = "}" not in code
            continue
        if inside:
            inside = "}" not in code
            continue
        if "#" in line:
            found.append(line[line.index("#"):])
    return found


def test_written_spec_round_trips_and_trains(specs, caffe_bias_probe, tmp_path):
    from cnds_compiler.train.cli import train_main

    net, result = caffe_bias_probe
    p = result.propose()
    out = tmp_path / "written.cnds"
    edit, new_net = write_supervised_spec(specs / "small8.cnds", net, p.taps, out, notes={t: "probe" for t in p.taps})
    text = out.read_text()
    assert text == edit.text
    # compiles, with exactly the proposed branches, each the paper's shape
    again = compile_spec(out)
    assert {b.tap for b in again.branches} == set(p.taps) == {b.tap for b in new_net.branches}
    for b in again.branches:
        assert [layer.name for layer in b.layers] == ["pool", "conv", "fc1", "fc2", "classifier"]
    # every original comment survives; the rest of the text is the original minus the replaced branch
    assert all(c in _comments(text) for c in _comments(SMALL8))
    old_lines = [line for line in SMALL8.splitlines() if not line.startswith("supervise conv3_2")]
    it = iter(text.splitlines())
    assert all(any(line == got for got in it) for line in old_lines)  # original lines, in order
    assert ("conv3_2" in p.taps) == ("supervise conv3_2" in text)
    # and it trains
    run = tmp_path / "run"
    rc = train_main([str(out), "--data", "digits", "--out", str(run), "--max-steps", "1", "--limit-train", "16",
                     "--limit-val", "8", "--no-progress", "--cpu"])
    assert rc == 0 and (run / "last.pt").exists()


def test_written_spec_keeps_a_proposed_existing_branch_and_unsupervises_inherited(specs, tmp_path):
    net = compile_spec(specs / "small8.cnds")
    edit, _ = write_supervised_spec(specs / "small8.cnds", net, ["conv3_2", "conv4_2"], tmp_path / "a.cnds")
    assert edit.kept == ("conv3_2",) and edit.added == ("conv4_2",) and edit.removed == ()
    assert "supervise conv3_2 loss softmax weight 0.3 decay linear { pool: gap; cls: linear(classes) }" in edit.text
    # a derived spec in another folder: the extends path is rewritten, the inherited branch unsupervised
    derived = compile_spec(specs / "small8_bn.cnds")
    out = tmp_path / "sub" / "derived.cnds"
    edit, new_net = write_supervised_spec(specs / "small8_bn.cnds", derived, ["conv4_1"], out)
    assert edit.removed == ("conv3_2",) and "unsupervise conv3_2" in edit.text
    assert [b.tap for b in new_net.branches] == ["conv4_1"]
    assert [b.tap for b in compile_spec(out).branches] == ["conv4_1"]
    assert edit.text.startswith('extends "') and HEALTHY_SPEC.splitlines()[1] in edit.text


@pytest.mark.parametrize("spec", shipped_specs(), ids=lambda p: p.stem)
def test_template_branches_fit_every_shipped_spec(spec, tmp_path):
    net = compile_spec(spec)
    convs = [layer.name for layer in net.trunk if layer.is_conv]
    taps = list(dict.fromkeys([convs[1], convs[len(convs) // 2]]))
    edit, new_net = write_supervised_spec(spec, net, taps, tmp_path / spec.name)
    assert sorted(b.tap for b in new_net.branches) == sorted(taps)
    original = spec.read_text()
    assert all(c in _comments(edit.text) for c in _comments(original))
    for b in new_net.branches:
        if b.tap in edit.added:  # the template: pool, 1x1 conv, fc, fc, classifier of the spec's classes
            assert b.layers[-1].out_shape.dims == (net.num_classes,) and b.layers[1].out_shape.spatial


def test_write_refuses_a_non_conv_tap_and_overwriting(specs, tmp_path):
    net = compile_spec(specs / "small8.cnds")
    with pytest.raises(CndsError, match="not a conv layer"):
        write_supervised_spec(specs / "small8.cnds", net, ["pool3"], tmp_path / "x.cnds")
    with pytest.raises(CndsError, match="overwrite"):
        write_supervised_spec(specs / "small8.cnds", net, ["conv4_1"], specs / "small8.cnds")


# ---- the commands -----------------------------------------------------------------------------------


def test_cnds_probe_command(specs, tmp_path, capsys):
    from cnds_compiler.probe.cli import probe_main

    png, js, out = tmp_path / "p.png", tmp_path / "p.json", tmp_path / "w.cnds"
    rc = probe_main([str(specs / "small8.cnds"), "--iters", "4", "--bias", "spec", "--plot", str(png),
                     "--json", str(js), "--write", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "proposal: supervise after" in text and "<- supervise" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(js.read_text())
    assert doc["proposal"]["status"] == PROPOSED and len(doc["gradients"]) == 4
    assert [b.tap for b in compile_spec(out).branches] == doc["proposal"]["taps"]
    # --keep-branches trains the spec's branches too and proposes nothing; it cannot --write
    rc = probe_main([str(specs / "small8.cnds"), "--iters", "2", "--keep-branches", "--no-plot", "--no-progress"])
    assert rc == 0 and "branches conv3_2 trained too" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        probe_main([str(specs / "small8.cnds"), "--keep-branches", "--write", str(out)])
    capsys.readouterr()
    # errors are one rendered message and exit 1
    assert probe_main([str(tmp_path / "missing.cnds"), "--no-plot", "--no-progress"]) == 1
    assert "no such spec file" in capsys.readouterr().err


def test_written_spec_states_its_initialisation_and_can_take_a_trainable_one(specs, tmp_path, capsys):
    from cnds_compiler.ir import InitScheme, OpKind
    from cnds_compiler.probe.cli import probe_main

    base = [str(specs / "small8.cnds"), "--iters", "4", "--bias", "spec", "--no-plot", "--no-progress"]
    out = tmp_path / "paper.cnds"
    assert probe_main([*base, "--write", str(out)]) == 0  # keeps the spec's N(0, 0.01)
    text = capsys.readouterr().out
    assert "the proposal was measured with N(0, 0.01" in text and "may train at chance" in text
    assert "--write-init kaiming" in text
    out = tmp_path / "trainable.cnds"
    assert probe_main([*base, "--write", str(out), "--write-init", "kaiming"]) == 0
    text = capsys.readouterr().out
    assert "init kaiming(bias=0)" in out.read_text() and "may train at chance" not in text
    net = compile_spec(out)
    assert {n.attrs.init.scheme for n in net.nodes if n.kind in (OpKind.CONV2D, OpKind.LINEAR)} == {InitScheme.KAIMING}
    assert [b.tap for b in net.branches] == [b.tap for b in compile_spec(tmp_path / "paper.cnds").branches]


def test_healthy_proposal_says_why_and_what_to_try():
    from cnds_compiler.probe.rule import HEALTHY, propose

    p = propose([("conv1", 1e-4), ("conv2", 1e-3)])
    assert p.status == HEALTHY and "gradient reaches every layer" in p.message and "--init gaussian" in p.message


def test_cnds_gradplot_compares_runs(tmp_path, capsys):
    from cnds_compiler.probe.cli import gradplot_main

    for name, scale in (("cnn8", 1e-9), ("cnds8", 1e-6)):
        run = tmp_path / name
        run.mkdir()
        (run / "gradients.json").write_text(json.dumps(
            [{"step": s, "conv1": scale * (1 + s), "conv3_1": scale} for s in range(0, 50, 10)]))
    png = tmp_path / "fig.png"
    rc = gradplot_main([str(tmp_path / "cnn8"), str(tmp_path / "cnds8"), "--layer", "conv1", "--layer", "conv3_1",
                        "--plot", str(png), "--threshold", "1e-7"])
    assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"
    old = tmp_path / "old.png"  # the old option name keeps working, with a note
    assert gradplot_main([str(tmp_path / "cnn8"), "--layer", "conv1", "-o", str(old)]) == 0 and old.exists()
    assert "-o/--output is now --plot" in capsys.readouterr().err
    assert gradplot_main([str(tmp_path / "cnn8"), "--layer", "conv3_2", "--plot", str(png)]) == 1
    err = capsys.readouterr().err
    assert "no gradients of 'conv3_2'" in err and "did you mean 'conv3_1'" in err


def test_probe_and_gradplot_outputs_never_overwrite_an_input_or_a_run_file(specs, tmp_path, capsys):
    """Refused in one line before any work: a PNG or JSON over the spec, --write over it, a PNG over a
    checkpoint or a gradient log (file names that do not end as the file written does)."""
    from cnds_compiler.probe.cli import gradplot_main, probe_main

    spec = specs / "small8.cnds"
    before = spec.read_bytes()
    run = tmp_path / "run"
    run.mkdir()
    (run / "gradients.json").write_text(json.dumps([{"step": 0, "conv1": 1e-6}]))
    (run / "last.pt").write_bytes(b"weights")
    cases = [
        (probe_main, [str(spec), "--iters", "4", "--plot", str(spec)], f"{spec}: output error: --plot writes a PNG "
         "image: give it a file name ending in .png"),
        (probe_main, [str(spec), "--iters", "4", "--no-plot", "--json", str(spec)], "--json writes JSON"),
        (probe_main, [str(spec), "--iters", "4", "--no-plot", "--write", str(spec)],
         "--write would overwrite the probed spec, an input of this command"),
        (gradplot_main, [str(run), "--plot", str(run / "last.pt")], "--plot writes a PNG image"),
        (gradplot_main, [str(run / "gradients.json"), "--plot", str(run / "gradients.json")], "--plot writes"),
    ]
    for main, argv, message in cases:
        assert main([*argv, "--no-progress"] if main is probe_main else argv) == 1
        out, err = capsys.readouterr()
        assert message in err and len(err.strip().splitlines()) == 1 and out == ""  # the probe never ran
    assert spec.read_bytes() == before and (run / "last.pt").read_bytes() == b"weights"
