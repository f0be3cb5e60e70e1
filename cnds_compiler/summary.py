"""The summary table ``cnds-compile`` prints: one row per layer, branches marked, totals."""

from __future__ import annotations

from .ir import Layer, Network, Node, OpKind


def describe_op(op: Node) -> str:
    """Short text of one op, e.g. ``conv2d 64 7x7/2 p1``."""
    a = op.attrs
    if op.kind is OpKind.CONV2D:
        k = f"{a.kernel[0]}x{a.kernel[1]}" if a.kernel[0] != a.kernel[1] else f"{a.kernel[0]}x{a.kernel[0]}"
        s = f"/{a.stride[0]}" if a.stride != (1, 1) else ""
        extra = (f" p{a.pad[0]}" if any(a.pad) else "") + (f" g{a.groups}" if a.groups > 1 else "")
        return f"conv2d {a.out_channels} {k}{s}{extra}"
    if op.kind in (OpKind.MAXPOOL, OpKind.AVGPOOL):
        s = f"/{a.stride[0]}" if a.stride != a.kernel else ""
        return f"{op.kind.value} {a.kernel[0]}x{a.kernel[1]}{s}{' ceil' if a.ceil else ''}"
    if op.kind is OpKind.LINEAR:
        return f"linear {a.out_features}"
    if op.kind is OpKind.DROPOUT:
        return f"dropout {a.p:g}"
    if op.kind in (OpKind.CONCAT, OpKind.ADD):
        return f"{op.kind.value} of {len(op.inputs)}"
    return op.kind.value


def describe_layer(layer: Layer) -> str:
    """``conv2d 64 7x7/2 p1 + relu`` for a chain of ops; the call as written for a graph block instance."""
    if layer.is_chain:
        return " + ".join(describe_op(op) for op in layer.ops)
    text = layer.span.text.split(":", 1)[-1].split("#")[0].strip()
    return f"{text}  [{len(layer.ops)} ops]"


def _row(cells: list[str], widths: list[int]) -> str:
    left, right = cells[:4], cells[4:]
    return "  ".join([c.ljust(w) for c, w in zip(left, widths[:4], strict=True)]
                     + [c.rjust(w) for c, w in zip(right, widths[4:], strict=True)])


def _input_text(layer: Layer) -> str:
    """The layer's input; a flattening linear layer shows the flat size it sees (``8192 = 512x4x4``)."""
    x = layer.in_shape
    if layer.ops[0].kind is OpKind.LINEAR and x.spatial:
        return f"{x.numel} = {x}"
    return str(x)


def format_summary(net: Network, source: str | None = None) -> str:
    """The per-layer table with trunk and branch totals (needs a checked IR)."""
    header = ["layer", "op", "input", "output", "params", "MFLOPs"]
    rows: list[list[str] | str] = []

    def add(layer: Layer, mark: str) -> None:
        rows.append([mark + layer.name, describe_layer(layer), _input_text(layer), str(layer.out_shape), f"{layer.params:,}",
                     f"{layer.flops / 1e6:,.1f}"])

    for layer in net.trunk:
        add(layer, "  ")
    trunk_params = sum(layer.params for layer in net.trunk)
    trunk_flops = sum(layer.flops for layer in net.trunk)
    rows.append(["  trunk total", "", "", "", f"{trunk_params:,}", f"{trunk_flops / 1e6:,.1f}"])
    branch_params = branch_flops = 0
    for b in net.branches:
        s = b.schedule
        sched = {"linear": f"α₀={s.alpha0:g}, linear decay", "constant": f"α={s.alpha0:g} constant",
                 "list": "α per epoch " + ", ".join(f"{v:g}" for v in s.values)}[s.kind.value]
        rows.append(f"branch '{b.name}' on {b.tap} ({b.loss.value} loss, {sched})")
        for layer in b.layers:
            add(layer, "* ")
        branch_params += sum(layer.params for layer in b.layers)
        branch_flops += sum(layer.flops for layer in b.layers)
    if net.branches:
        rows.append(["* branches total", "", "", "", f"{branch_params:,}", f"{branch_flops / 1e6:,.1f}"])
    table_rows = [r for r in rows if isinstance(r, list)]
    widths = [max(len(r[i]) for r in table_rows + [header]) for i in range(6)]
    lines = []
    title = f"network {net.name}: input {net.input}, {net.num_classes} classes"
    if source:
        title += f"  ({source})"
    lines.append(title)
    lines.append(_row(["  " + header[0]] + header[1:], widths))
    lines.append("-" * (sum(widths) + 10))
    for r in rows:
        if isinstance(r, str):
            lines.append("-- " + r + " " + "-" * max(0, sum(widths) + 6 - len(r)))
        else:
            if r[0].strip().endswith("total"):
                lines.append("-" * (sum(widths) + 10))
            lines.append(_row(r, widths))
    if net.branches:
        lines.append("(* = training-only supervision branch; removed from the deployed network)")
    return "\n".join(lines)
