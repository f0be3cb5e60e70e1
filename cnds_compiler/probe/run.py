"""Run the gradient probe: a few back-prop iterations of the trunk, every conv layer's mean |grad| recorded.

What one probe does (section 2 of the paper, with the choices the paper leaves open made explicit):

* **Network.** The spec's trunk with supervision only at the final layer (its branches removed), unless
  ``keep_branches`` (then the spec's branches train too, weighted by their α at epoch 0 — for checking
  what a placement does to the gradients).
* **Initialisation.** ``init="gaussian"`` (default, the rule's standard): every conv and linear weight
  N(0, ``std``²) with ``std`` 0.01, every bias ``bias`` (0; ``"spec"`` keeps each op's own bias value).
  ``init="spec"`` keeps the spec's own initialisation. Batch-norm layers keep their defaults.
* **Iterations.** ``iters`` (default 30) SGD steps with the spec's solver (``train { }``: optimizer,
  lr, momentum, weight decay, bias lr multiplier) on softmax cross-entropy, dropout active, in training
  mode; ``lr=0`` measures back-prop alone (no update: the weights stay at their initial values). The
  gradient is read after each backward pass, before the step.
* **Data.** ``batch_size`` examples per iteration (default: the spec's batch, at most 32) from a
  ``cnds-train --data`` source (training split, a seeded random subset of ``iters × batch_size``
  examples), or ``random``: pixels uniform in [0, 1] normalised with the spec's ``data`` mean/std, labels
  uniform over the spec's classes. A source with fewer classes than the spec (Fashion-MNIST's 10 for an
  ImageNet trunk) is fine: its labels are a subset of the spec's; resizing follows the spec's ``data``.
* **Measure.** For every trunk layer with a convolution, mean |∂L/∂W| over all elements of its conv
  weights, per iteration. Everything is seeded: the same arguments give the same numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import DataError, TrainingError
from ..ir import InitScheme, Network, OpKind, ParamInit
from .rule import DEFAULT_MIN_GAP, DEFAULT_THRESHOLD, Proposal, final_level, propose

RANDOM_SOURCE = "random"
DEFAULT_ITERS = 30
DEFAULT_STD = 0.01
MAX_DEFAULT_BATCH = 32


@dataclass(frozen=True)
class ProbeSettings:
    """How a probe ran (recorded with its result)."""

    iters: int = DEFAULT_ITERS
    batch_size: int | None = None
    """None: the spec's batch, at most 32."""
    init: str = "gaussian"
    """``gaussian`` (N(0, std²) weights, ``bias`` biases) or ``spec`` (the spec's own init)."""
    std: float = DEFAULT_STD
    bias: float | str = 0.0
    """A value for every bias, or ``"spec"`` to keep each op's own."""
    lr: float | None = None
    """None: the spec's learning rate; 0: no weight update."""
    data: str = RANDOM_SOURCE
    seed: int = 0
    keep_branches: bool = False

    def describe_init(self, net: Network | None = None) -> str:
        """E.g. ``N(0, 0.01²) weights, bias 0``; with ``init="spec"`` and ``net``, what the spec uses."""
        if self.init == "spec":
            return "the spec's init" + (f": {describe_spec_init(net)}" if net is not None else "")
        bias = "the spec's biases" if self.bias == "spec" else f"bias {float(self.bias):g}"
        return f"N(0, {self.std:g}²) weights, {bias}"


def _bias_order(b: str) -> tuple[bool, float]:
    return (b == "none", 0.0 if b == "none" else float(b))


def describe_spec_init(net: Network) -> str:
    """The initialisations a network's conv and linear ops use, e.g. ``N(0, 0.01²) weights, biases 0, 0.1, 1``."""
    weights, biases = [], []
    for layer in net.all_layers():
        for op in layer.ops:
            if op.kind in (OpKind.CONV2D, OpKind.LINEAR):
                init = op.attrs.init
                w = f"N(0, {init.std:g}²)" if init.scheme is InitScheme.GAUSSIAN else init.scheme.value.capitalize()
                if w not in weights:
                    weights.append(w)
                b = "none" if init.bias is None else f"{init.bias:g}"
                if b not in biases:
                    biases.append(b)
    return f"{'/'.join(weights)} weights, bias{'es' if len(biases) > 1 else ''} {', '.join(sorted(biases, key=_bias_order))}"


@dataclass
class ProbeResult:
    """Per-iteration mean |grad| of every conv layer, and what the rule makes of it."""

    network: str
    settings: ProbeSettings
    layers: tuple[str, ...]
    """Trunk layers with a convolution, input side first."""
    history: dict[str, list[float]]
    """Layer → mean |∂L/∂W| at iterations 1..iters."""
    losses: list[float]
    batch_size: int
    lr: float
    data_description: str
    seconds: float
    branches: tuple[str, ...] = ()
    """Branches trained alongside (``keep_branches``)."""
    init_description: str = ""
    """The initialisation in words (what ``settings.init`` meant for this network)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def levels(self) -> tuple[tuple[str, float], ...]:
        """(layer, level) in trunk order; the level is :func:`~cnds_compiler.probe.rule.final_level`."""
        return tuple((name, final_level(self.history[name])) for name in self.layers)

    def propose(self, threshold: float = DEFAULT_THRESHOLD, min_gap: int = DEFAULT_MIN_GAP) -> Proposal:
        return propose(self.levels(), threshold, min_gap)

    def records(self) -> list[dict]:
        """The history as ``cnds-train --grad-monitor``'s ``gradients.json`` records (step = iteration)."""
        return [
            {"step": i + 1, **{name: self.history[name][i] for name in self.layers}}
            for i in range(len(self.losses))
        ]

    def to_dict(self, proposal: Proposal | None = None) -> dict:
        doc = {
            "network": self.network,
            "settings": {k: getattr(self.settings, k) for k in ProbeSettings.__dataclass_fields__},
            "batch_size": self.batch_size,
            "lr": self.lr,
            "data": self.data_description,
            "init": self.init_description,
            "seconds": self.seconds,
            "branches": list(self.branches),
            "losses": self.losses,
            "gradients": self.records(),
        }
        if proposal is not None:
            doc["proposal"] = proposal.to_dict()
        return doc


# ---- the network the probe trains -------------------------------------------------------------------


def _reinit(op, std: float, bias: float | str):
    if op.kind not in (OpKind.CONV2D, OpKind.LINEAR):
        return op
    old = op.attrs.init
    if old.bias is None:
        new_bias = None
    else:
        new_bias = old.bias if bias == "spec" else float(bias)
    return replace(op, attrs=replace(op.attrs, init=ParamInit(InitScheme.GAUSSIAN, std, new_bias)))


def probe_network(net: Network, settings: ProbeSettings) -> Network:
    """The network the probe trains: trunk only (unless ``keep_branches``), initialised as asked."""
    probe_net = net if settings.keep_branches else net.without_branches()
    if settings.init == "spec":
        return probe_net
    if settings.init != "gaussian":
        raise ValueError(f"unknown init '{settings.init}' (gaussian or spec)")

    return replace(probe_net, nodes=tuple(_reinit(n, settings.std, settings.bias) for n in probe_net.nodes))


def conv_layers(net: Network) -> tuple[str, ...]:
    """Trunk layers that hold a convolution, in order."""
    return tuple(layer.name for layer in net.trunk if layer.is_conv)


# ---- data -----------------------------------------------------------------------------------------


def _per_channel(values: tuple[float, ...], default: float, c: int) -> list[float]:
    if not values:
        return [default] * c
    if len(values) == 1:
        return [float(values[0])] * c
    return [float(v) for v in values]


class _RandomBatches:
    """Uniform [0, 1] pixels normalised like the spec's data, uniformly random labels; seeded."""

    def __init__(self, net: Network, batch: int, seed: int) -> None:
        import torch

        self.net, self.batch = net, batch
        c = net.input.dims[0]
        mean = _per_channel(net.data.mean, 0.0, c)
        std = _per_channel(net.data.std, 1.0, c)
        if len(mean) != c or len(std) != c or any(s == 0 for s in std):
            raise DataError(f"the spec's data mean/std do not fit its {c} input channels")
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
        c, h, w = net.input.dims
        self.description = (f"random ({c}x{h}x{w} uniform pixels normalised with the spec's mean/std, "
                            f"labels uniform over {net.num_classes} classes)")

    def __iter__(self):
        import torch

        c, h, w = self.net.input.dims
        while True:
            x = (torch.rand(self.batch, c, h, w, generator=self.gen) - self.mean) / self.std
            y = torch.randint(0, self.net.num_classes, (self.batch,), generator=self.gen)
            yield x, y


def _source_classes(source: str) -> int | None:
    """How many classes a ``--data`` source has, when that is known without loading it."""
    from pathlib import Path

    kind, _, arg = source.partition(":")
    if kind in ("digits", "fashion-mnist"):
        return 10
    if kind == "imagefolder" and arg:
        train = Path(arg).expanduser() / "train"
        if train.is_dir():
            return sum(1 for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    return None


class _SourceBatches:
    """Batches of a ``cnds-train --data`` source's training split, cycling through epochs."""

    def __init__(self, net: Network, source: str, batch: int, iters: int, seed: int) -> None:
        from ..data import load_source, make_loader

        fit_net, note = net, ""
        k = _source_classes(source)
        if k is not None and k != net.num_classes:
            if k > net.num_classes:
                raise DataError(
                    f"the data source has {k} classes, more than the spec's {net.num_classes}; its labels "
                    "would not fit the classifier"
                )
            fit_net = replace(net, num_classes=k, class_names=())
            note = f"; its {k} labels used as classes 0..{k - 1} of the spec's {net.num_classes}"
        splits = load_source(source, fit_net, limit_train=batch * iters, seed=seed)
        if len(splits.train) < batch:
            raise DataError(f"the training split has {len(splits.train)} examples, fewer than one batch of {batch}")
        self.loader = make_loader(splits.train, batch, shuffle=True, seed=seed, drop_last=True)
        self.description = splits.description + note

    def __iter__(self):
        while True:
            got = False
            for images, labels, _skipped in self.loader:
                if images.shape[0]:
                    got = True
                    yield images, labels
            if not got:
                raise DataError("no readable training image")


def _batches(net: Network, settings: ProbeSettings, batch: int):
    if settings.data == RANDOM_SOURCE:
        return _RandomBatches(net, batch, settings.seed)
    return _SourceBatches(net, settings.data, batch, settings.iters, settings.seed)


# ---- the probe ------------------------------------------------------------------------------------


def run_probe(net: Network, settings: ProbeSettings = ProbeSettings(), *, progress: bool = False) -> ProbeResult:
    """Run ``settings.iters`` back-prop iterations of ``net``'s trunk and record the conv layers' gradients.

    ``net`` is a checked IR (:func:`~cnds_compiler.compile_spec`). Deterministic for fixed settings.
    """
    import torch

    from ..backends.pytorch import build_module
    from ..train.loss import alphas, deep_supervision_loss
    from ..train.optim import make_optimizer

    if settings.iters < 1:
        raise ValueError("iters must be >= 1")
    if settings.std < 0:
        raise ValueError("std must be >= 0")
    layers = conv_layers(net)
    if not layers:
        raise TrainingError("the trunk has no conv layer; there is nothing to probe")
    batch = settings.batch_size or min(net.train.batch, MAX_DEFAULT_BATCH)
    if batch < 1:
        raise ValueError("batch_size must be >= 1")
    pnet = probe_network(net, settings)
    lr = net.train.lr if settings.lr is None else float(settings.lr)
    if lr < 0:
        raise ValueError("lr must be >= 0")
    cfg = replace(pnet.train, lr=lr)
    data = _batches(pnet, settings, batch)
    weights = alphas(pnet, 0, max(1, cfg.epochs))
    active = tuple(name for name, a in weights.items() if a > 0)

    with torch.random.fork_rng(devices=[]):
        model = build_module(pnet, seed=settings.seed)
        model.train()
        optimizer = make_optimizer(model, cfg) if lr > 0 else None
        convs = {
            layer.name: [model.get_submodule(op.name).weight for op in layer.ops if op.kind is OpKind.CONV2D]
            for layer in pnet.trunk if layer.is_conv
        }
        torch.manual_seed(settings.seed)  # dropout masks
        history: dict[str, list[float]] = {name: [] for name in layers}
        losses: list[float] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=settings.iters, desc=f"probe {net.name}", unit="iter", dynamic_ncols=True, leave=False)
        start = time.perf_counter()
        it = iter(data)
        try:
            for i in range(settings.iters):
                images, labels = next(it)
                out = model(images, branches=active)
                loss, _parts = deep_supervision_loss(pnet, out.logits, out.aux, labels, weights)
                model.zero_grad(set_to_none=True)
                loss.backward()
                for name, params in convs.items():
                    total = sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)
                    count = sum(p.numel() for p in params)
                    value = total / count
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"non-finite gradient in {name} at probe iteration {i + 1}; lower --lr (or --lr 0 "
                            "for back-prop without updates) or --std"
                        )
                    history[name].append(value)
                losses.append(float(loss.detach()))
                if optimizer is not None:
                    optimizer.step()
                if bar is not None:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
    return ProbeResult(
        network=net.name, settings=settings, layers=layers, history=history, losses=losses, batch_size=batch,
        lr=lr, data_description=data.description, seconds=seconds, branches=active,
        init_description=settings.describe_init(pnet),
    )
