"""torchvision model → ``.cnds`` spec (and its weights → a cnds checkpoint), by tracing with torch.fx.

Each module call becomes one statement named by the module's qualified name (``layer3.1.conv2``), so the
spec's parameter names are torchvision's state-dict keys and ``supervise layer3`` taps the end of a stage.
Function calls take the name of the module path their inputs share (``layer1.0.add``, ``inception3a.cat``).
``torch.flatten`` before a classifier is implicit (a cnds ``linear`` flattens); adaptive average pooling
becomes ``gap``, nothing (when it keeps the size) or a fixed average pool (when it divides it). Every
construct that cannot be written is collected, and all are reported at once.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import UnknownNameError, UnsupportedError, did_you_mean

MODELS = ("resnet18", "resnet34", "resnet50", "vgg11", "vgg16", "googlenet", "densenet121")
"""Models the importer is tested on (parity ≤ 1e-5 with torchvision); others may import too."""
IMAGENET_DATA = "data {{ resize {resize}  mean [0.485, 0.456, 0.406]  std [0.229, 0.224, 0.225]  mirror true }}"
"""torchvision's ImageNet preprocessing: resize to 256/224 of the input size, centre crop, normalise."""


@dataclass
class TorchvisionImport:
    """The spec text of an imported model, and what it was made from."""

    name: str
    text: str
    model: nn.Module
    params: int

    def state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``state`` (default: the model's own) under the spec's names."""
        state = self.model.state_dict() if state is None else state
        return {spec_name(k): v for k, v in state.items()}


@dataclass
class _Writer:
    model: nn.Module
    shapes: dict[str, tuple[int, ...]]
    classes: int
    lines: list[str] = field(default_factory=list)
    value: dict[str, str] = field(default_factory=lambda: defaultdict(lambda: "in"))
    """fx node name → the spec value that holds it (``in`` stands in after an unsupported node: the
    import goes on only to report every problem at once)."""
    taken: set[str] = field(default_factory=set)
    calls: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    previous: str = "in"

    def unique(self, name: str) -> str:
        base, i = name, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def emit(self, name: str, sources: list[str], op: str) -> str:
        name = self.unique(spec_name(name))
        head = "" if not sources or sources == [self.previous] else f"{', '.join(sources)} -> "
        self.lines.append(f"{name}: {head}{op}")
        self.previous = name
        return name

    def alias(self, node: fx.Node, source: fx.Node) -> None:
        self.value[node.name] = self.value[source.name]


def spec_name(module_path: str) -> str:
    """A module path as a cnds name: each part a word (``block1-0`` → ``block1_0``); state-dict keys map the
    same way (:meth:`TorchvisionImport.state_dict`)."""
    return ".".join(re.sub(r"\W", "_", part) for part in module_path.split("."))


def _pair(v) -> int | str:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return v[0] if v[0] == v[1] else f"[{v[0]}, {v[1]}]"


def _module_op(m: nn.Module, w: _Writer, target: str, in_shape: tuple[int, ...], out_shape) -> str | None:
    """The cnds op text of one module, or ``None`` when it is the identity here; records what is not
    supported in ``w.problems``."""
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            w.problems.append(f"{target}: Conv2d padding {m.padding!r} / mode {m.padding_mode!r}")
        kernel = _pair(m.kernel_size)
        args = [str(m.out_channels), str(kernel) if isinstance(kernel, int) else f"kernel={kernel}"]
        for key, value, default in (("stride", m.stride, 1), ("pad", m.padding, 0), ("groups", m.groups, 1),
                                    ("dilation", m.dilation, 1)):
            text = _pair(value) if key != "groups" else value
            if text != default:
                args.append(f"{key}={text}")
        if m.bias is None:
            args.append("bias=none")
        return f"conv2d({', '.join(args)})"
    if isinstance(m, nn.BatchNorm2d):
        if not (m.affine and m.track_running_stats) or m.momentum is None:
            w.problems.append(f"{target}: BatchNorm2d without affine parameters, running statistics or momentum")
        return f"batchnorm(eps={m.eps:g}, momentum={m.momentum:g})"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.Dropout):
        return f"dropout({m.p:g})"
    if isinstance(m, nn.Linear):
        out = "classes" if m.out_features == w.classes else str(m.out_features)
        return f"linear({out}{'' if m.bias is not None else ', bias=none'})"
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        kind = "maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool"
        if kind == "maxpool" and _pair(m.dilation) != 1:
            w.problems.append(f"{target}: MaxPool2d with dilation {m.dilation}")
        pad = _pair(m.padding)
        if kind == "avgpool" and pad != 0 and not m.count_include_pad:
            w.problems.append(f"{target}: AvgPool2d that leaves padding out of the average")
        if kind == "avgpool" and getattr(m, "divisor_override", None):
            w.problems.append(f"{target}: AvgPool2d with divisor_override")
        kernel = _pair(m.kernel_size)
        args = [str(kernel) if isinstance(kernel, int) else f"kernel={kernel}"]
        stride = _pair(m.stride if m.stride is not None else m.kernel_size)
        if stride != kernel:
            args.append(f"stride={stride}")
        if pad != 0:
            args.append(f"pad={pad}")
        if m.ceil_mode:
            args.append("round=ceil")
        return f"{kind}({', '.join(args)})"
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return _adaptive(target, w, in_shape, out_shape)
    if isinstance(m, (nn.Identity, nn.Flatten)):
        return None
    w.problems.append(f"{target}: {type(m).__name__} has no cnds op")
    return None


def _adaptive(where: str, w: _Writer, in_shape, out_shape) -> str | None:
    (ih, iw), (oh, ow) = in_shape[-2:], out_shape[-2:]
    if (oh, ow) == (1, 1):
        return "gap"
    if (ih, iw) == (oh, ow):
        return None
    if ih % oh == 0 and iw % ow == 0:
        k = _pair((ih // oh, iw // ow))
        return f"avgpool({k})" if isinstance(k, int) else f"avgpool(kernel={k})"
    w.problems.append(f"{where}: adaptive average pooling from {ih}x{iw} to {oh}x{ow} is no fixed pooling")
    return None


def _shared_prefix(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _shapes(graph: fx.GraphModule, input_shape: tuple[int, int, int], source: str) -> dict[str, tuple[int, ...]]:
    """Every traced value's shape on one zero image (an interpreter that records them; torch.fx's own
    ShapeProp prints a traceback before it raises)."""
    shapes: dict[str, tuple[int, ...]] = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if isinstance(result, torch.Tensor):
                shapes[n.name] = tuple(result.shape)
            return result

    try:
        with torch.no_grad():
            Record(graph).run(torch.zeros(1, *input_shape))
    except Exception as e:  # the model cannot take this input size (channels, too small for its pools)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnsupportedError(f"{source} does not run on a {'x'.join(map(str, input_shape))} input "
                               f"(--input): {first}") from None
    return shapes


def trace_to_spec(model: nn.Module, name: str, input_shape: tuple[int, int, int], source: str) -> TorchvisionImport:
    """Trace ``model`` (eval mode) and write the equivalent spec; raises :class:`UnsupportedError` listing
    every construct that cannot be written."""
    model = model.eval()
    try:
        graph = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types for control flow it cannot follow
        first = (str(e).splitlines() or [""])[0]
        raise UnsupportedError(f"{source}: torch.fx cannot trace it ({type(e).__name__}: {first})") from None
    shapes = _shapes(graph, input_shape, source)
    output = next(n for n in graph.graph.nodes if n.op == "output")
    logits = output.args[0]
    classes = shapes[logits.name][-1] if isinstance(logits, fx.Node) else 0
    w = _Writer(model, shapes, classes)
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            w.value[node.name] = "in"
        elif node.op == "call_module":
            _module_call(node, w)
        elif node.op in ("call_function", "call_method"):
            _function_call(node, w)
        elif node.op == "get_attr":
            w.problems.append(f"{node.target}: a tensor attribute read in forward")
    if not isinstance(logits, fx.Node) or len(shapes.get(logits.name, ())) != 2:
        w.problems.append("the model does not return one logits tensor")
    elif w.value.get(logits.name) != w.previous:
        w.problems.append("the logits are not the last value computed")
    if w.problems:
        listed = "; ".join(w.problems[:12]) + (f" (and {len(w.problems) - 12} more)" if len(w.problems) > 12 else "")
        raise UnsupportedError(f"{source}: {len(w.problems)} construct(s) cnds cannot write: {listed}")
    c, h, wd = input_shape
    text = "\n".join([
        f"# Imported from {source} by cnds-import (torch.fx trace). Statement names are the model's module",
        "# names, so its state dict loads unchanged and `supervise layer3 { ... }` taps the end of a stage.",
        f"network {name}",
        f"input {c}x{h}x{wd}",
        f"classes {classes}",
        "init kaiming(bias=0)",
        IMAGENET_DATA.format(resize=round(h * 256 / 224)) if c == 3 and h == wd else "",
        "",
        *w.lines,
        "",
    ])
    params = sum(p.numel() for p in model.parameters())
    return TorchvisionImport(name, text, model, params)


def _module_call(node: fx.Node, w: _Writer) -> None:
    target = str(node.target)
    m = w.model.get_submodule(target)
    w.calls[target] = w.calls.get(target, 0) + 1
    if w.calls[target] > 1 and any(True for _ in m.parameters()):
        w.problems.append(f"{target}: a module with parameters called twice (shared weights)")
    nodes = [a for a in node.args if isinstance(a, fx.Node)]
    arg = nodes[0] if nodes else None
    if arg is None or len(node.args) != 1 or node.kwargs:
        w.problems.append(f"{target}: a module called with {len(node.args)} arguments")
        w.value[node.name] = w.value.get(arg.name, "in") if arg is not None else "in"
        return
    op = _module_op(m, w, target, w.shapes.get(arg.name, ()), w.shapes.get(node.name, ()))
    if op is None:
        w.alias(node, arg)
        return
    w.value[node.name] = w.emit(target, [w.value[arg.name]], op)


_RELU = {F.relu, torch.relu, "relu", "relu_"}
_ADD = {operator.add, torch.add, operator.iadd, "add", "add_"}
_CAT = {torch.cat, torch.concat}
_FLATTEN = {torch.flatten, "flatten"}


def _function_call(node: fx.Node, w: _Writer) -> None:
    fn = node.target
    inputs = [a for a in node.args if isinstance(a, fx.Node)]
    if fn in _CAT:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim not in (1, -3) or not all(isinstance(t, fx.Node) for t in tensors):
            w.problems.append(f"{node.name}: torch.cat along dim {dim}")
            return
        if len(tensors) == 1:  # DenseNet's first layer concatenates one tensor: the identity
            w.alias(node, tensors[0])
            return
        values = [w.value[t.name] for t in tensors]
        consumers = {str(u.target).rsplit(".", 1)[0] for u in node.users if u.op == "call_module" and "." in str(u.target)}
        where = consumers.pop() if len(consumers) == 1 and len(node.users) else _shared_prefix(values)
        w.value[node.name] = w.emit(f"{where}.cat" if where else "cat", [], f"concat({', '.join(values)})")
        return
    if fn in _FLATTEN:
        users = list(node.users)
        if users and all(u.op == "call_module" and isinstance(w.model.get_submodule(str(u.target)), nn.Linear)
                         for u in users):
            w.alias(node, inputs[0])  # cnds' linear flattens a feature map itself
        else:
            value = w.value[inputs[0].name]
            w.value[node.name] = w.emit(_named([value], "flatten"), [value], "flatten")
        return
    if fn in _RELU:
        value = w.value[inputs[0].name]
        w.value[node.name] = w.emit(_named([value], "relu"), [value], "relu")
        return
    if fn in _ADD and len(inputs) == 2 and len(node.args) == 2:
        values = [w.value[i.name] for i in inputs]
        w.value[node.name] = w.emit(_named(values[:1], "add"), [], f"add({', '.join(values)})")
        return
    if fn is F.adaptive_avg_pool2d:
        op = _adaptive(node.name, w, w.shapes.get(inputs[0].name, ()), w.shapes.get(node.name, ()))
        if op is None:
            w.alias(node, inputs[0])
        else:
            value = w.value[inputs[0].name]
            w.value[node.name] = w.emit(_named([value], "avgpool"), [value], op)
        return
    if fn == "mean" and tuple(node.args[1:2]) in (([2, 3],), ((2, 3),), ([-2, -1],), ((-2, -1),)):
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        value = w.value[inputs[0].name]
        linear_next = all(u.op == "call_module" and isinstance(w.model.get_submodule(str(u.target)), nn.Linear)
                          for u in node.users)
        ops = "gap" if keep or linear_next else "gap flatten"  # x.mean([2, 3]): a global average pool
        w.value[node.name] = w.emit(_named([value], "mean"), [value], ops)
        return
    if fn is F.dropout and not node.kwargs.get("training", False):
        w.alias(node, inputs[0])  # functional dropout in eval: the identity
        return
    if fn in (F.avg_pool2d, F.max_pool2d):
        op = _functional_pool(node, fn is F.max_pool2d, w)
        if op is not None:
            value = w.value[inputs[0].name]
            w.value[node.name] = w.emit(_named([value], op.split("(")[0]), [value], op)
            return
    shown = getattr(fn, "__name__", str(fn))
    w.problems.append(f"{node.name}: {node.op} {shown}")
    w.alias(node, inputs[0]) if inputs else w.value.setdefault(node.name, "in")  # go on: report all at once


def _functional_pool(node: fx.Node, is_max: bool, w: _Writer) -> str | None:
    """``F.max_pool2d``/``F.avg_pool2d`` with constant arguments as a cnds pool op."""
    names = ["input", "kernel_size", "stride", "padding"] + (["dilation", "ceil_mode"] if is_max else
                                                            ["ceil_mode", "count_include_pad", "divisor_override"])
    bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    kernel = bound.get("kernel_size")
    stride = bound.get("stride") or kernel
    pad = bound.get("padding", 0)
    if (is_max and _pair(bound.get("dilation", 1)) != 1) or bound.get("divisor_override") or (
            not is_max and _pair(pad) != 0 and bound.get("count_include_pad", True) is False):
        w.problems.append(f"{node.name}: {'max' if is_max else 'avg'}_pool2d with settings cnds pools lack")
        return None
    args = [str(_pair(kernel)) if isinstance(_pair(kernel), int) else f"kernel={_pair(kernel)}"]
    if _pair(stride) != _pair(kernel):
        args.append(f"stride={_pair(stride)}")
    if _pair(pad) != 0:
        args.append(f"pad={_pair(pad)}")
    if bound.get("ceil_mode"):
        args.append("round=ceil")
    return f"{'maxpool' if is_max else 'avgpool'}({', '.join(args)})"


def _named(values: list[str], fn: str) -> str:
    prefix = _shared_prefix([v for v in values if v != "in"]) if values else ""
    return f"{prefix}.{fn}" if prefix else fn


def import_torchvision(name: str, input_shape: tuple[int, int, int] = (3, 224, 224)) -> TorchvisionImport:
    """Build ``torchvision.models.get_model(name, weights=None)`` (GoogLeNet without its aux heads) and
    trace it into a spec. Nothing is downloaded."""
    import torchvision

    known = sorted(torchvision.models.list_models(module=torchvision.models))
    if name not in known:
        raise UnknownNameError(f"torchvision has no classification model '{name}'",
                               hint=did_you_mean(name, known) or f"e.g. {', '.join(MODELS)}")
    extra = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **extra)
    spec_name = "".join(ch if ch.isalnum() else "_" for ch in name)
    return trace_to_spec(model, spec_name, input_shape, f"torchvision.models.{name} (torchvision {torchvision.__version__})")


def load_state_dict(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (weights_only) that fits ``model`` exactly; one-line errors otherwise."""
    from ..checkpoint import read_checkpoint_file
    from ..errors import CheckpointError

    if not path.exists():
        raise CheckpointError("no such weights file", path=str(path))
    state = read_checkpoint_file(path)  # weights_only; a folder, FIFO, empty or unreadable file is one line
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a checkpoint wrapping its state dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("not a state dict (a mapping of names to tensors)", path=str(path))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    retyped = [k for k in own if k in state and k not in wrong and (state[k].dtype != own[k].dtype and not (
        state[k].is_floating_point() and own[k].is_floating_point()))]
    if missing or extra or wrong or retyped:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                else f"shape mismatch at {wrong[:3]}" if wrong else f"wrong dtype at {retyped[:3]}")
        raise CheckpointError(f"weights do not fit the model: {what}", path=str(path))
    return {k: state[k] for k in own}

