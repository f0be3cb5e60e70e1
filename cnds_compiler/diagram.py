"""Graphviz DOT of a network in the spirit of the paper's Figure 1: trunk left to right, each
supervision branch in a dashed red box hanging off its tap layer."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .errors import CndsError
from .ir import Layer, Network, OpKind
from .summary import describe_layer

_COLORS = {OpKind.CONV2D: "#9ecae1", OpKind.LINEAR: "#a1d99b", OpKind.MAXPOOL: "#fdd0a2",
           OpKind.AVGPOOL: "#fdd0a2", OpKind.GAP: "#fdd0a2"}


def _node(node_id: str, layer: Layer) -> str:
    primary = next((op for op in layer.ops if op.kind.has_params), layer.ops[0])
    color = _COLORS.get(primary.kind, "#eeeeee")
    shape = layer.out_shape if layer.out_shape is not None else "?"  # a partial pipeline leaves shapes unknown
    label = f"{layer.name}\\n{describe_layer(layer)}\\n{shape}"
    return f'  {node_id} [label="{label}", fillcolor="{color}"];'


def to_dot(net: Network) -> str:
    lines = [
        f'digraph "{net.name}" {{',
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [color="#555555"];',
        f'  input [label="input\\n{net.input}", shape=ellipse, fillcolor="#ffffff"];',
    ]
    prev = "input"
    for layer in net.trunk:
        nid = f"t_{layer.name}"
        lines.append(_node(nid, layer))
        lines.append(f"  {prev} -> {nid};")
        prev = nid
    lines.append(f'  loss_main [label="softmax loss", shape=plaintext, fillcolor="#ffffff"];\n  {prev} -> loss_main;')
    for b in net.branches:
        lines.append(f"  subgraph cluster_{b.name} {{")
        lines.append(f'    label="supervision branch on {b.tap} ({b.loss.value}, α₀={b.schedule.alpha0:g})";')
        lines.append('    style=dashed; color=red; fontcolor=red; fontsize=10;')
        bprev = f"t_{b.tap}"
        for layer in b.layers:
            nid = f"b_{b.name}_{layer.name}"
            lines.append("  " + _node(nid, layer))
            lines.append(f"    {bprev} -> {nid} [style=dashed, color=red];")
            bprev = nid
        lid = f"b_{b.name}_loss"
        lines.append(f'    {lid} [label="{b.loss.value} loss", shape=plaintext, fillcolor="#ffffff"];')
        lines.append(f"    {bprev} -> {lid} [style=dashed, color=red];")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text: str, out: Path) -> None:
    """Render DOT to ``out`` (.svg/.png/.pdf) with Graphviz's ``dot``."""
    exe = shutil.which("dot")
    if exe is None:
        raise CndsError("Graphviz is not installed (apt-get install graphviz), cannot render", path=str(out))
    fmt = out.suffix.lstrip(".")
    tmp = out.with_name(f".{out.name}.tmp")
    result = subprocess.run([exe, f"-T{fmt}", "-o", str(tmp)], input=dot_text.encode(), capture_output=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CndsError(f"dot failed: {result.stderr.decode(errors='replace').strip()}", path=str(out))
    tmp.replace(out)
