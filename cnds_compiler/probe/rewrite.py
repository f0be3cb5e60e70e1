"""Write a spec with supervision points inserted: the original text edited at span offsets.

Everything but the edited statements stays byte for byte as written, comments included:

* a ``supervise`` statement of the spec file whose tap is proposed is kept as it is (a hand-made branch
  beats the template); one whose tap is not proposed is deleted (its whole line(s) when nothing else is
  on them) unless ``keep_existing``; a branch inherited through ``extends`` is dropped with an
  ``unsupervise`` line;
* new ``supervise`` blocks (:func:`branch_template`) go where the first deleted block was, else after
  the file's last layer statement, else at the end of the file;
* when the output sits in another folder, the ``extends "..."`` path is rewritten to still name the base.

The result is compiled before it is written, so a written spec always compiles. Pure Python: no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import ast
from ..errors import CndsError, SupervisionError, did_you_mean
from ..ir import Network, OpKind, Shape

DEFAULT_ALPHA = 0.3
"""α₀ of a new branch (the paper's, decaying linearly per eq. 2)."""

BRANCH_MAP = 13
"""Spatial size the template's pooling aims for on large maps (CNDS-8's branch sees 64x13x13)."""


def _num(v: float | None) -> str:
    if v is None:
        return "none"
    return f"{float(v):g}"


def _pool_text(shape: Shape) -> str:
    _, h, w = shape.dims
    side = min(h, w)
    if side <= 2:
        return "gap"
    if side >= 2 * BRANCH_MAP:
        stride = side // BRANCH_MAP
        kernel = side - (BRANCH_MAP - 1) * stride  # exactly BRANCH_MAP outputs, whatever the rounding
        return f"avgpool({kernel}, stride={stride})"
    if side >= 5:
        return "avgpool(3, stride=2)"
    return "avgpool(2, stride=2)"


def _trunk_head(net: Network):
    """(first hidden linear op, its dropout p or None, the classifier op) of the trunk."""
    linears = [(layer, op) for layer in net.trunk for op in layer.ops if op.kind is OpKind.LINEAR]
    classifier = linears[-1][1] if linears else None
    hidden = linears[0] if len(linears) > 1 else None
    p = None
    if hidden is not None:
        drops = [op.attrs.p for op in hidden[0].ops if op.kind is OpKind.DROPOUT]
        p = drops[0] if drops else None
    return (hidden[1] if hidden else None), p, classifier


def branch_template(net: Network, tap: str) -> list[str]:
    """Body lines of a paper-style branch for ``tap``: pool → 1x1 conv → fc → fc → classifier.

    Sizing (from the tap's CxHxW output and the trunk):

    * pool: maps of side ≥ 26 are average-pooled to 13x13 (CNDS-8's branch map; stride ⌊side/13⌋,
      kernel side − 12·stride), sides 5–25 by ``avgpool(3, stride=2)``, 3–4 by ``avgpool(2)``, ≤ 2 by
      global average pooling;
    * 1x1 conv, no ReLU: C/4 channels, between 8 and 64 (CNDS-8: 256 → 64), the tap conv's bias;
    * two fc layers with ReLU: a quarter of the trunk's first fc width (4096 → 1024), at least
      min(1024, 2 × classes), with the trunk fc's bias and dropout;
    * classifier: ``linear(classes)`` with the trunk classifier's bias.
    """
    layer = net.layer(tap)
    shape = layer.out_shape
    if shape is None or not shape.spatial:
        raise SupervisionError(f"'{tap}' has no CxHxW output to branch from", layer.span)
    c = shape.dims[0]
    convs = [op for op in layer.ops if op.kind is OpKind.CONV2D]
    conv_bias = convs[-1].attrs.init.bias if convs else 0.0
    hidden, p, classifier = _trunk_head(net)
    width = max(hidden.attrs.out_features // 4 if hidden is not None else 0, min(1024, 2 * net.num_classes))
    fc_bias = hidden.attrs.init.bias if hidden is not None else 0.0
    cls_bias = classifier.attrs.init.bias if classifier is not None else 0.0
    tail = " relu" + (f" dropout({p:g})" if p else "")
    return [
        f"pool: {_pool_text(shape)}",
        f"conv: conv2d({min(64, max(8, c // 4))}, 1, bias={_num(conv_bias)})",
        f"fc1: linear({width}, bias={_num(fc_bias)}){tail}",
        f"fc2: linear({width}, bias={_num(fc_bias)}){tail}",
        f"classifier: linear(classes, bias={_num(cls_bias)})",
    ]


def supervise_block(net: Network, tap: str, alpha: float = DEFAULT_ALPHA, note: str | None = None) -> str:
    """A whole ``supervise`` statement (with a comment line when ``note``), ending in a newline."""
    lines = []
    if note:
        lines.append(f"# cnds-probe: {note}")
    named = "" if net.layer(tap).is_chain else f" as {tap.replace('.', '_')}_aux"  # a block instance's namespace
    lines.append(f"supervise {tap}{named} loss softmax weight {alpha:g} decay linear {{")
    lines.extend("  " + line for line in branch_template(net, tap))
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SpecEdit:
    """The edited text and what changed."""

    text: str
    added: tuple[str, ...]
    """Taps given a new template branch."""
    kept: tuple[str, ...]
    """Taps whose existing branch was kept."""
    removed: tuple[str, ...]
    """Taps whose branch was deleted or unsupervised."""


def _line_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen [start, end) to whole lines (with the newline) when only blanks share those lines."""
    ls = text.rfind("\n", 0, start) + 1
    le = text.find("\n", end)
    le = len(text) if le == -1 else le + 1
    if text[ls:start].strip() == "" and text[end:le].strip() == "":
        return ls, le
    return start, end


def edit_spec_text(
    spec_path: str | Path,
    net: Network,
    taps: Sequence[str],
    *,
    out_path: str | Path | None = None,
    alpha: float = DEFAULT_ALPHA,
    notes: Mapping[str, str] | None = None,
    keep_existing: bool = False,
    init: str | None = None,
) -> SpecEdit:
    """The text of ``spec_path`` with supervision exactly at ``taps`` (plus the existing ones when
    ``keep_existing``). ``net`` is the compiled spec; ``out_path`` is where the text will live. ``init``
    (a whole ``init …`` line, e.g. ``init kaiming(bias=0)``) replaces the spec's own, or is added."""
    from ..parser import parse_file

    spec_path = Path(spec_path)
    spec = parse_file(spec_path)
    if not spec.statements:
        raise CndsError("the spec is empty", path=str(spec_path))
    text = spec.statements[0].span.source.text
    trunk_names = [layer.name for layer in net.trunk]
    conv_names = [layer.name for layer in net.trunk if layer.is_conv]
    for tap in taps:
        if tap not in trunk_names:
            raise SupervisionError(f"'{tap}' is not a layer of {net.name}", hint=did_you_mean(tap, trunk_names))
        if tap not in conv_names:
            raise SupervisionError(f"'{tap}' is not a conv layer; supervision points tap conv feature maps")
    existing = [b.tap for b in net.branches]
    head_of = {b.tap: b.name for b in net.branches}  # what `unsupervise` names: the head

    def canonical(tap: str) -> str:  # `supervise layer2` taps layer2.1: compare statements, not spellings
        try:
            node = net.resolve(tap)
        except KeyError:
            return tap
        return next((layer.name for layer in net.trunk if layer.ops[-1].name == node), tap)

    wanted = set(taps) | (set(existing) if keep_existing else set())
    notes = dict(notes or {})

    edits: list[tuple[int, int, str]] = []
    own_taps: set[str] = set()
    insert_at: int | None = None
    kept, removed = [], []
    for st in spec.statements:
        if not isinstance(st, ast.Supervise):
            continue
        st_taps = [canonical(t) for t, _ in st.taps]
        own_taps.update(st_taps)
        keep = [t for t in st_taps if t in wanted]
        drop = [t for t in st_taps if t not in wanted]
        kept.extend(keep)
        removed.extend(drop)
        if not drop:
            continue
        if not keep:
            start, end = _line_bounds(text, st.span.start, st.span.end)
            edits.append((start, end, ""))
            if insert_at is None:
                insert_at = start
        else:  # a multi-tap statement losing some taps: unsupervise them right after it
            le = text.find("\n", st.span.end)
            le = len(text) if le == -1 else le + 1
            edits.append((le, le, f"unsupervise {', '.join(head_of.get(t, t) for t in drop)}\n"))
    inherited = [t for t in existing if t not in own_taps]
    dropped_inherited = [t for t in inherited if t not in wanted]
    kept.extend(t for t in inherited if t in wanted)
    removed.extend(dropped_inherited)
    order = {name: i for i, name in enumerate(trunk_names)}
    added = sorted((t for t in wanted if t not in kept), key=order.__getitem__)

    chunks = []
    if dropped_inherited:
        chunks.append(f"# cnds-probe: no supervision proposed at {', '.join(dropped_inherited)}\n"
                      f"unsupervise {', '.join(head_of.get(t, t) for t in dropped_inherited)}\n")
    chunks.extend(supervise_block(net, t, alpha, notes.get(t)) for t in added)
    if chunks:
        body = "\n".join(chunks)
        if insert_at is None:
            layers = [st for st in spec.statements if isinstance(st, ast.LayerDef)]
            if layers:
                le = text.find("\n", layers[-1].span.end)
                insert_at = len(text) if le == -1 else le + 1
            else:
                insert_at = len(text)
            body = "\n" + body
            nl = text.find("\n", insert_at)
            if text[insert_at : len(text) if nl == -1 else nl].strip():
                body += "\n"
        edits.append((insert_at, insert_at, body))

    extends = [st for st in spec.statements if isinstance(st, ast.ExtendsDecl)]
    if extends and out_path is not None:
        src_dir, out_dir = spec_path.resolve().parent, Path(out_path).resolve().parent
        if src_dir != out_dir:
            target = (src_dir / extends[0].path).resolve()
            shared = Path(os.path.commonpath([target, out_dir]))
            # relative while the two share a folder below the root, else absolute
            rel = os.path.relpath(target, out_dir) if shared != Path(shared.anchor) else str(target)
            edits.append((extends[0].span.start, extends[0].span.end, f'extends "{rel.replace(os.sep, "/")}"'))

    if init is not None:
        own = [st for st in spec.statements if isinstance(st, ast.InitDecl)]
        if own:
            edits.append((own[0].span.start, own[0].span.end, init))
        else:  # after the `network` line (a derived spec's header line overrides its base's)
            anchor = next(st for st in spec.statements if isinstance(st, (ast.NetworkDecl, ast.ExtendsDecl)))
            le = text.find("\n", anchor.span.end)
            le = len(text) if le == -1 else le + 1
            edits.append((le, le, init + "\n"))

    for start, end, new in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        text = text[:start] + new + text[end:]
    return SpecEdit(text, tuple(added), tuple(kept), tuple(removed))


def write_supervised_spec(
    spec_path: str | Path,
    net: Network,
    taps: Sequence[str],
    out_path: str | Path,
    *,
    alpha: float = DEFAULT_ALPHA,
    notes: Mapping[str, str] | None = None,
    keep_existing: bool = False,
    init: str | None = None,
) -> tuple[SpecEdit, Network]:
    """Write :func:`edit_spec_text`'s result to ``out_path`` once it compiles; return it and its IR."""
    from ..frontend import compile_text
    from ..io import atomic_write_text, refuse_unsafe_output

    out_path = Path(out_path)
    refuse_unsafe_output(out_path, "--write", (("the probed spec", spec_path),))
    edit = edit_spec_text(spec_path, net, taps, out_path=out_path, alpha=alpha, notes=notes,
                          keep_existing=keep_existing, init=init)
    try:
        new_net = compile_text(edit.text, str(out_path), base_dir=out_path.resolve().parent)
    except CndsError as e:  # a template that does not fit is a bug here, not the user's: say so plainly
        raise CndsError(f"the edited spec does not compile ({e.headline()}); nothing was written",
                        path=str(out_path)) from e
    atomic_write_text(out_path, edit.text)
    return edit, new_net
