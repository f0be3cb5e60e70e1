"""The typed IR of a network: frozen dataclasses, tuples, an enum of ops, spans on every node.

A :class:`Network` is a graph: :class:`Node` s that each define one value and name the earlier values they
read (SSA style, as torch.fx and xDSL), and :class:`Head` s — the main classifier first, then any number of
supervision branches, each with its loss and weight schedule. The trunk/branch split of the paper is
computed from the heads (:meth:`Network.main_nodes`); :attr:`Network.trunk` and :attr:`Network.branches`
are views grouped by spec statement. Shapes, parameter counts and FLOPs are typed fields filled in by the
passes; a node that exists is well formed (``__post_init__`` checks its own invariants; whole-graph
invariants live in ``passes.verify``).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field, replace
from functools import cached_property

from .source import Span

IR_VERSION = 2
"""Version of the serialised IR (and of ``schema/ir-v2.json``); v1 files still load."""
INPUT_NODE = "input"
"""Name of the input node."""
MAIN_HEAD = "main"
"""Name of the main head (the network's own classifier)."""


class OpKind(enum.Enum):
    CONV2D = "conv2d"
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    RELU = "relu"
    DROPOUT = "dropout"
    LRN = "lrn"
    BATCHNORM = "batchnorm"
    GAP = "gap"
    FLATTEN = "flatten"
    """A feature map as a vector (``linear`` flattens its input itself; this is for a head ending in ``gap``)."""
    LINEAR = "linear"
    INPUT = "input"
    """The network's input image batch (one per graph, first)."""
    CONCAT = "concat"
    """Channel-axis concatenation of two or more feature maps of equal HxW."""
    ADD = "add"
    """Elementwise sum of two or more values of equal shape (residual connections)."""

    @property
    def has_params(self) -> bool:
        return self in (OpKind.CONV2D, OpKind.LINEAR, OpKind.BATCHNORM)


class InitScheme(enum.Enum):
    GAUSSIAN = "gaussian"
    """N(0, std²), the paper's rule (std 0.01)."""
    KAIMING = "kaiming"
    """He normal, fan-in, for ReLU."""
    XAVIER = "xavier"
    """Glorot uniform."""


class LossKind(enum.Enum):
    SOFTMAX = "softmax"
    """Softmax cross-entropy (CNDS, eq. 1)."""
    HINGE = "hinge"
    """Squared hinge, one-vs-rest (DSN's companion loss)."""


class ScheduleKind(enum.Enum):
    LINEAR = "linear"
    """α_t = α₀ (1 − t/N), eq. 2."""
    CONSTANT = "constant"
    """α_t = α₀ (GoogLeNet's fixed 0.3)."""
    LIST = "list"
    """Explicit value per epoch; the last value holds for later epochs."""


@dataclass(frozen=True, slots=True)
class Shape:
    """Per-example tensor shape: ``(C, H, W)`` for feature maps, ``(N,)`` for vectors."""

    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.dims) not in (1, 3) or any(d < 1 for d in self.dims):
            raise ValueError(f"invalid shape {self.dims}")

    @property
    def spatial(self) -> bool:
        return len(self.dims) == 3

    @property
    def numel(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    def __str__(self) -> str:
        return "x".join(str(d) for d in self.dims)


@dataclass(frozen=True, slots=True)
class ParamInit:
    """How a conv/linear op's parameters start."""

    scheme: InitScheme
    std: float
    """Standard deviation for :attr:`InitScheme.GAUSSIAN` (ignored by the others)."""
    bias: float | None
    """Initial bias value; ``None`` means the op has no bias term."""

    def __post_init__(self) -> None:
        if self.std < 0:
            raise ValueError("std must be >= 0")


@dataclass(frozen=True, slots=True)
class Conv2dAttrs:
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    groups: int
    dilation: tuple[int, int]
    init: ParamInit

    def __post_init__(self) -> None:
        if self.out_channels < 1 or self.groups < 1 or self.out_channels % self.groups:
            raise ValueError("conv2d: out channels must be a positive multiple of groups")
        if min(self.kernel + self.stride + self.dilation) < 1 or min(self.pad) < 0:
            raise ValueError("conv2d: kernel, stride and dilation must be >= 1 and pad >= 0")


@dataclass(frozen=True, slots=True)
class PoolAttrs:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    ceil: bool
    """Round the output size up (Caffe) instead of down (PyTorch default)."""

    def __post_init__(self) -> None:
        if min(self.kernel + self.stride) < 1 or min(self.pad) < 0:
            raise ValueError("pool: kernel and stride must be >= 1 and pad >= 0")
        if self.pad[0] * 2 > self.kernel[0] or self.pad[1] * 2 > self.kernel[1]:
            raise ValueError("pool: pad must be at most half the kernel")


@dataclass(frozen=True, slots=True)
class DropoutAttrs:
    p: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError("dropout: p must be in [0, 1)")


@dataclass(frozen=True, slots=True)
class LrnAttrs:
    size: int
    alpha: float
    beta: float
    k: float

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("lrn: size must be >= 1")


@dataclass(frozen=True, slots=True)
class BatchNormAttrs:
    eps: float
    momentum: float

    def __post_init__(self) -> None:
        if self.eps <= 0 or not 0 <= self.momentum <= 1:
            raise ValueError("batchnorm: eps must be > 0 and momentum in [0, 1]")


@dataclass(frozen=True, slots=True)
class LinearAttrs:
    out_features: int
    init: ParamInit

    def __post_init__(self) -> None:
        if self.out_features < 1:
            raise ValueError("linear: out features must be >= 1")


@dataclass(frozen=True, slots=True)
class NoAttrs:
    """For ops without settings (relu, gap)."""


OpAttrs = Conv2dAttrs | PoolAttrs | DropoutAttrs | LrnAttrs | BatchNormAttrs | LinearAttrs | NoAttrs

ATTRS_OF_KIND: dict[OpKind, type] = {
    OpKind.CONV2D: Conv2dAttrs,
    OpKind.MAXPOOL: PoolAttrs,
    OpKind.AVGPOOL: PoolAttrs,
    OpKind.RELU: NoAttrs,
    OpKind.DROPOUT: DropoutAttrs,
    OpKind.LRN: LrnAttrs,
    OpKind.BATCHNORM: BatchNormAttrs,
    OpKind.GAP: NoAttrs,
    OpKind.FLATTEN: NoAttrs,
    OpKind.LINEAR: LinearAttrs,
    OpKind.INPUT: NoAttrs,
    OpKind.CONCAT: NoAttrs,
    OpKind.ADD: NoAttrs,
}
MULTI_INPUT = frozenset({OpKind.CONCAT, OpKind.ADD})
"""Kinds that read two or more values."""


@dataclass(frozen=True, slots=True)
class Node:
    """One value of the graph: an op applied to earlier values (SSA style, as torch.fx / xDSL).

    ``name`` is the value, the module path (branch-only nodes sit under ``aux.``) and the ONNX tensor name.
    """

    name: str
    kind: OpKind
    attrs: OpAttrs
    inputs: tuple[str, ...]
    """Names of the nodes it reads, all defined earlier in :attr:`Network.nodes`."""
    span: Span
    """Where the op is used in the spec (the statement's call, also when the op came from a block)."""
    group: str = ""
    """The top-level statement it came from (summary rows, diagram boxes, ``feature_info``)."""
    in_shape: Shape | None = None
    """Shape of the first input; filled in by ``infer-shapes``."""
    out_shape: Shape | None = None
    """Filled in by ``infer-shapes``."""
    params: int | None = None
    """Trainable parameters; filled in by ``count-costs``."""
    flops: int | None = None
    """FLOPs per example (2 per multiply-accumulate in conv/linear, 1 per element visited elsewhere);
    filled in by ``count-costs``."""

    def __post_init__(self) -> None:
        if not isinstance(self.attrs, ATTRS_OF_KIND[self.kind]):
            raise TypeError(f"{self.kind.value} op needs {ATTRS_OF_KIND[self.kind].__name__}")
        if self.kind is OpKind.INPUT:
            if self.inputs:
                raise ValueError("the input node reads nothing")
        elif self.kind in MULTI_INPUT:
            if len(self.inputs) < 2:
                raise ValueError(f"{self.kind.value} needs at least two inputs")
        elif len(self.inputs) != 1:
            raise ValueError(f"{self.kind.value} reads exactly one input")


Op = Node
"""The IR v1 name of a node (an op of a layer)."""


@dataclass(frozen=True, slots=True)
class Statement:
    """A named statement of the spec and the node that is its value (``conv3_2`` → ``conv3_2_relu``)."""

    name: str
    """Qualified: ``inception_4a``, ``inception_4a.b3`` (inside a block instance), ``loss1.fc`` (a head's)."""
    output: str
    """Node whose value the name stands for."""
    span: Span
    top: bool = True
    """A statement of the spec itself rather than of a block's body."""


@dataclass(frozen=True, slots=True)
class Layer:
    """A view: the nodes of one top-level statement, in order (a summary row, a diagram box)."""

    name: str
    ops: tuple[Node, ...]
    span: Span

    def __post_init__(self) -> None:
        if not self.ops:
            raise ValueError(f"layer {self.name} has no ops")

    @property
    def out_shape(self) -> Shape | None:
        return self.ops[-1].out_shape

    @property
    def in_shape(self) -> Shape | None:
        return self.ops[0].in_shape

    @property
    def params(self) -> int:
        return sum(op.params or 0 for op in self.ops)

    @property
    def flops(self) -> int:
        return sum(op.flops or 0 for op in self.ops)

    @property
    def is_conv(self) -> bool:
        return any(op.kind is OpKind.CONV2D for op in self.ops)

    @property
    def is_chain(self) -> bool:
        """Each node reads the one before it (a layer of a chain spec)."""
        return all(op.inputs == (prev.name,) for prev, op in zip(self.ops, self.ops[1:], strict=False))


@dataclass(frozen=True, slots=True)
class WeightSchedule:
    """α of a supervision branch per epoch (eq. 2 or alternatives)."""

    kind: ScheduleKind
    alpha0: float
    values: tuple[float, ...] = ()
    """Per-epoch values for :attr:`ScheduleKind.LIST`."""

    def __post_init__(self) -> None:
        if self.kind is ScheduleKind.LIST and not self.values:
            raise ValueError("a list schedule needs at least one value")
        if self.alpha0 < 0 or any(v < 0 for v in self.values):
            raise ValueError("supervision weights must be >= 0")

    def alpha(self, epoch: int, total_epochs: int) -> float:
        """α for 0-based ``epoch`` out of ``total_epochs`` (eq. 2: α₀(1 − t/N))."""
        if self.kind is ScheduleKind.CONSTANT:
            return self.alpha0
        if self.kind is ScheduleKind.LINEAR:
            return self.alpha0 * max(0.0, 1.0 - epoch / max(1, total_epochs))
        return self.values[min(epoch, len(self.values) - 1)]


@dataclass(frozen=True, slots=True)
class Head:
    """A classifier output with its loss: the main head first, then the supervision branches (data, not code)."""

    name: str
    """``main`` for the network's own classifier; a branch's name (its tap, or ``supervise X as NAME``)."""
    node: str
    """The node whose output is this head's logits."""
    loss: LossKind
    schedule: WeightSchedule
    """α per epoch (the main head's is the constant 1)."""
    span: Span
    tap: str | None = None
    """Node a supervision branch reads (its supervision point); ``None`` for the main head."""


@dataclass(frozen=True, slots=True)
class Branch:
    """A view of one supervision head: the nodes only supervision heads need that it needs, grouped by
    statement; the groups carry the branch's own statement names (``fc1``; its nodes: ``conv3_2.fc1``)."""

    name: str
    tap: str
    """Name of the value (statement) whose output feeds the branch."""
    loss: LossKind
    schedule: WeightSchedule
    layers: tuple[Layer, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class LrPolicy:
    kind: str
    """``fixed``, ``step``, ``multistep``, ``cosine`` or ``poly``."""
    gamma: float = 0.1
    every: int = 0
    milestones: tuple[int, ...] = ()
    power: float = 1.0


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Solver defaults of the spec's ``train { }`` section (CLI flags override them)."""

    optimizer: str = "sgd"
    lr: float = 0.01
    lr_policy: LrPolicy = LrPolicy("fixed")
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    batch: int = 64
    bias_lr_mult: float = 1.0
    """Caffe's ``lr_mult`` for biases (the released CNDS-8 uses 2)."""
    bias_decay: float = 0.0
    """Weight-decay multiplier on biases (Caffe's ``decay_mult``; 0 = weights only)."""
    seed: int = 0
    """In 0 .. :data:`MAX_SEED`."""


MAX_SEED = 2**31 - 1
"""Largest seed a spec or a ``--seed`` flag may give: within what every RNG cnds seeds accepts (numpy's
legacy seed stops below 2**32) and what a spec's integers may hold."""


@dataclass(frozen=True, slots=True)
class DataConfig:
    """Preprocessing of the spec's ``data { }`` section; travels into deployed models."""

    resize: tuple[int, int] | None = None
    """Resize to (H, W) before cropping to the input size (ImageNet/Places: 256×256)."""
    mean: tuple[float, ...] = ()
    """Per-channel mean on [0, 1] pixels; empty means 0."""
    std: tuple[float, ...] = ()
    """Per-channel std on [0, 1] pixels; empty means 1."""
    mirror: bool = True
    """Random horizontal flips in training."""


@dataclass(frozen=True)  # not slots: lookups are cached per instance (cached_property needs __dict__)
class Network:
    """The whole model: a graph of :class:`Node` s in topological order and its :class:`Head` s.

    Which nodes belong to the trunk (ancestors of the main head) and which only to supervision branches is
    computed (:meth:`main_nodes`, :meth:`head_nodes`), never stored.
    """

    name: str
    input: Shape
    num_classes: int
    class_names: tuple[str, ...]
    """Empty when the spec gives only a count."""
    nodes: tuple[Node, ...]
    """The input node first; every node's inputs come earlier (``verify`` checks it)."""
    heads: tuple[Head, ...]
    """The main head first, then one per supervision branch (none in a network pruned to features)."""
    statements: tuple[Statement, ...]
    """The spec's names for values, in spec order (a statement's name is its output's)."""
    train: TrainConfig
    data: DataConfig
    span: Span
    """The ``network`` statement (or the file start)."""
    sources: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)
    """(file name, text) of every file the spec was built from, root first."""

    def __post_init__(self) -> None:
        if not self.input.spatial:
            raise ValueError("input must be CxHxW")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError("class names do not match the class count")
        if self.heads and self.heads[0].name != MAIN_HEAD:
            raise ValueError("the main head comes first")  # no head at all: a pruned feature extractor

    # ---- lookups -------------------------------------------------------------------------------
    @cached_property
    def _by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    @cached_property
    def _values(self) -> dict[str, str]:
        return {st.name: st.output for st in self.statements}

    @cached_property
    def _main_nodes(self) -> frozenset[str]:
        if not self.heads:  # a feature extractor pruned to chosen values: all of it is trunk
            return frozenset(self._by_name)
        return self.ancestors([self.main.node])

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def has_node(self, name: str) -> bool:
        return name in self._by_name

    def resolve(self, name: str) -> str:
        """Node name of a value name: a statement's name stands for its output, else a node's name."""
        if name in self._values:
            return self._values[name]
        if name in self._by_name:
            return name
        stage = [st.output for st in self.statements if st.top and st.name.startswith(name + ".")]
        if stage:  # `layer3` stands for its last statement (layer3.1), as in the spec language
            return stage[-1]
        raise KeyError(name)

    @property
    def main(self) -> Head:
        return self.heads[0]

    @property
    def supervision_heads(self) -> tuple[Head, ...]:
        return self.heads[1:]

    def head(self, name: str) -> Head:
        for h in self.heads:
            if h.name == name:
                return h
        raise KeyError(name)

    def ancestors(self, names) -> frozenset[str]:
        """The named nodes and every node they read, transitively."""
        seen: set[str] = set()
        stack = list(names)
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(self._by_name[n].inputs)
        return frozenset(seen)

    def main_nodes(self) -> frozenset[str]:
        """Nodes the main head needs (the trunk), the input node included."""
        return self._main_nodes

    def head_nodes(self, head: Head) -> tuple[Node, ...]:
        """Nodes only supervision heads need that ``head`` needs, in graph order."""
        own = self.ancestors([head.node]) - self.main_nodes()
        return tuple(n for n in self.nodes if n.name in own)

    def users(self) -> dict[str, tuple[str, ...]]:
        """Node name → names of the nodes that read it (heads not counted)."""
        result: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                result[i].append(n.name)
        return {k: tuple(v) for k, v in result.items()}

    def groups(self, nodes) -> tuple[Layer, ...]:
        """``nodes`` grouped by statement, in order (the input node left out)."""
        spans = {st.name: st.span for st in self.statements}
        order: dict[str, list[Node]] = {}
        for n in nodes:
            if n.kind is not OpKind.INPUT:
                order.setdefault(n.group, []).append(n)
        return tuple(Layer(g, tuple(ns), spans.get(g, ns[0].span)) for g, ns in order.items())

    # ---- views of a chain-or-graph network ---------------------------------------------------------
    @cached_property  # views are immutable; the training loss reads them every step
    def trunk(self) -> tuple[Layer, ...]:
        """The main head's nodes grouped by statement."""
        main = self.main_nodes()
        return self.groups(n for n in self.nodes if n.name in main)

    @cached_property
    def branches(self) -> tuple[Branch, ...]:
        """One view per supervision head: the nodes only supervision heads need, by statement."""
        return tuple(
            Branch(h.name, self.tap_name(h), h.loss, h.schedule,
                   tuple(replace(g, name=g.name.removeprefix(h.name + ".")) for g in self.groups(self.head_nodes(h))),
                   h.span)
            for h in self.supervision_heads
        )

    def tap_name(self, head: Head) -> str:
        """The value name of a head's tap (the statement whose output it is, else the node's name)."""
        for st in self.statements:
            if st.output == head.tap and st.top:
                return st.name
        return head.tap or ""

    def layer(self, name: str) -> Layer:
        for layer in self.trunk:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def layer_index(self, name: str) -> int:
        for i, layer in enumerate(self.trunk):
            if layer.name == name:
                return i
        raise KeyError(name)

    def branch(self, name: str) -> Branch:
        for b in self.branches:
            if b.name == name:
                return b
        raise KeyError(name)

    @property
    def shapes_known(self) -> bool:
        return all(n.out_shape is not None for n in self.nodes)

    def all_layers(self):
        yield from self.trunk
        for b in self.branches:
            yield from b.layers

    def prune(self, keep) -> Network:
        """Only the nodes the named nodes need; heads whose logits are dropped go too (dead-code elimination)."""
        live = self.ancestors(keep)
        nodes = tuple(n for n in self.nodes if n.name in live)
        heads = tuple(h for h in self.heads if h.node in live)
        statements = tuple(st for st in self.statements if st.output in live)
        return replace(self, nodes=nodes, heads=heads, statements=statements)

    def without_branches(self) -> Network:
        """The deploy network: the nodes the main head needs, no supervision head."""
        return self.prune([self.main.node])

    def digest(self) -> str:
        """Hash of the architecture: input, classes, every node's kind, settings, inputs and shapes, and
        which nodes the heads read.

        Initialisation, losses, schedules, solver settings and spans are left out: weights fit a network
        exactly when the digests agree, so renaming it, changing its ``init`` or editing ``train { }`` keeps
        a run's checkpoints usable (``fmnist_cnn8`` weights load into ``fmnist_cnn8_gauss``).
        """
        import json

        def attrs(node: Node) -> dict:
            doc = plain_value(node.attrs)
            if "init" in doc:  # how weights start is not architecture; whether there is a bias is
                doc = {k: v for k, v in doc.items() if k != "init"} | {"bias": doc["init"]["bias"] is not None}
            return doc

        arch = {
            "input": list(self.input.dims),
            "num_classes": self.num_classes,
            "nodes": [[n.name, n.kind.value, attrs(n), list(n.inputs), plain_value(n.out_shape)] for n in self.nodes],
            "heads": [[h.name, h.node] for h in self.heads],
        }
        return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def plain_value(value):
    """Dataclass/enum/tuple → JSON-ready value, field by field (what the IR JSON and the digest are made of)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Shape):
        return list(value.dims)
    if isinstance(value, tuple):
        return [plain_value(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {f: plain_value(getattr(value, f)) for f in value.__dataclass_fields__}
    return value
