"""Training throughput, measured side by side in one run (interleaved rounds, medians, ratios).

1. The trainer's epoch loop (``Trainer._epoch``: loader, Accelerate, deep-supervision loss, optimiser,
   metrics) against a minimal hand-written loop over the trainer's own model and optimiser, the same loss,
   batch and data (a tensor indexed with a permutation), per step; goal ≤ 1.03×. Digits, Fashion-MNIST and
   the 227² ImageNet CNDS-8 (random in-memory images: the loop's cost, not JPEG decoding). A control times
   the hand loop on a second instance of the net: the spread between two identical instances.
2. A CNDS-8 training step with its branch against CNN-8 (the same trunk, no branch); goal ≤ 1.05×.
   Also with torch's per-tensor optimiser loop, to show what the fused update saves.
3. Each speed option (channels-last, bf16 autocast, both, torch.compile) against the plain fp32 step,
   with the compile time.
4. images/s of the imagefolder loader (JPEG decode + crop + mirror in worker processes) against the
   227² CNDS-8's training rate.
5. The branch alone on the small nets (forward + backward from its tap), and its pooling in NCHW against
   channels-last layout: where a small net's branch time goes; the branch's fixed cost (at batch 1) against
   the CNN-8 step, the floor no op-by-op branch gets below, and the digits pair compiled (fused ops);
   dropout, torch's against cnds' CPU kernel.
6. The layout cnds-train chooses on CPU (channels-last) against contiguous NCHW, per training step, for
   every shipped kind of network (chains, inception, residual; 8x8 to 227²): the figures behind that default.

Parts 1 and 2 run in the layout cnds-train uses on the device (``default_channels_last``); part 3's "plain"
step is contiguous fp32, the baseline each option is measured against.

    python -m benchmarks.train_bench [--quick] [--no-compile] [--threads N] [--only 1,2,3,4,5,6] [--json out.json]

Freed memory is kept for reuse as under cnds-train (``CNDS_ALLOCATOR``; ``benchmarks/alloc_bench.py``
measures that setting's own effect).

The step functions take a device, so ``benchmarks/train_gpu.py`` reuses them on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cnds_compiler.threads import configure_allocator

ALLOCATOR = configure_allocator()  # as cnds-train does, before torch allocates anything

import torch  # noqa: E402

from cnds_compiler import compile_spec  # noqa: E402
from cnds_compiler.backends.pytorch import build_module  # noqa: E402
from cnds_compiler.train.loss import alphas, deep_supervision_loss, head_loss  # noqa: E402
from cnds_compiler.train.optim import make_optimizer  # noqa: E402
from cnds_compiler.train.trainer import default_channels_last  # noqa: E402

SPECS = Path(__file__).resolve().parent.parent / "specs"
CPU = torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device = CPU) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _timed_both(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a loaded machine the CPU time moves far less with
    the other processes' load than the wall time does."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device = CPU,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` rounds; every round runs each function once, in
    turn, so all of them see the same machine state."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


# ---- training steps --------------------------------------------------------------------------------


def stepper(spec: str, batch: int, device: torch.device = CPU, *, channels_last: bool | None = None,
            precision: str = "fp32", compile: bool = False, update: dict | None = None,
            classes: int | None = None) -> Callable[[], None]:
    """One training step (forward with every branch, eq. 1 loss, backward, optimiser step) on fixed
    random data, as the trainer runs it with the same options (``channels_last=None``: the trainer's
    default layout for the device). ``step(branches_on=False)`` steps the same model with its branches off,
    as the trainer does for a branch whose α is 0: the trunk alone, its loss and update."""
    if channels_last is None:
        channels_last = default_channels_last(device)
    net = compile_spec(SPECS / spec)
    if classes is not None:
        net = replace(net, num_classes=classes, class_names=())
    model = build_module(net, seed=0).train().to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    opt = make_optimizer(model, net.train, update)
    c, h, w = net.input.dims
    x = torch.randn(batch, c, h, w, device=device).to(memory_format=memory_format)
    y = torch.randint(0, net.num_classes, (batch,), device=device)
    weights = alphas(net, 0, net.train.epochs)
    branches = tuple(weights)
    forward = torch.compile(model) if compile else model
    autocast = (torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
                if precision != "fp32" else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(branches_on: bool = True) -> None:
        with autocast:
            out = forward(x, branches=branches if branches_on else ())
        loss, _ = deep_supervision_loss(net, out.logits, out.aux, y, weights)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def branch_cost(pairs, rounds: int, device: torch.device = CPU) -> list[dict]:
    """CNDS-8 (branch on) vs CNN-8 step for each (cnds spec, cnn spec, batch) in the trainer's layout with
    the fused update, and vs the same CNDS-8 model stepped with its branch off (one instance: two built
    alike differ by several percent here, part 1's control); on CPU also in contiguous layout and with
    torch's per-tensor loop."""
    results = []
    for a, b, batch in pairs:
        cnds = stepper(a, batch, device)
        fns = {"cnds": cnds, "cnn": stepper(b, batch, device), "cnds_trunk": lambda s=cnds: s(branches_on=False)}
        if device.type == "cpu":
            fns["cnds_nchw"] = stepper(a, batch, device, channels_last=False)
            fns["cnn_nchw"] = stepper(b, batch, device, channels_last=False)
            fns["cnds_loop"] = stepper(a, batch, device, update={"foreach": False})
            fns["cnn_loop"] = stepper(b, batch, device, update={"foreach": False})
        # two warm-up rounds: with memory kept for reuse, the heap of four 227² models in one process still
        # grows (and faults) through the second step (alloc_bench; RESULTS.md)
        t = interleaved(fns, rounds, device, warmup=2)
        res = {"cnds": a, "cnn": b, "batch": batch, "rounds": rounds, "channels_last": default_channels_last(device),
               "cnds_ms": t["cnds"] * 1e3, "cnn_ms": t["cnn"] * 1e3, "ratio": t["cnds"] / t["cnn"],
               "ratio_same_instance": t["cnds"] / t["cnds_trunk"]}
        if "cnds_nchw" in t:
            res["ratio_contiguous"] = t["cnds_nchw"] / t["cnn_nchw"]
        if "cnds_loop" in t:
            res["ratio_per_tensor_loop"] = t["cnds_loop"] / t["cnn_loop"]
            res["fused_over_loop_cnds"] = t["cnds"] / t["cnds_loop"]
        results.append(res)
    return results



def branch_profile(cnds: str, cnn: str, batch: int, steps: int = 5, top: int = 6) -> dict:
    """Where a branch's step time goes: torch profiler self CPU time per op (the calling thread; intra-op
    worker threads are not counted), CNDS-8 minus CNN-8 per step, largest first, next to the branch's share
    of the IR's forward FLOPs."""
    from torch.profiler import ProfilerActivity, profile

    per_op = {}
    for spec in (cnds, cnn):
        step = stepper(spec, batch)
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        per_op[spec] = {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}
    a, b = per_op[cnds], per_op[cnn]
    diff = sorted(((a.get(k, 0.0) - b.get(k, 0.0), k) for k in set(a) | set(b)), reverse=True)[:top]
    net = compile_spec(SPECS / cnds)
    main = net.main_nodes()
    trunk_flops = sum(n.flops or 0 for n in net.nodes if n.name in main)
    branch_flops = sum(n.flops or 0 for n in net.nodes if n.name not in main)
    return {"cnds": cnds, "cnn": cnn, "batch": batch, "cnds_ms": sum(a.values()), "cnn_ms": sum(b.values()),
            "top": [{"op": k, "extra_ms": d, "cnds_ms": a.get(k, 0.0), "cnn_ms": b.get(k, 0.0)} for d, k in diff],
            "branch_flop_share": branch_flops / max(trunk_flops, 1)}

def _branch_modules(net, model: torch.nn.Module) -> tuple[list[torch.nn.Module], tuple[int, ...]]:
    """The modules of the net's one branch, in order, and the shape of its tap value (no batch)."""
    (head,) = [h for h in net.heads if h.name != "main"]
    tap = next(n for n in net.nodes if n.name == head.tap)
    return list(getattr(model.aux, head.name).children()), tuple(tap.out_shape.dims)


def _run_branch(mods: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    for m in mods:
        x = m(torch.flatten(x, 1) if isinstance(m, torch.nn.Linear) and x.dim() > 2 else x)
    return x


def branch_floor(cnds: str, cnn: str, batch: int, rounds: int = 200) -> dict:
    """What running the branch's operations one at a time costs before any arithmetic: the branch's forward,
    its α-weighted loss and backward from a random tap value at batch 1 (almost no arithmetic left: the fixed
    cost of each op and autograd node) and at ``batch``, against CNN-8's whole training step at ``batch``, in
    the trainer's layout; medians, interleaved. Where the batch-1 branch alone exceeds 5 % of the CNN-8 step,
    an eager (op-by-op) branch cannot meet the ≤ 1.05× goal on this machine."""
    net = compile_spec(SPECS / cnds)
    layout = torch.channels_last if default_channels_last(CPU) else torch.contiguous_format
    model = build_module(net, seed=0).train().to(memory_format=layout)
    mods, tap = _branch_modules(net, model)
    (branch,) = net.branches
    alpha = alphas(net, 0, net.train.epochs)[branch.name]

    def branch_step(n: int) -> Callable[[], None]:
        x = torch.randn(n, *tap).to(memory_format=layout).requires_grad_()
        y = torch.randint(0, net.num_classes, (n,))

        def run() -> None:
            model.aux.zero_grad(set_to_none=True)  # as a training step: its backward assigns, not adds
            (alpha * head_loss(branch.loss, _run_branch(mods, x), y)).backward()
        return run

    t = interleaved({"floor": branch_step(1), "branch": branch_step(batch), "cnn": stepper(cnn, batch)}, rounds,
                    warmup=5)
    return {"cnds": cnds, "cnn": cnn, "batch": batch, "rounds": rounds, "branch_batch1_ms": t["floor"] * 1e3,
            "branch_ms": t["branch"] * 1e3, "cnn_step_ms": t["cnn"] * 1e3, "floor_share": t["floor"] / t["cnn"],
            "branch_share": t["branch"] / t["cnn"]}


def compiled_branch_cost(cnds: str, cnn: str, batch: int, rounds: int) -> dict:
    """The CNDS-8 / CNN-8 step ratio with both nets compiled (torch.compile fuses the branch's small ops into
    a few kernels) next to the eager ratio, the compiled step against the eager one, and the compile time."""
    fns, compile_s = {}, {}
    for spec in (cnds, cnn):
        fns[spec, False] = stepper(spec, batch)
        fns[spec, True] = stepper(spec, batch, compile=True)
        compile_s[spec] = _timed(fns[spec, True])  # the first call compiles
    t = interleaved(fns, rounds, warmup=2)
    return {"cnds": cnds, "cnn": cnn, "batch": batch, "rounds": rounds,
            "ratio_eager": t[cnds, False] / t[cnn, False], "ratio_compiled": t[cnds, True] / t[cnn, True],
            "compiled_over_eager": t[cnds, True] / t[cnds, False], "compile_s": compile_s[cnds]}


def branch_kernels(spec: str, batch: int, rounds: int = 50) -> dict:
    """The branch of ``spec`` on its own: forward + backward of its modules from a random tap value (median
    ms over ``rounds``), and its first (pooling) module forward + backward as is and in channels-last
    layout (the faster CPU pooling kernel, paid for with two layout copies), with whether both agree
    bit for bit."""
    net = compile_spec(SPECS / spec)
    model = build_module(net, seed=0).train()
    mods, tap = _branch_modules(net, model)
    x = torch.randn(batch, *tap, requires_grad=True)
    pool = mods[0]

    def branch_out(channels_last: bool) -> torch.Tensor:
        return _run_branch(mods, x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    def run_branch(channels_last: bool = False):
        def run():
            model.aux.zero_grad(set_to_none=True)
            x.grad = None
            branch_out(channels_last).sum().backward()
        return run

    def run_pool(channels_last: bool):
        def run():
            inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            y = pool(inp)
            y.backward(torch.ones_like(y))
            return y
        return run

    x.grad = None
    a = run_pool(False)().detach().contiguous()
    ga, x.grad = x.grad.clone(), None
    b = run_pool(True)().detach().contiguous()
    same = torch.equal(a, b) and torch.equal(ga, x.grad)
    model.eval()  # no dropout: the two layouts' outputs are comparable
    with torch.no_grad():
        branch_diff = (branch_out(False) - branch_out(True)).abs().max().item()
    model.train()
    t = interleaved({"branch": run_branch(), "branch_cl": run_branch(True), "pool": run_pool(False),
                     "pool_cl": run_pool(True)}, rounds)
    return {"spec": spec, "batch": batch, "tap": list(tap), "branch_ms": t["branch"] * 1e3,
            "branch_channels_last_ms": t["branch_cl"] * 1e3, "branch_max_abs_diff": branch_diff,
            "pool_ms": t["pool"] * 1e3, "pool_channels_last_ms": t["pool_cl"] * 1e3, "pool_bit_identical": same}


def dropout_kernels(shapes=((128, 128), (128, 256), (16, 4096), (128, 1024)), rounds: int = 60) -> list[dict]:
    """Dropout (p 0.5) forward + backward, torch's ``nn.Dropout`` against cnds' CPU ``Dropout``, for the
    small nets' fc shapes and the 227² nets' fc6/fc7 at batch 16."""
    from cnds_compiler.backends.pytorch import Dropout

    results = []
    for shape in shapes:
        x = torch.randn(*shape, requires_grad=True)
        mods = {"torch": torch.nn.Dropout(0.5).train(), "cnds": Dropout(0.5).train()}

        def run(m, x=x):  # bound now: the closures run before the loop moves on
            def go():
                x.grad = None
                m(x).sum().backward()
            return go

        t = interleaved({k: run(m) for k, m in mods.items()}, rounds, warmup=3)
        results.append({"shape": list(shape), "torch_ms": t["torch"] * 1e3, "cnds_ms": t["cnds"] * 1e3,
                        "ratio": t["cnds"] / t["torch"]})
    return results


OPTIONS = {
    "channels_last": dict(channels_last=True),
    "bf16": dict(precision="bf16", channels_last=False),
    "bf16+channels_last": dict(precision="bf16", channels_last=True),
    "compile": dict(compile=True, channels_last=False),
    "bf16+channels_last+compile": dict(precision="bf16", channels_last=True, compile=True),
}
"""Each option alone or combined, against the plain step: fp32, contiguous, eager."""


def speed_options(spec: str, batch: int, rounds: int, device: torch.device = CPU, compile: bool = True,
                  options: tuple[str, ...] = tuple(OPTIONS), classes: int | None = None) -> dict:
    """Step time of every option against the plain fp32 step; the first compiled call's time."""
    fns = {"plain": stepper(spec, batch, device, channels_last=False, classes=classes)}
    compile_seconds = {}
    for name in options:
        kw = OPTIONS[name]
        if kw.get("compile") and not compile:
            continue
        fns[name] = stepper(spec, batch, device, classes=classes, **kw)
        if kw.get("compile"):
            compile_seconds[name] = _timed(fns[name], device)  # the first call compiles
    t = interleaved(fns, rounds, device)
    return {"spec": spec, "batch": batch, "rounds": rounds, "device": str(device),
            "ms": {k: v * 1e3 for k, v in t.items()},
            "images_per_s": {k: batch / v for k, v in t.items()},
            "ratio_to_plain": {k: v / t["plain"] for k, v in t.items() if k != "plain"},
            "compile_seconds": compile_seconds}


# ---- the trainer's loop against a hand-written one ------------------------------------------------


def _splits(spec: str, steps: int, batch: int):
    """(network, DataSplits) with ``steps`` batches of training data: the real digits / Fashion-MNIST,
    random uint8 images for the 227² nets."""
    from cnds_compiler.data import DataSplits, TensorImageDataset, _fit, load_source

    net = compile_spec(SPECS / spec)
    n = steps * batch
    if spec.startswith("digits"):
        return net, load_source("digits", net, limit_train=n, limit_val=batch)
    if spec.startswith("fmnist"):
        return net, load_source("fashion-mnist", net, limit_train=n, limit_val=batch)
    c, _, _ = net.input.dims
    rh, rw = _fit(net)["resize"]
    k = net.num_classes
    g = torch.Generator().manual_seed(0)
    sets = [TensorImageDataset(torch.randint(0, 256, (m, c, rh, rw), dtype=torch.uint8, generator=g),
                               torch.randint(0, k, (m,), generator=g), range(m), train=train, ten_crop=False,
                               strict=False, location="random", **_fit(net))
            for m, train in ((n, True), (batch, False))]
    return net, DataSplits(sets[0], sets[1], tuple(str(i) for i in range(k)), f"random {rh}x{rw}", "random")


def trainer_vs_hand(spec: str, batch: int, steps: int, rounds: int) -> dict:
    """Median per-step wall and CPU time of ``Trainer._epoch`` (validation set empty, so the epoch is its
    training loop and the loss reduction) and of a hand loop over the trainer's own model and optimiser, so
    the ratio is the loops' difference alone. A control runs the hand loop on a second, separately built
    instance of the same net: two identical instances differ by several percent on this VM (where their
    memory lies), which is why both loops share one."""
    from cnds_compiler.train.trainer import RunOptions, Trainer

    net, splits = _splits(spec, steps, batch)
    cfg = replace(net.train, batch=batch)

    class BenchTrainer(Trainer):
        def _load_data(self):
            self.data = splits

        def _val_loader(self):
            return []  # no validation: time the training loop alone

    with tempfile.TemporaryDirectory() as tmp:
        trainer = BenchTrainer(net, cfg, RunOptions(out_dir=Path(tmp), cpu=True, progress=False))
        trainer._load_data()
        trainer._build()

        # The hand loop: the same net, optimiser, loss and batch; the prepared images indexed with a
        # permutation, the spec's random crop (one offset per batch) and mirror done on the batch.
        layout = torch.channels_last if trainer.channels_last else torch.contiguous_format
        own = trainer.train_module, getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        other_model = build_module(net, seed=cfg.seed).train().to(memory_format=layout)
        other = other_model, make_optimizer(other_model, cfg)
        ds = splits.train
        images, labels = ds._data, ds.labels
        _, h, w = ds.out_shape
        weights = alphas(net, 0, cfg.epochs)
        branches = tuple(k for k, a in weights.items() if a > 0)
        g = torch.Generator().manual_seed(0)

        def hand_epoch(model=own[0], opt=own[1]) -> None:
            perm = torch.randperm(len(labels), generator=g)
            for i in range(steps):
                idx = perm[i * batch:(i + 1) * batch]
                x, y = images.index_select(0, idx), labels.index_select(0, idx)
                if ds.augments:
                    top = int(torch.randint(0, x.shape[-2] - h + 1, (), generator=g))
                    left = int(torch.randint(0, x.shape[-1] - w + 1, (), generator=g))
                    x = x[..., top:top + h, left:left + w]
                    if ds.mirror:
                        flip = torch.rand(len(y), generator=g) < 0.5
                        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
                out = model(x.contiguous(memory_format=layout), branches=branches)
                loss, _ = deep_supervision_loss(net, out.logits, out.aux, y, weights)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        def trainer_epoch() -> None:
            trainer._epoch(0)  # epoch 0 every time: the same α and learning rate

        def other_instance_epoch() -> None:
            hand_epoch(*other)

        loops = ((trainer_epoch, []), (hand_epoch, []), (other_instance_epoch, []))
        for fn, _ in loops:  # warm-up
            fn()
        for i in range(rounds):  # the order alternates: no loop always runs on another's warm caches
            for fn, times in loops[:: 1 if i % 2 == 0 else -1]:
                times.append(_timed_both(fn))
        trainer.acc.end_training()
    (wall_t, wall_h, wall_o), (cpu_t, cpu_h, _) = (
        [statistics.median(t[k] for t in times) / steps for _, times in loops] for k in (0, 1))
    return {"spec": spec, "batch": batch, "steps": steps, "rounds": rounds, "trainer_ms": wall_t * 1e3,
            "hand_ms": wall_h * 1e3, "ratio": wall_t / wall_h, "trainer_cpu_ms": cpu_t * 1e3,
            "hand_cpu_ms": cpu_h * 1e3, "cpu_ratio": cpu_t / cpu_h, "other_instance_ratio": wall_o / wall_h}


# ---- memory layout ----------------------------------------------------------------------------------

LAYOUT_NETS = (("digits_cnds8.cnds", 64), ("digits_resnet.cnds", 64), ("fmnist_cnds8.cnds", 128),
               ("fmnist_inception.cnds", 128), ("imagenet_cnds8.cnds", 4), ("imagenet_cnds8.cnds", 16),
               ("resnet18_cnds.cnds", 4), ("googlenet_cnds.cnds", 4))
"""Every kind of shipped network: chains, residual and inception blocks, 8x8 to 227² inputs."""


def layout_cost(spec: str, batch: int, rounds: int) -> dict:
    """Median training step (wall and CPU time) in channels-last and in contiguous layout, interleaved."""
    fns = {"channels_last": stepper(spec, batch, channels_last=True),
           "contiguous": stepper(spec, batch, channels_last=False)}
    for _ in range(2):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            w, c = _timed_both(fn)
            wall[k].append(w)
            cpu[k].append(c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"spec": spec, "batch": batch, "rounds": rounds, "channels_last_ms": med["channels_last"] * 1e3,
            "contiguous_ms": med["contiguous"] * 1e3, "ratio": med["channels_last"] / med["contiguous"],
            "cpu_ratio": med_cpu["channels_last"] / med_cpu["contiguous"],
            "round_ratios": [a / b for a, b in zip(wall["channels_last"], wall["contiguous"], strict=True)]}


# ---- loader against training -------------------------------------------------------------------


def loader_rate(batch: int, workers: int, images: int, prefetch: int | None = None, pin_memory: bool = False,
                device: torch.device = CPU) -> float:
    """images/s of the imagefolder loader over 256² JPEGs with the 227² CNDS-8's augmentation."""
    from cnds_compiler.data import load_source, make_loader
    from cnds_compiler.train.synthetic import make_imagefolder

    net = compile_spec(SPECS / "imagenet_cnds8.cnds")
    with tempfile.TemporaryDirectory() as tmp:
        make_imagefolder(tmp, classes=4, per_class=max(1, images // 4), size=(256, 256), val_per_class=1)
        small = replace(net, num_classes=4, class_names=())  # the generated tree has 4 classes
        data = load_source(f"imagefolder:{tmp}", small, seed=0)
        loader = make_loader(data.train, batch, shuffle=True, workers=workers, seed=0, drop_last=True,
                             prefetch=prefetch, pin_memory=pin_memory)
        n, start = 0, time.perf_counter()
        for epoch in range(2):
            loader.set_epoch(epoch)
            for x, _, _ in loader:
                x = x.to(device, non_blocking=pin_memory)
                n += x.shape[0]
        _sync(device)
        return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile options")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="1,2,3,4,5,6", help="comma list of the parts to run (default: all)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    parts = {int(x) for x in args.only.split(",")}
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else 9
    results: dict = {"threads": args.threads, "torch": torch.__version__, "allocator": ALLOCATOR}
    print(f"torch {torch.__version__}, {args.threads} threads, {rounds} interleaved rounds, medians; {ALLOCATOR}")
    if 1 in parts:
        trainer_part(results, rounds, args.quick)
    if 2 in parts:
        branch_part(results, rounds, args.quick)
    if 3 in parts or 4 in parts:  # the loader is compared with part 3's training rates
        options_part(results, rounds, args.no_compile)
    if 4 in parts:
        loader_part(results, args.quick)
    if 5 in parts:
        print("5. the branch alone (forward + backward from its tap), and its pooling in NCHW vs channels-last:")
        results["branch_kernels"] = [branch_kernels(spec, batch) for spec, batch in
                                     (("fmnist_cnds8.cnds", 128), ("digits_cnds8.cnds", 64))]
        for r in results["branch_kernels"]:
            print(f"  {r['spec']:<22} batch {r['batch']}, tap {'x'.join(map(str, r['tap']))}: branch "
                  f"{r['branch_ms']:.2f} ms, from a channels-last tap {r['branch_channels_last_ms']:.2f} ms (max "
                  f"|diff| {r['branch_max_abs_diff']:.1e}); its pooling {r['pool_ms']:.2f} ms, channels-last "
                  f"{r['pool_channels_last_ms']:.2f} ms (bit-identical: {r['pool_bit_identical']})")
        results["branch_floor"] = [branch_floor(a, b, batch) for a, b, batch in
                                   (("fmnist_cnds8.cnds", "fmnist_cnn8.cnds", 128),
                                    ("digits_cnds8.cnds", "digits_cnn8.cnds", 64))]
        for r in results["branch_floor"]:
            verdict = ("beyond the 5 % an eager branch may cost" if r["floor_share"] > 0.05
                       else "within the 5 % budget")
            print(f"  {r['cnds']:<22} branch + its loss, forward + backward: batch 1 {r['branch_batch1_ms']:.2f} ms "
                  f"(the ops' fixed cost), batch {r['batch']} {r['branch_ms']:.2f} ms; CNN-8 step "
                  f"{r['cnn_step_ms']:.2f} ms: floor {r['floor_share']:.1%} of it, {verdict}; branch "
                  f"{r['branch_share']:.1%}")
        if not args.no_compile:
            r = results["branch_compiled"] = compiled_branch_cost("digits_cnds8.cnds", "digits_cnn8.cnds", 64,
                                                                  rounds * 4)
            print(f"  {r['cnds']:<22} compiled: CNDS-8 / CNN-8 step {r['ratio_compiled']:.3f} (eager "
                  f"{r['ratio_eager']:.3f}); compiled / eager step {r['compiled_over_eager']:.3f}; first step "
                  f"(compilation) {r['compile_s']:.1f} s")
        results["dropout"] = dropout_kernels()
        for r in results["dropout"]:
            print(f"  dropout {'x'.join(map(str, r['shape'])):<9} forward + backward: torch {r['torch_ms']:.3f} ms, "
                  f"cnds {r['cnds_ms']:.3f} ms, ratio {r['ratio']:.2f}")
    if 6 in parts:
        layout_part(results, rounds, args.quick)
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def trainer_part(results: dict, rounds: int, quick: bool) -> None:
    print("1. trainer epoch loop vs a minimal hand-written loop (same model and optimiser objects, loss, batch), per step:")
    results["trainer_vs_hand"] = []
    for spec, batch, steps in (("digits_cnds8.cnds", 64, 22), ("fmnist_cnds8.cnds", 128, 8 if quick else 16),
                               ("imagenet_cnds8.cnds", 4, 2 if quick else 3)):
        r = trainer_vs_hand(spec, batch, steps, rounds if "imagenet" not in spec else max(3, rounds // 2))
        results["trainer_vs_hand"].append(r)
        print(f"  {spec:<22} trainer {r['trainer_ms']:8.2f} ms  hand {r['hand_ms']:8.2f} ms  (batch {batch}, "
              f"{steps} steps x {r['rounds']} rounds)  ratio {r['ratio']:.3f}  (goal <= 1.03); CPU time "
              f"{r['trainer_cpu_ms']:.2f} vs {r['hand_cpu_ms']:.2f} ms, ratio {r['cpu_ratio']:.3f}; control: the "
              f"hand loop on a second instance {r['other_instance_ratio']:.3f}")


def branch_part(results: dict, rounds: int, quick: bool) -> None:
    print("2. training step, CNDS-8 (branch on) vs CNN-8 (same trunk, no branch):")
    pairs = (("fmnist_cnds8.cnds", "fmnist_cnn8.cnds", 128), ("digits_cnds8.cnds", "digits_cnn8.cnds", 64))
    results["branch"] = branch_cost(pairs, rounds * 2)
    results["branch"] += branch_cost((("imagenet_cnds8.cnds", "imagenet_cnn8.cnds", 4),), max(3, rounds // 2))
    if not quick:  # batch 4 is dominated by the fc layers' weight traffic; 16 is nearer real use
        results["branch"] += branch_cost((("imagenet_cnds8.cnds", "imagenet_cnn8.cnds", 16),), 3)
    for r in results["branch"]:
        loop = (f"; per-tensor optimiser loop {r['ratio_per_tensor_loop']:.3f}, fused/loop step "
                f"{r['fused_over_loop_cnds']:.3f}") if "ratio_per_tensor_loop" in r else ""
        contiguous = f"; contiguous layout {r['ratio_contiguous']:.3f}" if "ratio_contiguous" in r else ""
        print(f"  {r['cnds']:<22} {r['cnds_ms']:8.1f} ms  vs {r['cnn']:<20} {r['cnn_ms']:8.1f} ms  (batch "
              f"{r['batch']}, {r['rounds']} rounds)  ratio {r['ratio']:.3f} (goal <= 1.05); the same model with "
              f"its branch off {r['ratio_same_instance']:.3f}{contiguous}{loop}")
    results["branch_profile"] = []
    for a, b, batch in pairs[:1]:
        prof = branch_profile(a, b, batch)
        results["branch_profile"].append(prof)
        print(f"  where {a}'s branch time goes (profiler, self CPU of the calling thread per step: "
              f"{prof['cnds_ms']:.1f} vs {prof['cnn_ms']:.1f} ms; the branch is {prof['branch_flop_share']:.1%} "
              "of the trunk's forward FLOPs):")
        for t in prof["top"]:
            print(f"    {t['op']:<28} +{t['extra_ms']:.2f} ms ({t['cnds_ms']:.2f} vs {t['cnn_ms']:.2f})")


def options_part(results: dict, rounds: int, no_compile: bool) -> None:
    print("3. speed options vs the plain fp32 step:")
    results["options"] = []
    for spec, batch, r_ in (("fmnist_cnds8.cnds", 128, rounds), ("imagenet_cnds8.cnds", 4, max(3, rounds // 3))):
        opts = tuple(OPTIONS) if "fmnist" in spec else ("channels_last", "bf16", "bf16+channels_last")
        res = speed_options(spec, batch, r_, compile=not no_compile, options=opts)
        results["options"].append(res)
        line = ", ".join(f"{k} {v:.3f}x" for k, v in res["ratio_to_plain"].items())
        comp = ", ".join(f"{k} {v:.1f} s" for k, v in res["compile_seconds"].items())
        print(f"  {spec} batch {batch}: plain {res['ms']['plain']:.1f} ms; step time / plain: {line}"
              + (f"; first compiled step (compilation): {comp}" if comp else ""))


def layout_part(results: dict, rounds: int, quick: bool) -> None:
    print("6. training step in channels-last vs contiguous (NCHW) layout, fp32:")
    results["layout"] = []
    for spec, batch in LAYOUT_NETS[:4] if quick else LAYOUT_NETS:
        r = layout_cost(spec, batch, rounds if batch >= 64 else max(3, rounds // 2))
        results["layout"].append(r)
        print(f"  {spec:<22} batch {batch:<3} channels-last {r['channels_last_ms']:8.1f} ms  contiguous "
              f"{r['contiguous_ms']:8.1f} ms  ratio {r['ratio']:.3f} (CPU time {r['cpu_ratio']:.3f}; rounds "
              f"{', '.join(f'{x:.2f}' for x in r['round_ratios'])})", flush=True)


def loader_part(results: dict, quick: bool) -> None:
    print("4. imagefolder loader vs CNDS-8 227x227 training:")
    images = 64 if quick else 192
    rates = {f"workers {w}" + (f", prefetch {pf}" if pf else ""): loader_rate(8, w, images, pf)
             for w, pf in ((0, None), (2, None), (2, 4))}
    train = next(r for r in results["options"] if "imagenet" in r["spec"])["images_per_s"]
    best = max(train.values())
    results["loader"] = {"loader_img_per_s": rates, "train_img_per_s": train}
    for k, v in rates.items():
        print(f"  loader ({k}): {v:.0f} img/s = {v / best:.1f}x the fastest training rate measured above "
              f"({best:.1f} img/s; plain fp32 {train['plain']:.1f} img/s)")


if __name__ == "__main__":
    main()
