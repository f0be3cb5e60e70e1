"""The typed IR of a network: frozen dataclasses, tuples, an enum of ops, spans on every node.

A :class:`Network` is the whole model: a trunk of :class:`Layer` s (each one or more :class:`Op` s that
run in order) and any number of supervision :class:`Branch` es tapped off trunk layers. Shapes, parameter
counts and FLOPs are typed fields filled in by the passes; a node that exists is well formed
(``__post_init__`` checks its own invariants; whole-graph invariants live in ``passes.verify``).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field, replace

from .source import Span

IR_VERSION = 1
"""Version of the serialised IR (and of ``schema/ir-v1.json``)."""


class OpKind(enum.Enum):
    CONV2D = "conv2d"
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    RELU = "relu"
    DROPOUT = "dropout"
    LRN = "lrn"
    BATCHNORM = "batchnorm"
    GAP = "gap"
    LINEAR = "linear"

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
    OpKind.LINEAR: LinearAttrs,
}


@dataclass(frozen=True, slots=True)
class Op:
    """One primitive operation; ``name`` is its module name (``conv1``, ``conv1_relu``)."""

    name: str
    kind: OpKind
    attrs: OpAttrs
    span: Span
    """Where the op is used in the spec (the layer's call, also when the op came from a block)."""
    in_shape: Shape | None = None
    """Filled in by ``infer-shapes``."""
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


@dataclass(frozen=True, slots=True)
class Layer:
    """A named statement of the spec; its output is its last op's output."""

    name: str
    ops: tuple[Op, ...]
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
class Branch:
    """A supervision point: a small network on a trunk layer's output with its own loss."""

    name: str
    """Unique branch name; the tap's layer name unless several branches share a tap."""
    tap: str
    """Name of the trunk layer whose output feeds the branch."""
    loss: LossKind
    schedule: WeightSchedule
    layers: tuple[Layer, ...]
    span: Span

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError(f"branch {self.name} has no layers")


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


@dataclass(frozen=True, slots=True)
class Network:
    name: str
    input: Shape
    num_classes: int
    class_names: tuple[str, ...]
    """Empty when the spec gives only a count."""
    trunk: tuple[Layer, ...]
    branches: tuple[Branch, ...]
    train: TrainConfig
    data: DataConfig
    span: Span
    """The ``network`` statement (or the file start)."""
    sources: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """(file name, text) of every file the spec was built from, root first."""

    def __post_init__(self) -> None:
        if not self.input.spatial:
            raise ValueError("input must be CxHxW")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError("class names do not match the class count")

    # ---- lookups -------------------------------------------------------------------------------
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
        return all(op.out_shape is not None for layer in self.all_layers() for op in layer.ops)

    def all_layers(self):
        yield from self.trunk
        for b in self.branches:
            yield from b.layers

    def without_branches(self) -> Network:
        """The deploy network: the same trunk, no supervision branch."""
        return replace(self, branches=())

    def digest(self) -> str:
        """Hash of the architecture: input, classes, and every op's kind, settings and shapes.

        Names, initialisation, solver settings and spans are left out: weights fit a network exactly when
        the digests agree, so renaming it, changing its ``init`` or editing ``train { }`` keeps a run's
        checkpoints usable (``fmnist_cnn8`` weights load into ``fmnist_cnn8_gauss``).
        """
        import json

        from .serialize import to_json_dict  # local: serialize imports this module

        doc = to_json_dict(self, include_sources=False, include_spans=False)

        def architecture(node):
            if isinstance(node, dict):
                return {k: architecture(v) for k, v in node.items() if k not in ("init", "schedule", "loss")}
            if isinstance(node, list):
                return [architecture(v) for v in node]
            return node

        arch = architecture({k: doc[k] for k in ("input", "num_classes", "trunk", "branches")})
        return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
