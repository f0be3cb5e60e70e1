"""Training throughput paths give the plain path's results: batched in-memory batches, the fused/foreach
optimiser, device-side metrics, and the speed options (--channels-last, --compile, --precision, loader
workers with prefetch), each within a stated tolerance."""

import shutil

import numpy as np
import pytest
import torch

from cnds_compiler import compile_spec, compile_text
from cnds_compiler.backends.pytorch import Dropout, build_module
from cnds_compiler.data import collate_batch, load_source, make_loader, mix_seed, mix_seed_array
from cnds_compiler.train.evaluate import evaluate, topk_error_counts, topk_errors
from cnds_compiler.train.optim import make_optimizer
from cnds_compiler.train.state import align_optimizer_state
from cnds_compiler.train.trainer import GlobalBatchSampler, RunOptions, Trainer, default_channels_last

from .conftest import SPECS

# 1x8x8 digits net with a branch and no dropout: every run differing only in a speed option is comparable
TINY = """
network tiny_speed
input 1x8x8
classes 10
init kaiming(bias=0.01)
c1: conv2d(8, 3, pad=1) relu
c2: conv2d(16, 3, pad=1) relu
p: maxpool(2)
c3: conv2d(16, 3, pad=1) relu
g: gap
fc: linear(classes)
supervise c2 weight 0.3 decay linear { g: gap; l: linear(classes) }
data { mean 0.5  std 0.5 }
train { epochs 1  batch 32  lr 0.05  momentum 0.9  weight_decay 5e-4 }
"""


def tiny(extra: str = ""):
    return compile_text(TINY + extra, "tiny_speed.cnds")


# ---- batched in-memory access ---------------------------------------------------------------------


def test_mix_seed_array_equals_mix_seed():
    values = np.array([0, 1, 7, 1436, 2**31 + 5, 2**63 + 11, 2**64 - 1], dtype=np.uint64)
    got = mix_seed_array(mix_seed(3, 9), values, 0xA06)
    assert [int(v) for v in got] == [mix_seed(3, 9, int(v), 0xA06) for v in values]


@pytest.mark.parametrize("data", ["", "data { mirror true }", "data { resize 12  mirror true }",
                                  "data { resize 11 }"], ids=["plain", "mirror", "crop-mirror", "crop"])
@pytest.mark.parametrize("ten_crop", [False, True], ids=["", "ten-crop"])
def test_batched_access_equals_per_sample_access(data, ten_crop):
    net = tiny(data)
    splits = load_source("digits", net, ten_crop=ten_crop)
    for ds in (splits.train, splits.val):
        ds.set_epoch(5, seed=17)
        indices = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[:48].tolist()
        batch = ds.__getitems__(indices)
        images, labels, skipped = collate_batch([ds[i] for i in indices])
        assert torch.equal(batch.images, images) and torch.equal(batch.labels, labels)
        assert batch.images.is_contiguous() and skipped == 0
    if "mirror" in data:  # augmentation really happened: some samples flipped, some not
        ds = splits.train
        _, _, flip = ds._crop_boxes(torch.arange(64))
        assert 0 < int(flip.sum()) < 64


def test_loader_yields_the_samplers_order_in_batches():
    net = tiny("data { resize 12  mirror true }")
    ds = load_source("digits", net).train
    sampler = GlobalBatchSampler(len(ds), 32, seed=4, epoch=2)
    loader = make_loader(ds, 32, shuffle=False, seed=4, drop_last=True, sampler=sampler)
    loader.set_epoch(2)
    order = list(sampler)
    ds.set_epoch(2, 4)
    for k, (images, labels, skipped) in enumerate(loader):
        ref = collate_batch([ds[i] for i in order[32 * k: 32 * (k + 1)]])
        assert torch.equal(images, ref[0]) and torch.equal(labels, ref[1]) and skipped == 0
    assert k == len(ds) // 32 - 1


# ---- optimiser and metrics ---------------------------------------------------------------------


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fast_update_path_matches_the_per_tensor_loop_and_skips_an_idle_branch(optimizer):
    net = tiny(f"train {{ optimizer {optimizer} }}")
    fast_model, loop_model = build_module(net, seed=0), build_module(net, seed=0)
    fast = make_optimizer(fast_model, net.train)
    loop = make_optimizer(loop_model, net.train, update={"foreach": False})
    assert fast.defaults.get("fused") or fast.defaults.get("foreach")
    before = {n: p.detach().clone() for n, p in fast_model.named_parameters()}
    for step in range(4):
        for model, opt in ((fast_model, fast), (loop_model, loop)):
            _grads(model, step)
            opt.step()
    mid = {}
    for (name, a), b in zip(fast_model.named_parameters(), loop_model.parameters(), strict=True):
        # Stated tolerance: the fused kernel rounds in another order than the loop (1-ulp differences)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        mid[name] = a.detach().clone()
        assert not torch.equal(a, before[name])
    # two steps with the branch idle (α = 0: not computed, no gradient): it does not move at all (no
    # momentum, no weight decay), the trunk does
    branch = {id(p) for p in fast_model.head_parameters("c2")}
    for step in range(2):
        _grads(fast_model, 10 + step)
        for p in fast_model.head_parameters("c2"):
            p.grad = None
        fast.step()
    for name, p in fast_model.named_parameters():
        assert torch.equal(p, mid[name]) == (id(p) in branch), name


def test_device_side_topk_counts_and_evaluate_match_the_host_counts():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(300, 10, generator=g), torch.randint(0, 10, (300,), generator=g)
    counts = topk_error_counts(logits, labels)
    assert counts.dtype == torch.int64 and counts.tolist() == topk_errors(logits, labels)
    top = logits.argsort(1, descending=True)
    assert counts.tolist() == [int((top[:, :k] != labels[:, None]).all(1).sum()) for k in (1, 5)]
    net = tiny()
    model = build_module(net, seed=0)
    loader = make_loader(load_source("digits", net).val, 50, shuffle=False)
    stats = {}
    top1, top5, skipped = evaluate(model, loader, torch.device("cpu"), model.branch_names, stats=stats)
    images = torch.cat([x for x, _, _ in loader])
    labels = torch.cat([y for _, y, _ in loader])
    with torch.no_grad():
        out = model.eval()(images, branches=model.branch_names)
    n = len(labels)
    assert top1["main"] == topk_errors(out.logits, labels)[0] / n
    assert top5["c2"] == topk_errors(out.aux["c2"], labels)[1] / n
    assert skipped == 0 and stats["nonfinite"] == 0


@pytest.mark.parametrize("buffer_layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_optimizer_buffers_follow_their_parameters_layout(buffer_layout):
    """torch's fused CPU SGD reads a momentum buffer with its parameter's strides: a buffer left in the other
    layout (a run resumed in another one) is applied scrambled unless aligned first."""
    def two_steps(fused: bool, align: bool) -> torch.Tensor:
        start = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
        other = torch.channels_last if buffer_layout is torch.contiguous_format else torch.contiguous_format
        p = torch.nn.Parameter(start.contiguous(memory_format=other))
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-3,
                              **({"fused": True} if fused else {"foreach": False}))
        g = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
        p.grad = g.contiguous(memory_format=other)
        opt.step()
        state = opt.state[p]
        state["momentum_buffer"] = state["momentum_buffer"].contiguous(memory_format=buffer_layout)
        if align:
            align_optimizer_state(opt)
            assert state["momentum_buffer"].stride() == p.stride()
        p.grad = (2 * g).contiguous(memory_format=other)
        opt.step()
        return p.detach().contiguous()

    loop = two_steps(fused=False, align=False)  # the per-tensor loop indexes by coordinates: the reference
    assert torch.equal(two_steps(fused=True, align=True), loop)
    assert not torch.allclose(two_steps(fused=True, align=False), loop, atol=1e-2)  # unaligned: scrambled


# ---- CPU dropout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
def test_cpu_dropout_keeps_a_1_minus_p_fraction_scaled_and_its_gradient_flows_through_the_kept_only(p):
    torch.manual_seed(0)
    drop = Dropout(p).train()
    x = (torch.rand(1000, 1000) + 0.5).requires_grad_()  # no zeros: y == 0 exactly where dropped
    y = drop(x)
    kept = y != 0
    sigma = (p * (1 - p) / kept.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma  # Bernoulli(1 - p), as nn.Dropout
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert torch.equal(y[kept], x[kept] * scale)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad[kept], g[kept] * scale) and not x.grad[~kept].any()
    # rows and columns are not correlated: every row keeps about 1 - p of its values
    per_row = kept.float().mean(1)
    assert (per_row - (1 - p)).abs().max() < 6 * (p * (1 - p) / 1000) ** 0.5


def test_cpu_dropout_follows_the_seed_and_is_the_identity_in_eval():
    drop = Dropout(0.5).train()
    x = torch.rand(64, 128) + 0.5
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    b = drop(x)
    assert torch.equal(a, b) and not torch.equal(drop(x), a)  # torch's generator: seeds and resumes repeat
    torch.set_rng_state(state)
    assert torch.equal(drop(x), a)
    assert drop.eval()(x) is x
    assert Dropout(0.5).train()(x.bfloat16()).dtype == torch.bfloat16


def test_built_networks_use_the_cpu_dropout():
    model = build_module(compile_spec(SPECS / "fmnist_cnds8.cnds"), seed=0)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 4 and all(type(m) is Dropout for m in drops)  # fc6, fc7 and the branch's fc1, fc2


# ---- speed options vs the plain path -------------------------------------------------------------


def _run(tmp_path, name, net=None, steps=6, data="digits", **options):
    """Train a few steps in this process; the final weights and the trainer."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # each run chooses its own precision
    net = net or tiny()
    opts = RunOptions(data=data, out_dir=tmp_path / name, cpu=True, progress=False, limit_train=256,
                      limit_val=64, max_steps=steps, **options)
    trainer = Trainer(net, net.train, opts)
    history = trainer.run()
    model = trainer.acc.unwrap_model(trainer.model)
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}, history, trainer


def _drift(a, b, init):
    """Largest difference between two runs per tensor, as a fraction of how far training moved it."""
    worst = 0.0
    for k in a:
        moved = float((a[k] - init[k]).abs().max())
        if moved > 0:
            worst = max(worst, float((a[k] - b[k]).abs().max()) / moved)
    return worst


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("plain"), "plain")


def _initial():
    return {k: v.float() for k, v in build_module(tiny(), seed=0).state_dict().items()}


def test_plain_run_is_reproducible_and_learns(plain, tmp_path):
    weights, history, _ = plain
    again, history2, _ = _run(tmp_path, "again")
    assert all(torch.equal(weights[k], again[k]) for k in weights)  # the same run twice: bit-identical
    assert history[0]["train_loss"] == history2[0]["train_loss"]
    assert set(history[0]["train_loss"]) == {"main", "c2"}
    assert all(not torch.equal(weights[k], v) for k, v in _initial().items() if k.endswith("weight"))


def test_cpu_trains_channels_last_by_default_and_matches_the_contiguous_layout(plain, tmp_path):
    weights, history, default = plain
    assert default.channels_last  # the default on CPU (default_channels_last)
    conv = default.acc.unwrap_model(default.model).get_submodule("c2").weight  # 8 input channels: layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    nchw, history2, trainer = _run(tmp_path, "nchw", channels_last=False)
    conv = trainer.acc.unwrap_model(trainer.model).get_submodule("c2").weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    # Stated tolerance: other convolution kernels, other rounding; measured 4e-6 of the movement, bound 1e-3
    drift = _drift(weights, nchw, _initial())
    assert 0 < drift < 1e-3  # > 0: the two runs really took different kernels
    assert history2[0]["train_loss"]["main"] == pytest.approx(history[0]["train_loss"]["main"], rel=1e-4)


def test_default_layout_is_channels_last_on_cpu_only():
    assert default_channels_last(torch.device("cpu"))
    assert not default_channels_last(torch.device("cuda", 0))


def test_bf16_gives_the_plain_result_within_bf16_rounding(plain, tmp_path):
    weights, history, _ = plain
    bf16, history2, trainer = _run(tmp_path, "bf16", mixed_precision="bf16")
    assert trainer.acc.mixed_precision == "bf16"
    assert all(v.dtype == torch.float32 for v in trainer.acc.unwrap_model(trainer.model).state_dict().values())
    # Stated tolerance: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation); after 6 SGD
    # steps the weights differ by 2.6% of how far training moved them (measured; bound 10%), the losses
    # by less than 0.01% (bound 2%).
    drift = _drift(weights, bf16, _initial())
    assert 0 < drift < 0.10  # > 0: autocast really ran in bf16
    assert history2[0]["train_loss"]["main"] == pytest.approx(history[0]["train_loss"]["main"], rel=0.02)


def test_image_folder_workers_with_prefetch_give_the_in_process_result(tmp_path):
    from cnds_compiler.train.synthetic import make_imagefolder

    root = make_imagefolder(tmp_path / "imgs", classes=3, per_class=12, size=(20, 20), val_per_class=2)
    net = compile_text(TINY.replace("input 1x8x8", "input 3x16x16").replace("classes 10", "classes 3")
                       .replace("data { mean 0.5  std 0.5 }", "data { resize 18  mirror true }")
                       .replace("batch 32", "batch 8"), "rgb.cnds")
    data = f"imagefolder:{root}"
    main, _, _ = _run(tmp_path, "main", net=net, data=data, steps=4)
    workers, _, _ = _run(tmp_path, "workers", net=net, data=data, steps=4, workers=2, prefetch=3)
    assert all(torch.equal(main[k], workers[k]) for k in main)  # the same samples, crops and flips: exact


# The smallest net with a branch: Inductor's first compilation (C++ kernels) costs ~25 s on 2 busy cores
MICRO = """
network micro
input 1x8x8
classes 10
init kaiming(bias=0.01)
c1: conv2d(4, 3, pad=1) relu
g: gap
fc: linear(classes)
supervise c1 weight 0.3 { g: gap; l: linear(classes) }
data { mean 0.5  std 0.5 }
train { epochs 1  batch 32  lr 0.05  momentum 0.9  weight_decay 5e-4 }
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compile_gives_the_plain_result(tmp_path, capsys):
    net = compile_text(MICRO, "micro.cnds")
    weights, history, _ = _run(tmp_path, "plain", net=net, steps=4)
    compiled, history2, trainer = _run(tmp_path, "compiled", net=net, steps=4, compile=True)
    assert trainer.compile_seconds is not None and trainer.compile_seconds > 0
    assert "torch.compile: the first step" in capsys.readouterr().out
    assert set(history2[0]["train_loss"]) == {"main", "c1"}  # the branch ran through the compiled module
    # Stated tolerance: Inductor fuses and reorders float operations; measured 1e-6 of the movement, bound 1e-3
    init = {k: v.float() for k, v in build_module(net, seed=0).state_dict().items()}
    assert _drift(weights, compiled, init) < 1e-3
    assert history2[0]["train_loss"]["main"] == pytest.approx(history[0]["train_loss"]["main"], rel=1e-4)


# ---- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp16", "--cpu"], "--precision fp16 needs a CUDA GPU"),
    (["--prefetch", "4", "--cpu"], "--prefetch needs loader worker processes"),
], ids=["fp16-on-cpu", "prefetch-without-workers"])
def test_unsupported_speed_options_are_refused_in_one_line(tmp_path, capsys, args, message):
    from cnds_compiler.train.cli import train_main

    code = train_main([str(SPECS / "digits_cnds8.cnds"), "--epochs", "1", "--limit-train", "64", "--no-progress",
                       "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "last.pt").exists()


def test_precision_flag_values(capsys):
    from cnds_compiler.train.cli import _train_parser

    parse = _train_parser().parse_args
    assert parse(["s.cnds"]).mixed_precision == "no"
    assert parse(["s.cnds", "--precision", "fp32"]).mixed_precision == "no"
    assert parse(["s.cnds", "--precision", "bf16"]).mixed_precision == "bf16"
    assert parse(["s.cnds", "--mixed-precision", "fp16"]).mixed_precision == "fp16"  # the older spelling
    with pytest.raises(SystemExit) as e:
        parse(["s.cnds", "--precision", "fp8"])
    assert e.value.code == 2 and "choose fp32, bf16 or fp16" in capsys.readouterr().err


def test_the_layout_flag_is_three_way_on_the_command_line():
    from cnds_compiler.train.cli import _train_parser

    def layout(*flags):
        return _train_parser().parse_args(["spec.cnds", "--out", "run", *flags]).channels_last

    assert layout() is None  # the trainer decides: channels-last on CPU, the checkpoint's on --resume
    assert layout("--channels-last") is True and layout("--no-channels-last") is False
