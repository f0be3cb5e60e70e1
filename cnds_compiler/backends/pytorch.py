"""Checked IR → ``torch.nn.Module``.

One code generator (:class:`GraphCode`) writes the ``forward`` of the training module (:class:`CndsNet`),
the deploy module and the feature extractor (:class:`GraphModule`): generated Python kept in ``.code``,
registered with ``linecache`` so tracebacks show it, one line per node with its output shape and spec
line as a comment. Submodules carry the node names (``conv3_2.weight``, ``inception_4a.b3.weight``);
nodes only supervision heads need live under ``aux.`` (``aux.conv3_2.fc1.weight``), so the aux-free
deploy model is the same state dict minus the ``aux.`` prefix.

Every call returns a :class:`CndsOutput`, in train and eval alike; branches run only when asked for.
"""

from __future__ import annotations

import keyword
import linecache
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..ir import INPUT_NODE, InitScheme, Network, Node, OpKind
from ..passes.verify import module_path

AUX_PREFIX = "aux."


@dataclass
class CndsOutput:
    """What every forward returns, in train and eval alike.

    Where a tensor is expected it stands for the main logits: tensor methods (``model(x).argmax(1)``) and
    torch functions (``torch.softmax(model(x), 1)``, ``F.cross_entropy(model(x), y)``) see ``logits``.

    Attributes:
        logits: main-head logits, ``(batch, classes)``.
        aux: branch name → branch logits, only for the branches requested (empty otherwise).
    """

    logits: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("logits", "aux"):  # copy/pickle probes; fields not set yet
            raise AttributeError(name)
        return getattr(self.logits, name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def main(value):
            if isinstance(value, CndsOutput):
                return value.logits
            if isinstance(value, (list, tuple)):
                return type(value)(main(v) for v in value)
            return value

        return func(*main(tuple(args)), **{k: main(v) for k, v in (kwargs or {}).items()})


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


class _OnnxLRN(torch.autograd.Function):
    """Across-channel LRN that exports as one ONNX ``LRN`` node (instead of torch's decomposition with
    ``If`` subgraphs). Same maths as ``nn.LocalResponseNorm`` for odd sizes, where both windows centre."""

    @staticmethod
    def forward(ctx, x, size: int, alpha: float, beta: float, k: float):
        return nn.functional.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size: int, alpha: float, beta: float, k: float):
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` that lowers to ONNX ``LRN`` when the size is odd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size % 2 == 1 and torch.onnx.is_in_onnx_export():
            return _OnnxLRN.apply(x, self.size, self.alpha, self.beta, self.k)
        return super().forward(x)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training mask comes from uniform random numbers compared with ``p`` (one
    buffer, made in place): forward + backward in 0.30-0.70x the time of torch's CPU Bernoulli sampling (six runs),
    which sets up an MKL random stream on every call (``benchmarks/train_bench.py`` part 5).
    The same distribution (P(u >= p) = 1 - p, kept values scaled by 1/(1-p)) from torch's generator, so
    seeds and resumed runs stay exact. GPUs, ``torch.compile`` and evaluation take torch's own path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        keep = torch.rand(x.shape, dtype=torch.float32).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * (keep if x.dtype == torch.float32 else keep.to(x.dtype))


def make_module(op: Node, inplace_ok: bool) -> nn.Module:
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
        return Dropout(a.p)
    if op.kind is OpKind.LRN:
        return LRN(a.size, a.alpha, a.beta, a.k)
    if op.kind is OpKind.BATCHNORM:
        cls = nn.BatchNorm2d if x.spatial else nn.BatchNorm1d
        return cls(x.dims[0], eps=a.eps, momentum=a.momentum)
    if op.kind is OpKind.FLATTEN:
        return nn.Flatten()
    if op.kind is OpKind.GAP:
        return nn.AdaptiveAvgPool2d(1)
    raise NotImplementedError(op.kind)


def initialise_op(m: nn.Module | None, op: Node) -> None:
    """Give op ``op``'s module ``m`` its initial parameters and buffers, as the spec says."""
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


def _location(op: Node) -> str:
    loc = op.span.location()
    return f"{loc.name.rsplit('/', 1)[-1]}:{loc.line}"


# ---- the one code generator --------------------------------------------------------------------------


def _identifier(name: str, taken: set[str]) -> str:
    """A Python variable for a node (``inception_4a.b3`` → ``inception_4a_b3``), unique in its function."""
    base = re.sub(r"\W", "_", name)
    if not base.isidentifier() or keyword.iskeyword(base) or base in ("self", "torch", "want", "aux", "x"):
        base = "v_" + base
    var, i = base, 1
    while var in taken:
        i += 1
        var = f"{base}_{i}"
    taken.add(var)
    return var


def module_expr(path: str) -> str:
    """Python expression for the submodule at dotted ``path`` (``self.layer3[1]``-style parts via getattr)."""
    expr = "self"
    for part in path.split("."):
        expr = f"{expr}.{part}" if part.isidentifier() and not keyword.iskeyword(part) else f"getattr({expr}, {part!r})"
    return expr


@dataclass
class GraphCode:
    """Generates Python statements that compute a graph's nodes, one per node, with its shape and spec line.

    A value whose only reader is the next node reuses its variable (a chain reads ``x = self.conv1(x)``);
    branch-only nodes run under ``if`` guards on the requested heads. One generator serves the training
    module, the deploy module and the feature extractor.
    """

    net: Network
    paths: dict[str, str]
    """Node name → module path (``aux.`` prefix for branch-only nodes)."""
    keep: frozenset[str] = frozenset()
    """Values that must keep their own variable (returned, tapped, read after a function boundary)."""
    var: dict[str, str] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.users = self.net.users()
        self.remaining = {name: len(users) + (1 << 30 if name in self.keep else 0) for name, users in self.users.items()}
        self.holder = {"x": INPUT_NODE}
        self.var[INPUT_NODE] = "x"
        self.taken.add("x")

    def _free(self, var: str) -> bool:
        return self.remaining.get(self.holder.get(var, ""), 0) == 0

    def emit(self, node: Node, lines: list[str], indent: str = "    ") -> None:
        if node.kind is OpKind.INPUT:
            return
        args = [self.var[i] for i in node.inputs]
        for i in node.inputs:
            self.remaining[i] -= 1
        if len(node.inputs) == 1 and self._free(args[0]):
            target = args[0]  # the input's last reader: reuse its variable (a chain reads x = self.conv1(x))
        elif len(self.users[node.name]) == 1 and node.name not in self.keep and self._free("x"):
            target = "x"
        else:
            target = _identifier(node.name, self.taken)
        self.var[node.name] = target
        self.holder[target] = node.name
        if node.kind is OpKind.CONCAT:
            expr = f"torch.cat([{', '.join(args)}], 1)"
        elif node.kind is OpKind.ADD:
            expr = " + ".join(args)
        else:
            arg = args[0]
            if node.kind is OpKind.LINEAR and node.in_shape.spatial:
                arg = f"torch.flatten({arg}, 1)"
            expr = f"{module_expr(self.paths[node.name])}({arg})"
        lines.append(f"{indent}{target} = {expr}  # {node.out_shape}  {_location(node)}")


def inplace_safe(node: Node, users: dict[str, tuple[str, ...]], keep: frozenset[str]) -> bool:
    """In-place only on a value with a single reader that is nobody's output (never on the caller's input)."""
    only = node.inputs[0]
    return only != INPUT_NODE and len(users[only]) == 1 and only not in keep


def build_submodules(owner: nn.Module, net: Network, nodes, paths: dict[str, str], keep: frozenset[str]) -> None:
    """Add each node's module at its path, creating plain container modules for the dotted parts."""
    users = net.users()  # once: per node it made building a 400-node net quadratic
    for node in nodes:
        if node.kind in (OpKind.INPUT, OpKind.CONCAT, OpKind.ADD):
            continue
        parent = owner
        *outer, leaf = paths[node.name].split(".")
        for part in outer:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, make_module(node, inplace_ok=inplace_safe(node, users, keep)))


def _compile(source: str, filename: str, names: tuple[str, ...]) -> dict:
    namespace = {"torch": torch, "CndsOutput": CndsOutput}
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)
    return {n: namespace[n] for n in names}


def _feature_cut(net: Network, main: list[Node]) -> int:
    """Index in ``main`` of the last spatial node that every path to the main head passes through (pool5 of
    a chain): no later main node reads anything before it."""
    position = {n.name: i for i, n in enumerate(main)}
    earliest_read_after = [len(main)] * (len(main) + 1)
    for i in range(len(main) - 1, -1, -1):
        reads = [position[r] for r in main[i].inputs] or [i]
        earliest_read_after[i] = min(earliest_read_after[i + 1], *reads)
    best = 0
    for i, node in enumerate(main):
        if node.out_shape.spatial and earliest_read_after[i + 1] >= i:
            best = i
    return best


class GraphModule(nn.Module):
    """The modules of chosen nodes and a generated ``forward`` that returns chosen values as a tuple: the
    deploy model and the feature extractor (no branch runs, none is built).

    Submodules carry the node names, so its state-dict keys are exactly those of
    ``CndsNet.trunk_state_dict()`` for the nodes it keeps.
    """

    def __init__(self, net: Network, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.net = net.prune(outputs)
        self.outputs = outputs
        keep = frozenset(outputs)
        paths = {n.name: n.name for n in self.net.nodes}
        build_submodules(self, self.net, self.net.nodes, paths, keep)
        gen = GraphCode(self.net, paths, keep)
        lines = ["def forward(self, x):"]
        for node in self.net.nodes:
            gen.emit(node, lines)
        lines.append(f"    return ({''.join(gen.var[o] + ', ' for o in outputs)})")
        self.code = "\n".join(lines) + "\n"
        self._forward = _compile(self.code, f"<cnds {net.name} outputs>", ("forward",))["forward"]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._forward(self, x)


class CndsNet(nn.Module):
    """A compiled network; build it with :func:`build_module`.

    Methods follow timm: ``forward_features`` (trunk up to its last feature map that every path to the
    classifier passes through), ``forward_head`` (the rest, ``pre_logits=True`` stops before the
    classifier), ``forward`` (both, plus branches), ``get_classifier``, ``reset_classifier``;
    ``feature_info`` lists every trunk statement's feature map.
    """

    net: Network
    code: str

    def __init__(self, net: Network, materialize: bool = True) -> None:
        super().__init__()
        if not net.shapes_known:
            raise ValueError("build_module needs a checked IR (run the pass pipeline first)")
        self.net = net
        live = net.prune([h.node for h in net.heads])  # values nothing reads are not built (verify warned)
        main = net.main_nodes()
        self._paths = {n.name: module_path(net, n.name, main) for n in live.nodes}
        heads_of: dict[str, list[str]] = {}
        for h in net.supervision_heads:
            for n in net.head_nodes(h):
                heads_of.setdefault(n.name, []).append(h.name)
        main_list = [n for n in live.nodes if n.name in main]
        cut = _feature_cut(net, main_list)
        self._cut = main_list[cut].name
        keep = frozenset([self._cut, *(h.node for h in net.heads), *(h.tap for h in net.supervision_heads)])
        if main_list[-1].inputs:
            keep |= {main_list[-1].inputs[0]}  # pre_logits returns it
        self._live_nodes = live.nodes
        with torch.device("meta"), SkipInit():
            self.aux = nn.Module()  # branch-only modules sit under aux. (trunk checkpoints stay clean)
            build_submodules(self, net, live.nodes, self._paths, keep)
        if materialize:  # real memory, then one initialisation in spec order (trunk, then branches)
            self.to_empty(device="cpu")
            for node in live.nodes:
                if node.kind.has_params:
                    initialise_op(self.get_submodule(self._paths[node.name]), node)
        self.feature_info = [
            FeatureInfo(layer.name, layer.out_shape.dims[0], net.input.dims[1] // layer.out_shape.dims[1],
                        layer.ops[-1].name)
            for layer in net.groups(main_list[: cut + 1])
            if layer.out_shape.spatial
        ]
        self.code = self._generate(main_list, cut, heads_of, keep)
        funcs = _compile(self.code, f"<cnds {net.name}>", ("forward_features", "forward_head"))
        self._features_fn, self._head_fn = funcs["forward_features"], funcs["forward_head"]
        self._extractors: dict[tuple[str, ...], GraphModule] = {}

    # ---- code generation -------------------------------------------------------------------------
    def _generate(self, main: list[Node], cut: int, heads_of: dict[str, list[str]], keep: frozenset[str]) -> str:
        net = self.net
        gen = GraphCode(net, self._paths, keep)
        pending = [n for n in self._live_nodes if n.name in heads_of]
        head_at = {h.node: h.name for h in net.supervision_heads}

        def emit_ready(lines: list[str]) -> None:
            """Branch nodes whose inputs exist, each under a guard on the heads that need it."""
            guard = None
            progress = True
            while progress:
                progress = False
                for node in list(pending):
                    if all(i in gen.var for i in node.inputs):
                        pending.remove(node)
                        progress = True
                        names = tuple(heads_of[node.name])
                        cond = f"{names[0]!r} in want" if len(names) == 1 else f"not want.isdisjoint({names!r})"
                        if cond != guard:
                            lines.append(f"    if {cond}:")
                            guard = cond
                        gen.emit(node, lines, "        ")
                        if node.name in head_at:
                            lines.append(f"        aux[{head_at[node.name]!r}] = {gen.var[node.name]}")

        lines = ["def forward_features(self, x, want, aux):"]
        emit_ready(lines)
        for node in main[: cut + 1]:
            gen.emit(node, lines)
            emit_ready(lines)
        lines.append(f"    return {gen.var[main[cut].name]}")
        lines.append("")
        lines.append("def forward_head(self, x, pre_logits, want, aux):")
        gen.var[main[cut].name] = "x"
        gen.holder["x"] = main[cut].name
        rest = main[cut + 1:]
        last_group = rest[-1].group if rest else None
        for node in rest:
            if node.group == last_group and node is next(n for n in rest if n.group == last_group):
                lines.append("    if pre_logits:")
                lines.append(f"        return {gen.var[node.inputs[0]]}")
            gen.emit(node, lines)
            emit_ready(lines)
        lines.append(f"    return {gen.var[main[-1].name]}")
        return "\n".join(lines) + "\n"

    # ---- public surface --------------------------------------------------------------------------
    @property
    def branch_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.net.supervision_heads)

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

    def head_parameters(self, *heads: str, excluding_others: bool = False) -> list[nn.Parameter]:
        """Parameters of the branch-only modules the named supervision heads need (with
        ``excluding_others``: only those no other head needs), in graph order."""
        nodes = {n.name for h in heads for n in self.net.head_nodes(self.net.head(h))}
        if excluding_others:
            for h in self.net.supervision_heads:
                if h.name not in heads:
                    nodes -= {n.name for n in self.net.head_nodes(h)}
        result = []
        for node in self.net.nodes:
            if node.name in nodes and node.name in self._paths and node.kind.has_params:
                result.extend(self.get_submodule(self._paths[node.name]).parameters())
        return result

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk up to its last feature map that every path to the classifier passes through (e.g. pool5), no
        branches.

        Args:
            x: images ``(batch, C, H, W)`` of the spec's input size.
        Returns:
            That ``(batch, C', H', W')`` feature map.
        """
        return self._features_fn(self, x, frozenset(), {})

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Nodes after that feature map.

        Args:
            x: output of :meth:`forward_features`.
            pre_logits: stop before the classifier statement (e.g. return fc7's output).
        Returns:
            Logits ``(batch, classes)``, or the classifier's input when ``pre_logits``.
        """
        return self._head_fn(self, x, pre_logits, frozenset(), {})

    def forward(self, x: torch.Tensor, branches: Iterable[str] | str | None = None) -> CndsOutput:
        """Main logits plus the logits of the requested branches.

        Args:
            x: images ``(batch, C, H, W)``.
            branches: ``None`` (no branch), ``"all"``, or branch names; unrequested branches cost nothing.
        Returns:
            :class:`CndsOutput` in every mode.
        """
        aux: dict[str, torch.Tensor] = {}
        want = self._wanted(branches)
        x = self._features_fn(self, x, want, aux)
        return CndsOutput(self._head_fn(self, x, False, want, aux), aux)

    def forward_layers(self, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Outputs of the named values (statement or node names of the trunk); computes only what they need."""
        names = tuple(dict.fromkeys(names))
        main = self.net.main_nodes()
        resolved = []
        for n in names:
            try:
                node = self.net.resolve(n)
            except KeyError:
                node = None
            if node is None or node not in main:
                known = [layer.name for layer in self.net.trunk]
                raise ValueError(f"no trunk value named {n!r}; statements: {known}")
            resolved.append(node)
        key = tuple(resolved)
        if key not in self._extractors:
            with torch.device("meta"), SkipInit():
                extractor = GraphModule(self.net.without_branches(), key)
            self._extractors[key] = extractor
        extractor = self._extractors[key]
        outputs = extractor._forward(self, x)  # the same module paths: run its code on this module's weights
        return dict(zip(names, outputs, strict=True))

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self._paths[self._classifier().name])

    def _classifier(self) -> Node:
        head_group = self.net.node(self.net.main.node).group
        return next(n for n in self.net.nodes if n.group == head_group)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` outputs."""
        op = self._classifier()
        if op.kind is not OpKind.LINEAR:
            raise ValueError("the last layer is not a linear classifier")
        m = nn.Linear(op.in_shape.numel, num_classes, bias=op.attrs.init.bias is not None)
        init_parameters(m, op.attrs.init)
        *outer, leaf = self._paths[op.name].split(".")
        setattr(self.get_submodule(".".join(outer)) if outer else self, leaf, m)

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without any branch entry: what the deploy network loads."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(AUX_PREFIX)}

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return (f"CndsNet({self.net.name}, {len(self.net.trunk)} layers, {len(self.net.supervision_heads)} branches, "
                f"{n:,} params)")


def build_module(net: Network, seed: int | None = None, materialize: bool = True,
                 memory_budget: int | None = None) -> CndsNet:
    """Build and initialise the module of a checked IR (``seed`` makes the initialisation repeatable).

    ``materialize=False`` leaves every tensor on ``meta``: the module's structure and shapes, no memory.
    Before allocating, the parameters' size is checked against ``memory_budget`` bytes (default:
    ``CNDS_MEMORY_BUDGET_GIB``, else the RAM available now): :class:`MemoryBudgetError` when they would not fit.
    """
    if not materialize:
        return CndsNet(net, materialize=False)
    from ..memory import check_fits, default_budget, weights_estimate

    budget, where = (memory_budget, "memory_budget") if memory_budget is not None else default_budget()
    check_fits(weights_estimate(net), budget, where)
    if seed is None:
        return CndsNet(net)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CndsNet(net)


def fan_in_std(op: Node) -> float:
    """He-style std √(2/fan_in) of a conv/linear op (for comparisons with the paper's N(0, 0.01))."""
    a, x = op.attrs, op.in_shape
    if op.kind is OpKind.CONV2D:
        return math.sqrt(2.0 / ((x.dims[0] // a.groups) * a.kernel[0] * a.kernel[1]))
    return math.sqrt(2.0 / x.numel)
