"""Checked IR → ``torch.nn.Module``.

The module's ``forward`` is generated Python (kept in ``.code``, registered with ``linecache`` so
tracebacks show it), one line per op with its output shape and spec line as a comment. Trunk
submodules carry the spec's names (``conv3_2.weight``); branch submodules live under ``aux.<branch>``,
so the aux-free deploy model is the same state dict minus the ``aux.`` prefix.

Every call returns a :class:`CndsOutput`, in train and eval alike; branches run only when asked for.
"""

from __future__ import annotations

import linecache
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..ir import Branch, InitScheme, Layer, Network, Op, OpKind

AUX_PREFIX = "aux."


@dataclass
class CndsOutput:
    """What every forward returns.

    Attributes:
        logits: main-head logits, ``(batch, classes)``.
        aux: branch name → branch logits, only for the branches requested (empty otherwise).
    """

    logits: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FeatureInfo:
    """One feature map a trunk layer produces."""

    layer: str
    channels: int
    reduction: int
    """Input height divided by the map's height."""
    module: str
    """Qualified name of the module whose output it is."""


class SkipInit(TorchFunctionMode):
    """Turn torch's in-place initialisers into no-ops while modules are built on ``meta``.

    Modules are built on ``meta`` and initialised once, as the spec says, after they get real memory:
    PyTorch's own default initialisation would be wasted work (seconds for the 60M-parameter specs), and
    on ``meta`` tensors it pulls in torch's decomposition machinery.
    """

    _INITS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._INITS:
            return args[0]
        return func(*args, **(kwargs or {}))


def make_module(op: Op, inplace_ok: bool) -> nn.Module:
    """The ``nn.Module`` for one IR op (parameters not yet initialised: see :func:`initialise_op`)."""
    a, x = op.attrs, op.in_shape
    if op.kind is OpKind.CONV2D:
        return nn.Conv2d(x.dims[0], a.out_channels, a.kernel, a.stride, a.pad, a.dilation, a.groups,
                         bias=a.init.bias is not None)
    if op.kind is OpKind.LINEAR:
        return nn.Linear(x.numel, a.out_features, bias=a.init.bias is not None)
    if op.kind is OpKind.MAXPOOL:
        return nn.MaxPool2d(a.kernel, a.stride, a.pad, ceil_mode=a.ceil)
    if op.kind is OpKind.AVGPOOL:
        # Caffe counts padding in the average; so does count_include_pad=True.
        return nn.AvgPool2d(a.kernel, a.stride, a.pad, ceil_mode=a.ceil, count_include_pad=True)
    if op.kind is OpKind.RELU:
        return nn.ReLU(inplace=inplace_ok)
    if op.kind is OpKind.DROPOUT:
        return nn.Dropout(a.p)
    if op.kind is OpKind.LRN:
        return nn.LocalResponseNorm(a.size, a.alpha, a.beta, a.k)
    if op.kind is OpKind.BATCHNORM:
        cls = nn.BatchNorm2d if x.spatial else nn.BatchNorm1d
        return cls(x.dims[0], eps=a.eps, momentum=a.momentum)
    if op.kind is OpKind.GAP:
        return nn.AdaptiveAvgPool2d(1)
    raise NotImplementedError(op.kind)


def initialise_op(owner: nn.Module, op: Op) -> None:
    """Give op ``op``'s module in ``owner`` its initial parameters and buffers, as the spec says."""
    m = getattr(owner, op.name)
    if op.kind in (OpKind.CONV2D, OpKind.LINEAR):
        init_parameters(m, op.attrs.init)
    elif op.kind is OpKind.BATCHNORM:
        m.reset_parameters()  # weight 1, bias 0, running statistics reset


@torch.no_grad()
def init_parameters(m: nn.Conv2d | nn.Linear, init) -> None:
    if init.scheme is InitScheme.GAUSSIAN:
        m.weight.normal_(0.0, init.std)
    elif init.scheme is InitScheme.KAIMING:
        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    else:
        nn.init.xavier_uniform_(m.weight)
    if m.bias is not None:
        m.bias.fill_(init.bias)


def _location(op: Op) -> str:
    loc = op.span.location()
    return f"{loc.name.rsplit('/', 1)[-1]}:{loc.line}"


def _emit_layers(layers: Iterable[Layer], lines: list[str], prefix: str, after_layer=None) -> None:
    for layer in layers:
        for op in layer.ops:
            if op.kind is OpKind.LINEAR and op.in_shape.spatial:
                lines.append("    x = torch.flatten(x, 1)")
            lines.append(f"    x = self.{prefix}{op.name}(x)  # {op.out_shape}  {_location(op)}")
        if after_layer is not None:
            after_layer(layer, lines)


def _build_modules(owner: nn.Module, layers: Iterable[Layer]) -> None:
    for layer in layers:
        for i, op in enumerate(layer.ops):
            # In-place only inside a layer: a layer's input may be a tap that a branch also reads.
            owner.add_module(op.name, make_module(op, inplace_ok=i > 0))


def _compile(source: str, filename: str, names: tuple[str, ...]) -> dict:
    namespace = {"torch": torch, "CndsOutput": CndsOutput}
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)
    return {n: namespace[n] for n in names}


class BranchModule(nn.Module):
    """One supervision branch; its submodules carry the branch's layer names."""

    def __init__(self, branch: Branch) -> None:
        super().__init__()
        self.branch = branch
        _build_modules(self, branch.layers)
        lines = ["def forward(self, x):"]
        _emit_layers(branch.layers, lines, "")
        lines.append("    return x")
        self.code = "\n".join(lines) + "\n"
        self._forward = _compile(self.code, f"<cnds branch {branch.name}>", ("forward",))["forward"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self, x)


class CndsNet(nn.Module):
    """A compiled network; build it with :func:`build_module`.

    Methods follow timm: ``forward_features`` (trunk up to its last feature map), ``forward_head``
    (the rest, ``pre_logits=True`` stops before the classifier), ``forward`` (both, plus branches),
    ``get_classifier``, ``reset_classifier``; ``feature_info`` lists every trunk feature map.
    """

    net: Network
    code: str

    def __init__(self, net: Network, materialize: bool = True) -> None:
        super().__init__()
        if not net.shapes_known:
            raise ValueError("build_module needs a checked IR (run the pass pipeline first)")
        self.net = net
        with torch.device("meta"), SkipInit():
            _build_modules(self, net.trunk)
            self.aux = nn.ModuleDict({b.name: BranchModule(b) for b in net.branches})
        if materialize:  # real memory, then one initialisation in spec order (trunk, then branches)
            self.to_empty(device="cpu")
            for layer in net.trunk:
                for op in layer.ops:
                    initialise_op(self, op)
            for b in net.branches:
                for layer in b.layers:
                    for op in layer.ops:
                        initialise_op(self.aux[b.name], op)
        spatial_end = max((i for i, layer in enumerate(net.trunk) if layer.out_shape.spatial), default=-1)
        self._features_layers = net.trunk[: spatial_end + 1]
        self._head_layers = net.trunk[spatial_end + 1 :]
        self.feature_info = [
            FeatureInfo(layer.name, layer.out_shape.dims[0], net.input.dims[1] // layer.out_shape.dims[1],
                        layer.ops[-1].name)
            for layer in self._features_layers
        ]
        self._taps = {b.tap: [] for b in net.branches}
        for b in net.branches:
            self._taps[b.tap].append(b.name)
        self.code = self._generate()
        funcs = _compile(self.code, f"<cnds {net.name}>", ("forward_features", "forward_head"))
        self._features_fn, self._head_fn = funcs["forward_features"], funcs["forward_head"]

    # ---- code generation -------------------------------------------------------------------------
    def _generate(self) -> str:
        taps = self._taps

        def run_branches(layer: Layer, lines: list[str]) -> None:
            for name in taps.get(layer.name, ()):
                lines.append(f"    if {name!r} in want:")
                lines.append(f"        aux[{name!r}] = self.aux[{name!r}](x)  # branch on {layer.name}")

        lines = ["def forward_features(self, x, want, aux):"]
        _emit_layers(self._features_layers, lines, "", run_branches)
        lines.append("    return x")
        lines.append("")
        lines.append("def forward_head(self, x, pre_logits):")
        head = self._head_layers
        if head:
            _emit_layers(head[:-1], lines, "")
            lines.append("    if pre_logits:")
            lines.append("        return x")
            _emit_layers(head[-1:], lines, "")
        lines.append("    return x")
        return "\n".join(lines) + "\n"

    # ---- public surface --------------------------------------------------------------------------
    @property
    def branch_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.net.branches)

    def _wanted(self, branches) -> frozenset[str]:
        if branches is None or branches == ():
            return frozenset()
        if branches == "all":
            return frozenset(self.branch_names)
        if isinstance(branches, str):
            branches = (branches,)
        wanted = frozenset(branches)
        unknown = wanted - set(self.branch_names)
        if unknown:
            raise ValueError(
                f"no branch named {sorted(unknown)}; this network's branches are {list(self.branch_names)}"
            )
        return wanted

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk up to and including its last feature map (e.g. pool5), no branches.

        Args:
            x: images ``(batch, C, H, W)`` of the spec's input size.
        Returns:
            The last ``(batch, C', H', W')`` feature map.
        """
        return self._features_fn(self, x, frozenset(), {})

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Layers after the last feature map.

        Args:
            x: output of :meth:`forward_features`.
            pre_logits: stop before the classifier layer (e.g. return fc7's output).
        Returns:
            Logits ``(batch, classes)``, or the classifier's input when ``pre_logits``.
        """
        return self._head_fn(self, x, pre_logits)

    def forward(self, x: torch.Tensor, branches: Iterable[str] | str | None = None) -> CndsOutput:
        """Main logits plus the logits of the requested branches.

        Args:
            x: images ``(batch, C, H, W)``.
            branches: ``None`` (no branch), ``"all"``, or branch names; unrequested branches cost nothing.
        Returns:
            :class:`CndsOutput` in every mode.
        """
        aux: dict[str, torch.Tensor] = {}
        x = self._features_fn(self, x, self._wanted(branches), aux)
        return CndsOutput(self._head_fn(self, x, False), aux)

    def forward_layers(self, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Outputs of the named trunk layers (runs only as far as the deepest one)."""
        names = list(names)
        known = [layer.name for layer in self.net.trunk]
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"no trunk layer named {missing}; layers: {known}")
        last = max(known.index(n) for n in names) if names else -1
        result = {}
        for layer in self.net.trunk[: last + 1]:
            for op in layer.ops:
                if op.kind is OpKind.LINEAR and x.dim() > 2:
                    x = torch.flatten(x, 1)
                x = getattr(self, op.name)(x)
            if layer.name in names:
                result[layer.name] = x
        return result

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.net.trunk[-1].ops[0].name)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` outputs."""
        op = self.net.trunk[-1].ops[0]
        if op.kind is not OpKind.LINEAR:
            raise ValueError("the last layer is not a linear classifier")
        m = nn.Linear(op.in_shape.numel, num_classes, bias=op.attrs.init.bias is not None)
        init_parameters(m, op.attrs.init)
        setattr(self, op.name, m)

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without any branch entry: what the deploy network loads."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(AUX_PREFIX)}

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"CndsNet({self.net.name}, {len(self.net.trunk)} layers, {len(self.net.branches)} branches, {n:,} params)"


def build_module(net: Network, seed: int | None = None, materialize: bool = True) -> CndsNet:
    """Build and initialise the module of a checked IR (``seed`` makes the initialisation repeatable).

    ``materialize=False`` leaves every tensor on ``meta``: the module's structure and shapes, no memory.
    """
    if not materialize:
        return CndsNet(net, materialize=False)
    if seed is None:
        return CndsNet(net)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CndsNet(net)


def fan_in_std(op: Op) -> float:
    """He-style std √(2/fan_in) of a conv/linear op (for comparisons with the paper's N(0, 0.01))."""
    a, x = op.attrs, op.in_shape
    if op.kind is OpKind.CONV2D:
        return math.sqrt(2.0 / ((x.dims[0] // a.groups) * a.kernel[0] * a.kernel[1]))
    return math.sqrt(2.0 / x.numel)
