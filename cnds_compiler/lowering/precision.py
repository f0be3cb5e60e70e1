"""Reduced-precision exports, both derived from the checked fp32 graph: fp16 (float16 weights and compute,
float32 in and out) and int8 (onnxruntime static quantisation: QDQ, per-channel int8 weights, uint8
activations calibrated on real images). Each is compared with the fp32 export for accuracy on a
validation set and for speed on this machine."""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends.pytorch import GraphModule
from ..errors import DataError, ExportError
from ..ir import Network
from .deploy import LOGITS, DeployPlan
from .parity import ParityCheck, check_parity, cpu_session

Batches = Iterable[tuple[np.ndarray, np.ndarray | None]]
"""``(images (N, C, H, W) float32 prepared as for evaluation, labels (N,) or None)`` batches."""


def source_batches(source: str, net: Network, split: str, limit: int, seed: int = 0,
                   batch_size: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
    """A seeded random subset of at most ``limit`` examples of ``split`` (``train`` or ``val``) of a data
    source, through ``cnds_compiler.data``'s evaluation transform (centre crop, no flips)."""
    from ..data import load_source, make_loader

    limits = {"limit_train": limit} if split == "train" else {"limit_val": limit}
    splits = load_source(source, net, seed=seed, **limits)
    dataset = splits.train if split == "train" else splits.val
    if split == "train" and hasattr(dataset, "train"):
        # calibration must see what evaluation sees: centre crops, no flips (cnds datasets augment
        # only while their ``train`` flag is set)
        dataset.train = dataset.mirror = False
    if len(dataset) == 0:
        raise DataError(f"data source has no {split} examples", path=source)
    out = []
    for images, labels, _skipped in make_loader(dataset, batch_size, shuffle=False, seed=seed):
        if len(images):
            out.append((images.numpy().astype(np.float32, copy=False), labels.numpy()))
    return out


def _as_batches(data, net: Network, split: str, limit: int, seed: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    if isinstance(data, (str, Path)):
        return source_batches(str(data), net, split, limit, seed)
    out, n = [], 0
    for item in data:
        images, labels = item if isinstance(item, tuple) else (item, None)
        images = np.asarray(images, dtype=np.float32)
        take = min(len(images), limit - n)
        out.append((images[:take], None if labels is None else np.asarray(labels)[:take]))
        n += take
        if n >= limit:
            break
    if not out:
        raise DataError(f"no {split} data given")
    return out


def quantize_int8(fp32_bytes: bytes, calibration: list[np.ndarray], input_name: str,
                  *, per_channel: bool = True) -> bytes:
    """onnxruntime static quantisation: QDQ format, int8 per-channel weights, uint8 activations,
    min/max ranges from the ``calibration`` batches. The graph is pre-processed (shape inference,
    graph optimisation) first, as onnxruntime recommends."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calibration)

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs every pre-processing hint
    try:
        with tempfile.TemporaryDirectory(prefix="cnds-int8-") as tmp:
            src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
            src.write_bytes(fp32_bytes)
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )
            return dst.read_bytes()
    finally:
        logging.getLogger().setLevel(level)


_FP16_MAX = float(np.finfo(np.float16).max)


def convert_float16(model):
    """An fp32 ``onnx.ModelProto`` computing in float16, float32 in and out.

    Every float initializer and float ``Constant`` becomes float16 (clipped to its range); a ``Cast``
    follows the graph input and precedes every graph output, so callers still feed and get float32.
    Value types are then re-inferred. Works on the graph, so every op the fp32 export has (LRN
    included, which PyTorch cannot trace in half precision on CPU) is covered.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = copy.deepcopy(model)
    graph = model.graph

    def half(t):
        a = np.clip(numpy_helper.to_array(t), -_FP16_MAX, _FP16_MAX).astype(np.float16)
        return numpy_helper.from_array(a, t.name)

    def convert(g, top: bool) -> None:
        for i, init in enumerate(g.initializer):
            if init.data_type == TensorProto.FLOAT:
                g.initializer[i].CopyFrom(half(init))
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(half(attr.t))
                elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
                elif attr.type == onnx.AttributeProto.GRAPH:
                    convert(attr.g, False)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        convert(sub, False)
        if not top:  # a subgraph (If/Loop body): every float value in it is now float16
            for v in (*g.input, *g.output, *g.value_info):
                if v.type.tensor_type.elem_type == TensorProto.FLOAT:
                    v.type.tensor_type.elem_type = TensorProto.FLOAT16

    convert(graph, True)
    nodes = list(graph.node)
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            cast = inp.name + "_fp16"
            for node in nodes:
                node.input[:] = [cast if n == inp.name else n for n in node.input]
            nodes.insert(0, helper.make_node("Cast", [inp.name], [cast], name=f"/cast_in/{inp.name}",
                                             to=TensorProto.FLOAT16))
    for out in graph.output:
        if out.type.tensor_type.elem_type == TensorProto.FLOAT:
            half_name = out.name + "_fp16"
            for node in nodes:
                node.output[:] = [half_name if n == out.name else n for n in node.output]
                node.input[:] = [half_name if n == out.name else n for n in node.input]
            nodes.append(helper.make_node("Cast", [half_name], [out.name], name=f"/cast_out/{out.name}",
                                          to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def images_per_second(model_bytes: bytes, batch: np.ndarray, input_name: str, *, threads: int | None = None,
                      seconds: float = 1.0, min_runs: int = 3) -> float:
    """Throughput of an onnxruntime CPU session on ``batch`` (after two warm-up runs)."""
    session = cpu_session(model_bytes, threads)
    feed = {input_name: np.ascontiguousarray(batch, dtype=np.float32)}
    for _ in range(2):
        session.run(None, feed)
    runs, start = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < seconds:
        session.run(None, feed)
        runs += 1
    return runs * len(batch) / (time.perf_counter() - start)


@dataclass(frozen=True, slots=True)
class PrecisionReport:
    """Reduced precision against fp32, both through onnxruntime on this machine."""

    precision: str
    examples: int
    """Validation examples compared (0: no validation data)."""
    top1_fp32: float | None
    top1: float | None
    agreement: float | None
    """Fraction of examples whose top-1 class is the same in both models."""
    max_abs_diff: float | None
    """Largest |difference| of any output on the validation examples."""
    speed_fp32: float
    speed: float
    speed_batch: int

    def lines(self) -> list[str]:
        p = self.precision
        lines = []
        if self.top1 is not None:
            delta = (self.top1 - self.top1_fp32) * 100
            lines.append(f"{p} accuracy: top-1 {self.top1_fp32:.2%} (fp32) -> {self.top1:.2%} ({p}), "
                         f"{delta:+.2f} points on {self.examples} validation images; "
                         f"top-1 agreement {self.agreement:.2%}")
        elif self.examples:
            lines.append(f"{p} outputs on {self.examples} validation images: max |diff| vs fp32 "
                         f"{self.max_abs_diff:.3g}")
        else:
            lines.append(f"{p} accuracy: not measured (give --val-data SOURCE)")
        lines.append(f"{p} speed: {self.speed_fp32:.1f} -> {self.speed:.1f} img/s "
                     f"({self.speed / self.speed_fp32:.2f}x fp32; onnxruntime CPU, batch {self.speed_batch})")
        return lines


def compare_precision(precision: str, fp32_bytes: bytes, reduced_bytes: bytes, input_name: str,
                      plan: DeployPlan, validation: list[tuple[np.ndarray, np.ndarray | None]] | None,
                      speed_seconds: float = 1.0) -> PrecisionReport:
    """Accuracy (when ``validation`` has labels and the model has logits) and speed of both models."""
    examples, top1_ref, top1, agree, max_diff = 0, None, None, None, None
    if validation:
        ref_s, red_s = cpu_session(fp32_bytes), cpu_session(reduced_bytes)
        names = [o.name for o in ref_s.get_outputs()]
        correct_ref = correct = same = 0
        labelled = plan.has_logits and all(lab is not None for _, lab in validation)
        max_diff = 0.0
        for images, labels in validation:
            ref = dict(zip(names, ref_s.run(names, {input_name: images}), strict=True))
            red = dict(zip(names, red_s.run(names, {input_name: images}), strict=True))
            max_diff = max(max_diff, *(float(np.max(np.abs(ref[n] - red[n]))) for n in names))
            examples += len(images)
            if plan.has_logits:
                a, b = ref[LOGITS].argmax(1), red[LOGITS].argmax(1)
                same += int((a == b).sum())
                if labelled:
                    correct_ref += int((a == labels).sum())
                    correct += int((b == labels).sum())
        if plan.has_logits:
            agree = same / examples
        if labelled:
            top1_ref, top1 = correct_ref / examples, correct / examples
    c, h, w = plan.network.input.dims
    batch = 8 if sum(layer.flops for layer in plan.network.trunk) > 2e8 else 64
    x = np.random.default_rng(0).standard_normal((batch, c, h, w)).astype(np.float32)
    speed_ref = images_per_second(fp32_bytes, x, input_name, seconds=speed_seconds)
    speed = images_per_second(reduced_bytes, x, input_name, seconds=speed_seconds)
    return PrecisionReport(precision, examples, top1_ref, top1, agree, max_diff, speed_ref, speed, batch)


def reduce_precision(precision: str, module: GraphModule, fp32_bytes: bytes, input_name: str, plan: DeployPlan,
                     *, calibration=None, validation=None, calibration_size: int = 512,
                     validation_size: int = 10_000, seed: int = 0):
    """The fp16 or int8 model (``onnx.ModelProto``), its parity against PyTorch fp32, and its report."""
    import onnx

    net = plan.source
    if precision == "fp16":
        reduced = convert_float16(onnx.load_from_string(fp32_bytes)).SerializeToString()
    elif precision == "int8":
        calib = [images for images, _ in _as_batches(calibration, net, "train", calibration_size, seed)]
        reduced = quantize_int8(fp32_bytes, calib, input_name)
        if validation is None and isinstance(calibration, (str, Path)):
            validation = calibration
    else:
        raise ExportError(f"no reduced precision '{precision}'")
    val = _as_batches(validation, net, "val", validation_size, seed) if validation is not None else None
    parity: ParityCheck = check_parity(reduced, module, input_name, tolerance=None)
    if not np.isfinite(parity.max_abs_diff):
        raise ExportError(f"the {precision} model produces non-finite outputs")
    report = compare_precision(precision, fp32_bytes, reduced, input_name, plan, val)
    return _drop_unused_opsets(onnx.load_from_string(reduced)), parity, report


def _drop_unused_opsets(model):
    """Keep only the opset imports the graph's nodes use (the quantiser's pre-processing declares
    onnxruntime's private domains even when no node needs them)."""
    used = {n.domain for n in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model
