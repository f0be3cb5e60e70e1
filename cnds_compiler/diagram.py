"""Graphviz DOT of a network in the spirit of the paper's Figure 1: the trunk left to right with its
parallel paths (one box per statement: an inception module, a residual block, a layer), each supervision
branch in a dashed red box hanging off its tap."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from .errors import CndsError
from .ir import INPUT_NODE, Layer, Network, OpKind
from .summary import describe_layer

_COLORS = {OpKind.CONV2D: "#9ecae1", OpKind.LINEAR: "#a1d99b", OpKind.MAXPOOL: "#fdd0a2",
           OpKind.AVGPOOL: "#fdd0a2", OpKind.GAP: "#fdd0a2", OpKind.CONCAT: "#dadaeb", OpKind.ADD: "#dadaeb"}


def _id(prefix: str, name: str) -> str:
    return prefix + re.sub(r"\W", "_", name)


def _box(node_id: str, layer: Layer, label_name: str) -> str:
    primary = next((op for op in layer.ops if op.kind.has_params), layer.ops[-1])
    color = _COLORS.get(primary.kind, "#eeeeee")
    shape = layer.out_shape if layer.out_shape is not None else "?"  # a partial pipeline leaves shapes unknown
    what = describe_layer(layer)
    if len(what) > 48:
        what = f"{len(layer.ops)} ops, {sum(op.kind is OpKind.CONV2D for op in layer.ops)} conv"
    return f'  {node_id} [label="{label_name}\\n{what}\\n{shape}", fillcolor="{color}"];'


def _by_statement(layer: Layer, statements) -> list[tuple[str, tuple]]:
    """A block instance's nodes by the statement of its body they came from: each statement's output
    node, then back along single-input nodes that no other statement claims."""
    ours = {op.name for op in layer.ops}
    owner_of_output = {st.output: st.name for st in statements
                       if st.output in ours and st.name.startswith(layer.name + ".")}
    owner: dict[str, str] = {}
    for op in reversed(layer.ops):
        owner.setdefault(op.name, owner_of_output.get(op.name, op.name))
        if len(op.inputs) == 1 and op.inputs[0] in ours and op.inputs[0] not in owner_of_output:
            owner.setdefault(op.inputs[0], owner[op.name])
    groups: dict[str, list] = {}
    for op in layer.ops:
        groups.setdefault(owner[op.name], []).append(op)
    return [(name, tuple(ops)) for name, ops in groups.items()]


def to_dot(net: Network) -> str:
    lines = [
        f'digraph "{net.name}" {{',
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [color="#555555"];',
        f'  input [label="input\\n{net.input}", shape=ellipse, fillcolor="#ffffff"];',
    ]
    box_of = {INPUT_NODE: "input"}
    inner_statements = [st for st in net.statements if not st.top]
    for layer in net.trunk:
        if layer.is_chain:
            box_of.update({op.name: _id("t_", layer.name) for op in layer.ops})
            lines.append(_box(_id("t_", layer.name), layer, layer.name))
            continue
        # a block instance: a grey box around its own statements, so parallel paths show
        lines.append(f"  subgraph cluster_block_{_id('', layer.name)} {{")
        call = layer.span.text.split(":", 1)[-1].split("#")[0].strip().replace('"', "'")
        lines.append(f'    label="{layer.name}: {call}"; style="rounded,dashed"; color="#888888"; fontsize=10;')
        for name, ops in _by_statement(layer, inner_statements):
            box_of.update({op.name: _id("t_", name) for op in ops})
            lines.append("  " + _box(_id("t_", name), Layer(name, ops, layer.span), name.removeprefix(layer.name + ".")))
        lines.append("  }")
    branches = [(h, net.groups(net.head_nodes(h))) for h in net.supervision_heads]
    for _, layers in branches:
        for layer in layers:  # group names are qualified (conv3_2.fc1): unique across branches
            box_of.update({op.name: _id("b_", layer.name) for op in layer.ops})

    def edges(layers, style: str) -> None:
        drawn = set()
        for layer in layers:
            for op in layer.ops:
                for i in op.inputs:
                    edge = (box_of.get(i), box_of[op.name])
                    if edge[0] is not None and edge[0] != edge[1] and edge not in drawn:
                        drawn.add(edge)
                        lines.append(f"  {edge[0]} -> {edge[1]}{style};")

    edges(net.trunk, "")
    if net.heads:
        lines.append(f'  loss_main [label="softmax loss", shape=plaintext, fillcolor="#ffffff"];\n'
                     f"  {box_of[net.main.node]} -> loss_main;")
    for head, layers in branches:
        lines.append(f"  subgraph cluster_{_id('', head.name)} {{")
        tap = net.tap_name(head)
        named = "" if head.name == tap else f"{head.name} "
        lines.append(f'    label="supervision branch {named}on {tap} ({head.loss.value}, α₀={head.schedule.alpha0:g})";')
        lines.append('    style=dashed; color=red; fontcolor=red; fontsize=10;')
        for layer in layers:
            lines.append("  " + _box(_id("b_", layer.name), layer, layer.name.removeprefix(head.name + ".")))
        lid = _id("b_", head.name) + "_loss"
        lines.append(f'    {lid} [label="{head.loss.value} loss", shape=plaintext, fillcolor="#ffffff"];')
        lines.append(f"    {box_of[head.node]} -> {lid} [style=dashed, color=red];")
        lines.append("  }")
        edges(layers, " [style=dashed, color=red]")  # outside the box: an edge inside would pull the tap in
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text: str, out: Path) -> None:
    """Render DOT to ``out`` (.svg/.png/.pdf) with Graphviz's ``dot``."""
    exe = shutil.which("dot")
    if exe is None:
        raise CndsError("Graphviz is not installed (apt-get install graphviz), cannot render", path=str(out))
    fmt = out.suffix.lstrip(".").lower()
    tmp = out.with_name(f".{out.name}.tmp")
    result = subprocess.run([exe, f"-T{fmt}", "-o", str(tmp)], input=dot_text.encode(), capture_output=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CndsError(f"dot failed: {result.stderr.decode(errors='replace').strip()}", path=str(out))
    tmp.replace(out)
