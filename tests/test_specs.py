"""Every shipped spec compiles, builds, runs forward and backward, and matches its own IR.

The per-spec tests share one compiled IR and one module per spec (module-scoped parametrised fixtures,
so pytest runs all tests of one spec together and keeps a single module alive at a time). Below them,
facts about particular specs: the released Places CNDS-8, the CNDS-13 branch placement, the derived
specs and the CNN-5 → CNN-8 weight transfer.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cnds_compiler import compile_spec, compile_text, serialize
from cnds_compiler.backends.pytorch import AUX_PREFIX, build_module, fan_in_std
from cnds_compiler.ir import InitScheme, LossKind, Network, OpKind, ScheduleKind
from cnds_compiler.summary import format_summary

from .conftest import SPECS, shipped_specs

BATCH = 2
PARAM_OPS = (OpKind.CONV2D, OpKind.LINEAR)


@cache
def compiled(stem: str) -> Network:
    return compile_spec(SPECS / f"{stem}.cnds")


def sample_input(net: Network, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *net.input.dims, generator=g)


def no_spans(net: Network) -> dict:
    return serialize.to_json_dict(net, include_sources=False, include_spans=False)


def conv_layers(net: Network) -> list[str]:
    return [layer.name for layer in net.trunk if layer.is_conv]


# ---- every shipped spec -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=shipped_specs(), ids=lambda p: p.stem)
def spec(request) -> Path:
    return request.param


@pytest.fixture(scope="module")
def net(spec: Path) -> Network:
    return compile_spec(spec)


@pytest.fixture(scope="module")
def model(net: Network):
    return build_module(net, seed=0)


def test_spec_compiles(spec: Path, net: Network):
    assert spec.read_text(encoding="utf-8").startswith("#"), "a shipped spec opens with a comment saying what it is"
    assert net.name == spec.stem, "the `network` line names the spec's file"
    assert net.shapes_known
    for layer in net.all_layers():
        for op in layer.ops:
            assert op.params is not None and op.flops is not None, f"{op.name} has no costs"
    assert net.trunk[-1].out_shape.dims == (net.num_classes,)
    for b in net.branches:
        assert b.layers[-1].out_shape.dims == (net.num_classes,), f"branch {b.name} does not end in the classes"


@pytest.fixture(scope="module")
def train_step(net: Network, model) -> dict:
    """One training step's forward (all branches on) and backward, shared by the tests below.

    Forward hooks record the output shape of every branch op as it runs.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for b in net.branches:
        for layer in b.layers:
            for op in layer.ops:
                qualified = f"{AUX_PREFIX}{op.name}"
                hooks.append(model.get_submodule(qualified).register_forward_hook(
                    lambda m, i, o, q=qualified: shapes.__setitem__(q, tuple(o.shape))))
    x = sample_input(net)
    y = torch.arange(BATCH) % net.num_classes
    torch.manual_seed(0)  # dropout masks
    try:
        out = model(x, branches="all")
    finally:
        for h in hooks:
            h.remove()
    loss = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(a, y) for a in out.aux.values())
    loss.backward()
    return {"out": out, "loss": loss.detach(), "branch_shapes": shapes}


def test_forward_backward_all_branches(net: Network, model, train_step):
    out = train_step["out"]
    assert out.logits.shape == (BATCH, net.num_classes)
    assert torch.isfinite(out.logits).all()
    assert set(out.aux) == {b.name for b in net.branches}
    for name, logits in out.aux.items():
        assert logits.shape == (BATCH, net.num_classes), name
        assert torch.isfinite(logits).all(), f"branch {name} output is not finite"
    assert torch.isfinite(train_step["loss"])
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        size = torch.linalg.vector_norm(p.grad, 1).item()  # NaN/inf propagate into the norm
        assert math.isfinite(size), f"{name} has a non-finite gradient"
        assert size > 0, f"{name} has an all-zero gradient"


def test_inferred_shapes_match_forward(net: Network, model, train_step):
    """Every trunk layer (via ``forward_layers``) and every op of every branch (hooks on ``aux``)."""
    model.eval()
    with torch.no_grad():
        outs = model.forward_layers(sample_input(net), [layer.name for layer in net.trunk])
    for layer in net.trunk:
        assert tuple(outs[layer.name].shape) == (BATCH, *layer.out_shape.dims), layer.name
    seen = train_step["branch_shapes"]
    for b in net.branches:
        for layer in b.layers:
            for op in layer.ops:
                assert seen[f"{AUX_PREFIX}{op.name}"] == (BATCH, *op.out_shape.dims), f"{b.name}/{op.name}"


def test_ir_json_round_trip(net: Network, model):
    text = serialize.dumps(net)
    back = serialize.loads(text)
    assert back == net
    assert serialize.dumps(back) == text

    # `model` is build_module(net, seed=0); training steps change no weight, but they would move
    # batch-norm statistics, so a network with batch norm gets a fresh one.
    has_bn = any(op.kind is OpKind.BATCHNORM for layer in net.all_layers() for op in layer.ops)
    a = build_module(net, seed=0) if has_bn else model
    b = build_module(back, seed=0)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    a.eval()
    b.eval()
    x = sample_input(net, seed=1)[:1]
    with torch.no_grad():
        oa, ob = a(x, branches="all"), b(x, branches="all")
    assert torch.equal(oa.logits, ob.logits)
    assert list(oa.aux) == list(ob.aux) == [br.name for br in net.branches]
    for name in oa.aux:
        assert torch.equal(oa.aux[name], ob.aux[name]), name


def test_state_dict_names(net: Network, model):
    keys = list(model.state_dict())
    trunk_ops = {op.name for layer in net.trunk for op in layer.ops}
    for key in keys:
        if key.startswith(AUX_PREFIX):
            node = key[len(AUX_PREFIX):].rsplit(".", 1)[0]
            assert node in {o.name for b in net.branches for layer in b.layers for o in layer.ops}, key
        else:
            assert key.rsplit(".", 1)[0] in trunk_ops, f"{key} is neither a trunk op nor under {AUX_PREFIX!r}"

    def expected(layers, prefix: str) -> set[str]:
        names = set()
        for layer in layers:
            for op in layer.ops:
                if op.kind in PARAM_OPS:
                    names.add(f"{prefix}{op.name}.weight")
                    if op.attrs.init.bias is not None:
                        names.add(f"{prefix}{op.name}.bias")
        return names

    # the spec's layer names are the trunk's parameter names (conv3_2.weight), branches live under aux.
    for layer in net.trunk:
        if layer.is_chain and any(op.kind in PARAM_OPS for op in layer.ops):
            assert f"{layer.name}.weight" in keys
    assert expected(net.trunk, "") <= set(keys)
    for b in net.branches:
        assert expected(b.layers, AUX_PREFIX) <= set(keys)
    assert set(model.trunk_state_dict()) == {k for k in keys if not k.startswith(AUX_PREFIX)}

    # the module's parameter counts are the IR's
    params = dict(model.named_parameters())
    trunk_n = sum(p.numel() for k, p in params.items() if not k.startswith(AUX_PREFIX))
    assert trunk_n == sum(layer.params for layer in net.trunk)
    for b in net.branches:
        prefix = f"{AUX_PREFIX}{b.name}."
        assert sum(p.numel() for k, p in params.items() if k.startswith(prefix)) == sum(
            layer.params for layer in b.layers
        ), b.name


def expected_weight_std(op) -> float:
    init = op.attrs.init
    if init.scheme is InitScheme.GAUSSIAN:
        return init.std
    if init.scheme is InitScheme.KAIMING:
        return fan_in_std(op)
    # Glorot uniform: std = sqrt(2 / (fan_in + fan_out))
    a, x = op.attrs, op.in_shape
    if op.kind is OpKind.CONV2D:
        k = a.kernel[0] * a.kernel[1]
        fan_in, fan_out = x.dims[0] // a.groups * k, a.out_channels * k
    else:
        fan_in, fan_out = x.numel, a.out_features
    return math.sqrt(2.0 / (fan_in + fan_out))


def test_initialisation_follows_spec(net: Network, model):
    """Biases hold the spec's constant; weights of layers large enough to measure have the spec's std."""
    checked = 0
    largest = max(p.numel() for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1)
    for prefix, layers in [("", net.trunk)] + [(AUX_PREFIX, b.layers) for b in net.branches]:
        for layer in layers:
            for op in layer.ops:
                if op.kind not in PARAM_OPS:
                    continue
                m = model.get_submodule(prefix + op.name)
                bias = op.attrs.init.bias
                if bias is None:
                    assert m.bias is None, op.name
                else:
                    assert torch.equal(m.bias.detach(), torch.full_like(m.bias, bias)), f"{prefix}{op.name} bias"
                w = m.weight.detach().flatten()[:200_000]  # i.i.d. draws: a prefix is a fair sample
                if w.numel() >= min(20_000, largest):
                    std = expected_weight_std(op)
                    rel = max(0.05, 4 / math.sqrt(2 * w.numel()))  # 4 standard errors of a sample std
                    assert w.std().item() == pytest.approx(std, rel=rel), f"{prefix}{op.name} weight std"
                    assert abs(w.mean().item()) < 0.05 * std, f"{prefix}{op.name} weight mean"
                    checked += 1
    assert checked > 0


# ---- the released Places CNDS-8 -----------------------------------------------------------------


def summary_rows(text: str) -> dict[str, list[str]]:
    """Summary table rows by layer name; branch rows as '<branch>/<layer>'."""
    rows, branch = {}, None
    for line in text.splitlines():
        m = re.match(r"-- branch '([^']+)'", line)
        if m:
            branch = m.group(1)
            continue
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 6:
            name = cells[0].removeprefix("* ")
            rows[f"{branch}/{name}" if cells[0].startswith("* ") else name] = cells[1:]
    return rows


def test_places_cnds8_summary_shows_paper_shapes():
    rows = summary_rows(format_summary(compiled("places_cnds8")))
    # cells: op, input, output, params, MFLOPs
    assert rows["pool5"][2] == "512x4x4"
    assert rows["fc6"][1] == "8192 = 512x4x4"
    assert rows["conv3_2/pool"][2] == "256x13x13"
    assert rows["conv3_2/fc1"][1] == "10816 = 64x13x13"
    assert rows["conv1"][0] == "conv2d 64 7x7/2 p1 + relu"
    assert rows["conv1"][2] == "64x112x112"


def test_places_cnds8_initialisation_is_the_released_one():
    net = compiled("places_cnds8")
    m = build_module(net, seed=0)
    aux = m.aux.conv3_2
    biases = {
        m.conv1: 0.5, m.conv2: 0.1, m.conv3_1: 0.1, m.conv5_2: 0.1, m.fc6: 1.0, m.fc7: 1.0, m.fc8: 0.0,
        aux.conv: 0.1, aux.fc1: 1.0, aux.fc2: 1.0, aux.classifier: 0.0,
    }
    for module, value in biases.items():
        assert torch.all(module.bias == value), module
    for module in (m.conv4_2, m.conv5_1, m.fc6, m.fc7, aux.fc1):
        assert module.weight.std().item() == pytest.approx(0.01, rel=0.02)
        assert abs(module.weight.mean().item()) < 1e-3
    assert net.branch("conv3_2").schedule.alpha0 == 0.3
    assert net.branch("conv3_2").schedule.kind is ScheduleKind.LINEAR


# ---- where the branches are ---------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["places_cnds8", "imagenet_cnds8", "fmnist_cnds8", "digits_cnds8"])
def test_cnds8_branch_after_fourth_conv(stem):
    net = compiled(stem)
    convs = conv_layers(net)
    assert len(convs) == 8
    assert sum(1 for layer in net.trunk if layer.ops[0].kind is OpKind.LINEAR) == 3
    assert [b.tap for b in net.branches] == [convs[3]] == ["conv3_2"]


@pytest.mark.parametrize("stem", ["imagenet_cnds13", "fmnist_cnds13"])
def test_cnds13_branches_after_4th_7th_10th_conv(stem):
    net = compiled(stem)
    convs = conv_layers(net)
    assert len(convs) == 13
    assert [b.tap for b in net.branches] == [convs[3], convs[6], convs[9]]
    for b in net.branches:
        assert b.loss is LossKind.SOFTMAX
        assert (b.schedule.kind, b.schedule.alpha0) == (ScheduleKind.LINEAR, 0.3)
        # the CNDS branch template: pool → 1x1 conv → fc → fc → classifier
        kinds = [layer.ops[0].kind for layer in b.layers]
        assert kinds == [OpKind.AVGPOOL, OpKind.CONV2D, OpKind.LINEAR, OpKind.LINEAR, OpKind.LINEAR], b.name
        assert b.layers[1].ops[0].attrs.kernel == (1, 1)


@pytest.mark.parametrize("stem, base", [("imagenet_dsn8", "imagenet_cnds8"), ("fmnist_dsn8", "fmnist_cnds8")])
def test_dsn_has_a_hinge_companion_on_every_conv(stem, base):
    net = compiled(stem)
    assert [b.tap for b in net.branches] == conv_layers(net) == conv_layers(compiled(base))
    for b in net.branches:
        assert b.loss is LossKind.HINGE
        assert b.schedule.kind is ScheduleKind.LINEAR
    # companions are cheap: together far below the trunk's cost
    assert sum(layer.flops for b in net.branches for layer in b.layers) < 0.01 * sum(layer.flops for layer in net.trunk)


def test_googlenet_style_weight_is_constant():
    net, base = compiled("imagenet_cnds8_const"), compiled("imagenet_cnds8")
    (b,) = net.branches
    assert b.tap == "conv3_2" and b.schedule.kind is ScheduleKind.CONSTANT
    assert [b.schedule.alpha(t, 65) for t in (0, 30, 64)] == [0.3, 0.3, 0.3]
    assert no_spans(net)["nodes"] == no_spans(base)["nodes"]


# ---- derived specs ------------------------------------------------------------------------------


def test_imagenet_cnds8_differs_from_places_only_in_name_and_classes():
    places_text = (SPECS / "places_cnds8.cnds").read_text(encoding="utf-8")
    edited = places_text.replace("network places_cnds8", "network imagenet_cnds8").replace(
        "classes 205", "classes 1000"
    )
    assert edited.count("imagenet_cnds8") == 1 and "classes 1000" in edited
    expected = compile_text(edited, "edited.cnds", base_dir=SPECS)
    assert no_spans(compiled("imagenet_cnds8")) == no_spans(expected)
    assert no_spans(compiled("imagenet_cnds8")) != no_spans(compiled("places_cnds8"))


@pytest.mark.parametrize(
    "derived, base",
    [
        ("places_cnn8", "places_cnds8"),
        ("imagenet_cnn8", "imagenet_cnds8"),
        ("fmnist_cnn8", "fmnist_cnds8"),
        ("digits_cnn8", "digits_cnds8"),
        ("imagenet_cnds8_const", "imagenet_cnds8"),
        ("imagenet_dsn8", "imagenet_cnds8"),
        ("fmnist_dsn8", "fmnist_cnds8"),
    ],
)
def test_derived_spec_keeps_the_base_trunk(derived, base):
    d, b = no_spans(compiled(derived)), no_spans(compiled(base))
    trunk = compiled(base).main_nodes()
    assert compiled(derived).main_nodes() == trunk
    assert [n for n in d["nodes"] if n["name"] in trunk] == [n for n in b["nodes"] if n["name"] in trunk]
    assert d["data"] == b["data"]
    assert d["name"] == derived != b["name"]
    if "cnn" in derived:  # the CNN baselines are the CNDS trunk without any branch
        assert d["heads"][1:] == []
        deploy = replace(compiled(base).without_branches(), name=derived, train=compiled(derived).train)
        assert no_spans(deploy) == d


def test_cnn5_weights_initialise_cnn8_by_name():
    """VGG-style start of CNN-8 (paper 3.1): every CNN-5 layer loads into CNN-8 by name and shape."""
    cnn5 = build_module(compiled("fmnist_cnn5"), seed=0)
    cnn8 = build_module(compiled("fmnist_cnn8"), seed=1)
    cnds8 = build_module(compiled("fmnist_cnds8"), seed=1)
    s5, s8 = cnn5.state_dict(), cnn8.state_dict()
    assert set(s5) < set(s8)
    assert all(s5[k].shape == s8[k].shape for k in s5)
    result = cnn8.load_state_dict(s5, strict=False)
    assert result.unexpected_keys == []
    assert {k.split(".")[0] for k in result.missing_keys} == {"conv3_2", "conv4_2", "conv5_2"}
    assert torch.equal(cnn8.conv4_1.weight, cnn5.conv4_1.weight)
    assert set(cnds8.trunk_state_dict()) == set(s8)  # the same names serve CNDS-8's trunk
    cnn8.eval()
    with torch.no_grad():
        assert cnn8(sample_input(compiled("fmnist_cnn8"))).logits.shape == (BATCH, 10)


def test_imagenet_cnn5_is_alexnet():
    net = compiled("imagenet_cnn5")
    assert sum(layer.params for layer in net.trunk) == 60_965_224  # bvlc_alexnet's parameter count
    assert str(net.layer("conv1").out_shape) == "96x55x55"
    assert str(net.layer("pool5").out_shape) == "256x6x6"
    assert [net.layer(n).ops[0].attrs.groups for n in ("conv1", "conv2", "conv3", "conv4", "conv5")] == [1, 2, 1, 2, 2]
    assert len(conv_layers(net)) == 5 and not net.branches
    fc6 = net.layer("fc6").ops[0].attrs.init
    assert (fc6.std, fc6.bias) == (0.005, 0.1)


def test_small_specs_fit_a_cpu_budget():
    for stem in ("fmnist_cnn5", "fmnist_cnn8", "fmnist_cnds8", "fmnist_cnds13", "fmnist_dsn8"):
        net = compiled(stem)
        total = sum(layer.flops for layer in net.all_layers())
        assert total < 40e6, f"{stem}: {total / 1e6:.1f} MFLOPs per image"


@pytest.mark.parametrize("stem", ["imagenet_cnn5", "imagenet_cnds13"])
def test_standalone_imagenet_specs_preprocess_like_places(stem):
    """Caffe-style models share one input convention; a derived spec inherits it, these restate it."""
    assert compiled(stem).data == compiled("places_cnds8").data
