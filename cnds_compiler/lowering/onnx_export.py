"""Checked IR + weights → an aux-free, self-describing ONNX file.

In a fixed order (timm's habit): build a *new* module from the deploy plan (the training module is
never touched), load the trunk's weights (``aux.`` entries dropped), ``eval()``, export with the
TorchScript exporter (``dynamo=False``: fast, quiet, no onnxscript), then check the result:

1. ``onnx.checker.check_model(full_check=True)``;
2. :func:`prove_no_branches`: no node, tensor or name of any supervision branch is in the file;
3. onnxruntime against PyTorch on random input at a batch size other than the traced one (so the
   dynamic batch axis is exercised too): fp32 within 1e-4.

The ``cnds.*`` metadata (:class:`cnds_runtime.metadata.ModelMetadata`) goes into the file so the
runtime needs nothing else. ``onnx``/``onnxruntime`` are imported inside functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..backends.pytorch import AUX_PREFIX, GraphModule, SkipInit, build_module
from ..errors import CheckpointError, ExportError, UnsupportedError
from ..ir import Network, OpKind
from .deploy import PRECISIONS, DeployPlan, plan_deploy
from .parity import ParityCheck, check_parity

DEFAULT_OPSET = 17
"""ai.onnx opset of exports: supported by every onnxruntime cnds meets (onnxruntime-gpu 1.31 stops at 26)."""
_BRANCH_NAME = re.compile(r"(^|[/.])aux[/.]")


class DeployModule(GraphModule):
    """The deploy network of a :class:`DeployPlan`: the plan's nodes only, forward returns the planned
    outputs as a tuple. Built by the same generator as the training module; no branch node is in it."""

    def __init__(self, plan: DeployPlan) -> None:
        super().__init__(plan.network, tuple(node for _, node in plan.outputs))
        self.plan = plan


@dataclass(frozen=True, slots=True)
class Weights:
    """A full state dict (trunk and ``aux.`` entries) and where it came from."""

    state: dict[str, torch.Tensor]
    description: str
    trained: bool


def load_weights(net: Network, path: str | Path | Mapping[str, torch.Tensor] | None, seed: int = 0) -> Weights:
    """The checkpoint at ``path`` (checked against ``net``), a state dict given in memory, or the spec's
    initialisation with ``seed``."""
    if path is None:
        state = build_module(net, seed=seed).state_dict()
        return Weights(state, f"untrained: the spec's initialisation with seed {seed}", False)
    if isinstance(path, Mapping):
        state = {k: v.float() if v.is_floating_point() else v for k, v in path.items()}
        return Weights(state, "state dict given in memory", True)
    from ..checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, net)
    epoch = ckpt.get("epoch")
    desc = Path(path).name + (f" (epoch {epoch})" if isinstance(epoch, int) else "")
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    return Weights(state, desc, True)


def build_deploy_module(plan: DeployPlan, weights: Weights, path=None) -> DeployModule:
    """A new :class:`DeployModule` holding the trunk weights it needs (built on ``meta`` without
    initialisation, then the weights are assigned)."""
    with torch.device("meta"), SkipInit():
        module = DeployModule(plan)
    wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    where = str(path) if isinstance(path, (str, Path)) else None
    missing = [k for k in wanted if k not in weights.state]
    if missing:
        raise CheckpointError(f"weights have no entry for {missing[:3]}", path=where)
    wrong = [k for k, shape in wanted.items() if tuple(weights.state[k].shape) != shape]
    if wrong:
        raise CheckpointError(f"weights do not fit '{plan.source.name}': shape mismatch at {wrong[:3]}",
                              path=where)
    # assign=True: the module holds the given tensors (it never writes to them: eval mode, no in-place ops)
    module.load_state_dict({k: weights.state[k] for k in wanted}, strict=True, assign=True)
    return module.eval()


@dataclass(frozen=True, slots=True)
class BranchProof:
    """Evidence that a graph holds nothing of any supervision branch."""

    branches: tuple[str, ...]
    """Branches of the spec (all removed)."""
    names_scanned: int
    """Node, tensor and value names searched for the ``aux.`` / ``/aux/`` branch prefix."""
    tensors_compared: int
    """Branch weight tensors (and their transposes) compared byte for byte with every initializer."""
    weight_ops: tuple[int, int]
    """(Conv + Gemm/MatMul nodes in the graph, conv + linear ops of the deploy trunk): equal."""
    graph_weights: int
    """Floating-point values stored in the graph's initializers."""
    trunk_weights: int
    """Floating-point values of the deploy trunk's state dict (the graph may hold fewer: BN folding)."""


def _graph_names(graph) -> Iterable[str]:
    for node in graph.node:
        yield node.name
        yield from node.input
        yield from node.output
    for coll in (graph.initializer, graph.input, graph.output, graph.value_info):
        for item in coll:
            yield item.name


def _tensor_key(a: np.ndarray) -> tuple:
    return a.shape, hashlib.sha1(np.ascontiguousarray(a).tobytes()).digest()


def prove_no_branches(model, plan: DeployPlan, weights: Weights | None, trunk_weights: int) -> BranchProof:
    """Check that ``model`` (an ``onnx.ModelProto``) has no trace of ``plan``'s removed branches.

    Names: no node, initializer, input/output or value name contains a branch module path. Structure:
    the graph's Conv and Gemm/MatMul count equals the deploy trunk's conv and linear ops. Values: no
    initializer equals a branch weight (2-D and up; exact bytes in the initializer's dtype, also transposed).
    Size: the graph stores no more floating-point values than the deploy trunk's state dict.
    Raises :class:`ExportError` listing every violation.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    problems: list[str] = []
    names = list(_graph_names(graph))
    leaked = sorted({n for n in names if _BRANCH_NAME.search(n)})
    if leaked:
        problems.append(f"branch names in graph: {leaked[:5]}")

    n_conv = sum(1 for layer in plan.network.trunk for op in layer.ops if op.kind is OpKind.CONV2D)
    n_lin = sum(1 for layer in plan.network.trunk for op in layer.ops if op.kind is OpKind.LINEAR)
    ops = [n.op_type for n in graph.node]
    graph_ops = ops.count("Conv") + ops.count("Gemm") + ops.count("MatMul")
    if graph_ops != n_conv + n_lin:
        problems.append(f"graph has {graph_ops} Conv/Gemm/MatMul nodes, the deploy trunk {n_conv + n_lin}")

    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    float_inits = [init for init in graph.initializer if init.data_type in float_types]
    graph_weights = sum(int(np.prod(init.dims)) for init in float_inits)
    if graph_weights > trunk_weights:
        problems.append(f"graph stores {graph_weights:,} weights, more than the trunk's {trunk_weights:,}")

    compared = 0
    if weights is not None:
        branch = {k: t.detach().cpu().numpy() for k, t in weights.state.items()
                  if k.startswith(AUX_PREFIX) and t.is_floating_point() and t.dim() >= 2}
        shapes = {a.shape for a in branch.values()} | {a.T.shape for a in branch.values() if a.ndim == 2}
        candidates = [(init.name, numpy_helper.to_array(init)) for init in float_inits
                      if tuple(init.dims) in shapes]  # only a same-shaped tensor can be a copy
        keys: dict[tuple, str] = {}
        for dt in {a.dtype for _, a in candidates}:
            for key, a in branch.items():
                keys[_tensor_key(a.astype(dt))] = key
                if a.ndim == 2:
                    keys[_tensor_key(a.T.astype(dt))] = key
        compared = len(branch)
        hits = [(n, keys[_tensor_key(a)]) for n, a in candidates if _tensor_key(a) in keys]
        if hits:
            problems.append(f"initializers equal to branch weights: {hits[:3]}")
    if problems:
        raise ExportError("auxiliary branches not fully removed: " + "; ".join(problems))
    return BranchProof(plan.removed_branches, len(names), compared, (graph_ops, n_conv + n_lin),
                       graph_weights, trunk_weights)


def torch_to_onnx(module: nn.Module, example: torch.Tensor, input_name: str, output_names: Iterable[str],
                  opset: int = DEFAULT_OPSET) -> bytes:
    """``torch.onnx.export`` (TorchScript exporter) with a dynamic batch axis, into memory, quietly."""
    output_names = list(output_names)
    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[input_name], output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in (input_name, *output_names)},
        )
    return buf.getvalue()


def make_metadata(plan: DeployPlan, input_name: str, precision: str, weights: str):
    """The ``cnds.*`` metadata of an export (format owned by :mod:`cnds_runtime.metadata`)."""
    from cnds_runtime.metadata import ModelMetadata, OutputInfo

    net, data = plan.source, plan.source.data
    outputs = tuple(OutputInfo(name, plan.value_name(name, node), plan.network.node(node).out_shape.dims)
                    for name, node in plan.outputs)
    return ModelMetadata(
        spec_name=net.name, ir_hash=net.digest(), cnds_version=__version__, input_name=input_name,
        input_shape=net.input.dims, num_classes=net.num_classes, class_names=net.class_names, outputs=outputs,
        # The evaluation transform of cnds_compiler.data: resize to data.resize, or straight to the
        # input size when the spec gives none, then centre-crop to the input size.
        resize=data.resize or net.input.dims[1:], mean=data.mean, std=data.std, precision=precision,
        weights=weights,
    )


def attach_metadata(model, metadata) -> None:
    """Write ``metadata`` into ``model.metadata_props`` (replacing earlier ``cnds.*`` entries)."""
    from onnx import helper

    kept = {p.key: p.value for p in model.metadata_props if not p.key.startswith("cnds.")}
    del model.metadata_props[:]
    helper.set_model_props(model, {**kept, **metadata.to_props()})
    model.producer_name, model.producer_version = "cnds", __version__
    model.graph.name = metadata.spec_name
    model.doc_string = (f"cnds export of '{metadata.spec_name}' (IR {metadata.ir_hash}), trunk only, "
                        f"{metadata.precision}; preprocessing and class names in metadata_props cnds.*")


@dataclass
class ExportReport:
    """What :func:`export_onnx` did and measured."""

    path: Path
    plan: DeployPlan
    metadata: object
    opset: int
    size_bytes: int
    checker: str
    proof: BranchProof
    parity: ParityCheck
    precision_report: object | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        md, plan = self.metadata, self.plan
        outs = ", ".join(f"{o.name} ({'x'.join(map(str, o.shape))})" for o in md.outputs)
        removed = ", ".join(plan.removed_branches) or "none in the spec"
        p = self.proof
        lines = [
            f"{plan.source.name}: wrote {self.path} ({self.size_bytes / 1e6:.1f} MB, {md.precision}, opset "
            f"{self.opset}, dynamic batch)",
            f"weights: {md.weights}",
            f"outputs: {outs}" + (f"; pruned above: {', '.join(plan.pruned)}" if plan.pruned else ""),
            f"onnx.checker (full check): {self.checker}",
            f"branches removed: {removed}; graph proven branch-free ({p.names_scanned} names scanned, "
            f"{p.tensors_compared} branch weights compared, {p.weight_ops[0]}/{p.weight_ops[1]} weight ops, "
            f"{p.graph_weights:,} of {p.trunk_weights:,} trunk weights)",
            self.parity.describe(md.precision),
        ]
        if self.precision_report is not None:
            lines.extend(self.precision_report.lines())
        lines.extend(self.notes)
        return lines


def export_onnx(
    net: Network,
    output: str | Path,
    *,
    weights: str | Path | Mapping[str, torch.Tensor] | None = None,
    features: Iterable[str] | None = None,
    precision: str = "fp32",
    calibration=None,
    validation=None,
    calibration_size: int = 512,
    validation_size: int = 10_000,
    seed: int = 0,
    opset: int = DEFAULT_OPSET,
) -> ExportReport:
    """Lower ``net``'s trunk (no branches) to a checked, self-describing ONNX file at ``output``.

    Args:
        net: the checked IR of a spec (branches included; they are left out of the export).
        weights: a cnds checkpoint file (or a bare state dict file), a state dict in memory (trunk keys as
            ``CndsNet.state_dict()``; ``aux.`` entries are ignored), or ``None``: the spec's
            initialisation with ``seed``.
        features: trunk layer names (and/or ``logits``) to output; the graph stops at the deepest one.
        precision: ``fp32``, ``fp16`` or ``int8`` (static quantisation; needs ``calibration``).
        calibration: a data source (``str``) or an iterable of ``(images, labels)`` numpy batches.
        validation: the same kinds; for int8 it defaults to the calibration source's validation split.
    Returns:
        An :class:`ExportReport` (its ``lines()`` are what ``cnds-compile`` prints).
    Raises:
        CndsError subclasses for every user error; :class:`ExportError` (naming ``output``) if a check
        of the result fails, in which case nothing is written.
    """
    try:
        return _export(net, output, weights, features, precision, calibration, validation, calibration_size,
                       validation_size, seed, opset)
    except ExportError as e:
        if e.path is None:
            e.path = str(output)
        raise


def _export(net, output, weights, features, precision, calibration, validation, calibration_size,
            validation_size, seed, opset) -> ExportReport:
    import onnx

    if precision not in PRECISIONS:
        raise UnsupportedError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    if precision == "int8" and calibration is None:
        raise UnsupportedError("int8 export needs calibration data (--calibration-data SOURCE)")
    plan = plan_deploy(net, tuple(features) if features else None)
    loaded = load_weights(net, weights, seed)
    module = build_deploy_module(plan, loaded, weights)
    trunk_weights = sum(int(t.numel()) for t in module.state_dict().values() if t.is_floating_point())
    if trunk_weights * 4 > (2**31 - 2**26):
        raise UnsupportedError(f"'{net.name}' has {trunk_weights:,} weights, over ONNX's 2 GB single-file limit",
                               path=str(output))
    names = [name for name, _ in plan.outputs]
    input_name = "input" if "input" not in names else "images"
    example = torch.zeros(2, *net.input.dims)
    fp32_bytes = torch_to_onnx(module, example, input_name, names, opset)
    model = onnx.load_from_string(fp32_bytes)
    proof = prove_no_branches(model, plan, loaded, trunk_weights)
    parity = check_parity(fp32_bytes, module, input_name)
    notes = [] if loaded.trained else ["note: no --weights given; the model is untrained (spec initialisation, "
                                      f"seed {seed})"]
    precision_report = None
    if precision != "fp32":
        from .precision import reduce_precision

        model, parity, precision_report = reduce_precision(
            precision, module, fp32_bytes, input_name, plan,
            calibration=calibration, validation=validation,
            calibration_size=calibration_size, validation_size=validation_size, seed=seed,
        )
        proof = prove_no_branches(model, plan, loaded if precision == "fp16" else None, trunk_weights)
    metadata = make_metadata(plan, input_name, precision, loaded.description)
    attach_metadata(model, metadata)
    data = model.SerializeToString()
    try:
        onnx.checker.check_model(data, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0]
        raise ExportError(f"onnx.checker rejected the exported graph: {first}") from e
    from ..io import atomic_write_bytes

    atomic_write_bytes(output, data)  # an unwritable output is an OutputError naming it
    return ExportReport(Path(output), plan, metadata, opset, len(data), "passed", proof, parity,
                        precision_report, notes)
