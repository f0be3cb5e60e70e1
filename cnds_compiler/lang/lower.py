"""AST → IR graph: the first stage of the pipeline (before the passes, under the same callback).

Every statement defines a named value. A statement with no explicit input reads the previous statement's
value (so a chain spec is a chain); ``a, b -> op`` and ``concat(a, b)`` / ``add(a, b)`` name their inputs.
Chain blocks (``block conv(c) = conv2d(c, 3) relu``) are inlined into the statement's nodes; graph blocks
(``block inception(...) { ... }``) become a namespace of nodes (``inception_4a.b3``) whose input is ``in``
and whose value is their last statement's. ``supervise TAP [as NAME] { ... }`` lowers to nodes named
``NAME.stmt`` and a :class:`~cnds_compiler.ir.Head`. Every name is resolved here, so a misspelt op, block,
input or setting is an :class:`UnknownNameError` at its span with "did you mean ...?".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import ast
from ..errors import ArgumentError, CndsError, DuplicateNameError, UnknownNameError, did_you_mean
from ..ir import (
    INPUT_NODE,
    MAIN_HEAD,
    MULTI_INPUT,
    DataConfig,
    Head,
    LossKind,
    Network,
    NoAttrs,
    Node,
    OpKind,
    ScheduleKind,
    Shape,
    Statement,
    TrainConfig,
    WeightSchedule,
)
from ..source import Source, Span
from .merge import Merged, load
from .ops import BUILTIN_OPS, GRAPH_OPS, SIGNATURES, Defaults
from .settings import DATA_KEYS, TRAIN_KEYS, classes_of, head_settings, init_of, pooling_of, section_of
from .values import Word, as_float, bind_args, evaluate

MAX_BLOCK_DEPTH = 32
MAX_LAYER_OPS = 1000
"""Most ops one statement may expand to."""
MAX_NODES = 100_000
"""Most nodes a network may have (graph blocks repeated inside graph blocks multiply quickly)."""
MAX_INPUT_CHANNELS = 4096
"""Most input channels (``data { mean ... }`` is expanded to one value per channel)."""
MAX_INPUT_SIZE = 65536
BLOCK_INPUT = "in"
"""The name of a scope's input: a graph block's input, a head's tap, the network's input at top level."""
_GRAPH_OP_KINDS = {name: kind for kind, name in GRAPH_OPS.items()}


@dataclass
class _Scope:
    """Where statements are being lowered: the network, a graph block instance or a head."""

    prefix: str
    """Prepended to statement names: ``""``, ``"inception_4a."``, ``"loss1."``."""
    env: dict[str, Any]
    """Block parameters and ``classes`` in force."""
    input: str
    """Node that ``in`` stands for."""
    what: str
    """For messages: ``the network``, ``block 'inception'``, ``the branch 'loss1'``."""
    closed: bool
    """A graph block's body sees only its own statements and ``in`` (blocks are not closures)."""
    group: str | None = None
    """Top-level statement the nodes belong to (``None``: each statement is its own)."""
    stack: tuple[str, ...] = ()
    names: dict[str, str] = field(default_factory=dict)
    """Local statement name → output node, as defined so far."""
    spans: dict[str, Span] = field(default_factory=dict)
    later: dict[str, Span] = field(default_factory=dict)
    """Local statement names defined further down (for "defined later" errors)."""


class _Lowering:
    def __init__(self, merged: Merged, defaults: Defaults, env: dict[str, Any], input_span: Span) -> None:
        self.m = merged
        self.defaults = defaults
        self.env = env
        self.nodes: list[Node] = [Node(INPUT_NODE, OpKind.INPUT, NoAttrs(), (), input_span, INPUT_NODE)]
        self.node_spans: dict[str, Span] = {INPUT_NODE: input_span}
        self.statements: list[Statement] = []
        self.values: dict[str, str] = {}
        """Qualified statement name → output node, for every statement lowered so far."""
        self.top_values: dict[str, str] = {}
        """The same for the spec's own (top-level) statements, in order."""
        self.top_statement: Span | None = None
        """The spec statement being lowered (what a size error points at, not a line inside a block)."""

    # ---- names -----------------------------------------------------------------------------------
    def resolve(self, name: str, span: Span, scope: _Scope) -> str:
        """The node a value name in ``scope`` stands for."""
        if name == BLOCK_INPUT:
            return scope.input
        if name in scope.names:
            return scope.names[name]
        if not scope.closed:
            if name in self.values:
                return self.values[name]
            if name in self.node_spans and name != INPUT_NODE:
                return name
            stage = [v for k, v in self.top_values.items() if k.startswith(name + ".")]
            if stage:  # `layer3` stands for its last statement (layer3.1), as in torchvision's Sequential
                return stage[-1]
        if name in scope.later:
            raise UnknownNameError(
                f"'{name}' is defined later in {scope.what}; a statement reads only values defined before it",
                span, notes=((scope.later[name], "defined here"),),
            )
        known = [BLOCK_INPUT, *scope.names] + ([] if scope.closed else [*self.values])
        raise UnknownNameError(f"no value named '{name}' in {scope.what}", span,
                               hint=did_you_mean(name, dict.fromkeys(known)))

    def add_node(self, node: Node, statement: Span) -> None:
        if node.name in self.node_spans:
            raise DuplicateNameError(
                f"the name '{node.name}' is defined twice", statement,
                notes=((self.node_spans[node.name], "first defined here"),),
                hint="ops after the first in a statement are named NAME_relu, NAME_dropout, ...",
            )
        if len(self.nodes) >= MAX_NODES:
            # point at the spec statement whose expansion (repetitions times blocks) crossed the limit
            top = self.top_statement or statement
            notes = ((node.span, "while expanding this op"),) if node.span != top else ()
            raise ArgumentError(f"the network has more than {MAX_NODES:,} nodes", top, notes=notes)
        self.node_spans[node.name] = node.span
        self.nodes.append(node)

    # ---- statements ----------------------------------------------------------------------------------
    def statements_in(self, defs: list[tuple[str, ast.LayerDef]], scope: _Scope, prev: str) -> str:
        """Lower ``defs`` in order; return the last one's value."""
        for name, d in defs:
            scope.later.setdefault(name, d.name_span)
        for name, d in defs:
            scope.later.pop(name, None)
            if name in scope.names:
                raise DuplicateNameError(
                    f"'{name}' defined twice in {scope.what}", d.name_span, notes=((scope.spans[name], "first defined here"),)
                )
            prev = self.statement(name, d, scope, prev)
            scope.names[name] = prev
            scope.spans[name] = d.name_span
        return prev

    def statement(self, name: str, d: ast.LayerDef, scope: _Scope, prev: str) -> str:
        if not scope.stack:  # a statement of the spec itself (network or branch), not one inside a block
            self.top_statement = d.span
        full = scope.prefix + name
        group = scope.group or full
        first = d.ops[0]
        graph_op = _GRAPH_OP_KINDS.get(first.name)
        if graph_op is not None and first.name not in self.m.blocks:
            if d.sources is not None:
                raise ArgumentError(
                    f"{first.name} names its inputs as arguments; drop the '->' inputs", d.sources[0][1]
                )
            inputs = tuple(self.resolve(*_value_arg(first, a), scope) for a in first.args)
            if len(inputs) < 2:
                raise ArgumentError(f"{first.name} needs at least two inputs, e.g. {first.name}(a, b)", first.span)
        elif d.sources is not None:
            inputs = tuple(self.resolve(n, s, scope) for n, s in d.sources)
        else:
            inputs = (prev,)
        if d.condition is not None and not self._condition(d.condition, scope.env):
            if len(inputs) != 1:
                raise ArgumentError("a statement switched off by 'if' passes its input on, so it needs exactly one",
                                    d.condition.span)
            self._record(full, inputs[0], d, scope)
            return inputs[0]
        block = self.m.blocks.get(first.name)
        if block is not None and block.is_graph:
            output = self.graph_block(full, d, block, inputs, scope, group)
        else:
            output = self.chain(full, d, inputs, scope, group, skip_first=graph_op is not None and block is None)
        self._record(full, output, d, scope)
        return output

    def _record(self, full: str, output: str, d: ast.LayerDef, scope: _Scope) -> None:
        self.statements.append(Statement(full, output, d.span, top=not scope.prefix or scope.group is None))
        self.values[full] = output
        if not scope.prefix:
            self.top_values[full] = output

    def _condition(self, expr: ast.Expr, env: dict) -> bool:
        value = evaluate(expr, env)
        if isinstance(value, Word) and value.name in ("true", "false"):
            return value.name == "true"
        return as_float(value, expr.span, "an 'if' condition (a number; 0 is false)") != 0

    def chain(self, full: str, d: ast.LayerDef, inputs: tuple[str, ...], scope: _Scope, group: str,
              skip_first: bool) -> str:
        ops: list[tuple[OpKind, Any, Span]] = []
        if skip_first:
            ops.append((_GRAPH_OP_KINDS[d.ops[0].name], NoAttrs(), d.ops[0].span))
        for call in d.ops[1:] if skip_first else d.ops:
            block = self.m.blocks.get(call.name)
            if block is not None and block.is_graph:
                raise ArgumentError(
                    f"graph block '{call.name}' must stand alone in its statement (give the ops around it their own)",
                    call.span,
                )
            if call.name in _GRAPH_OP_KINDS and call.name not in self.m.blocks:
                raise ArgumentError(f"{call.name} must be the first op of its statement", call.span)
            ops.extend(self.call(call, scope.env, call.span, scope.stack))
            if len(ops) > MAX_LAYER_OPS:
                raise ArgumentError(f"layer '{full}' has more than {MAX_LAYER_OPS} ops", call.span)
        if len(inputs) > 1 and ops[0][0] not in MULTI_INPUT:
            where = d.sources[0][1] if d.sources else d.span
            raise ArgumentError(f"{ops[0][0].value} reads one value, but {len(inputs)} are given", where,
                                hint="join them first with concat(...) or add(...)")
        prev_inputs = inputs
        name = full
        for name, (kind, attrs, span) in zip(_op_names(full, ops), ops, strict=True):
            self.add_node(Node(name, kind, attrs, prev_inputs, span, group), d.span)
            prev_inputs = (name,)
        return name

    def graph_block(self, full: str, d: ast.LayerDef, block: ast.BlockDef, inputs: tuple[str, ...],
                    scope: _Scope, group: str) -> str:
        call = d.ops[0]
        if len(d.ops) > 1:
            raise ArgumentError(
                f"graph block '{call.name}' must stand alone in its statement (give the ops after it their own)",
                d.ops[1].span,
            )
        if len(inputs) != 1:
            raise ArgumentError(f"block '{block.name}' reads one value ('in'), but {len(inputs)} are given", call.span)
        if call.name in scope.stack or len(scope.stack) > MAX_BLOCK_DEPTH:
            what = "uses itself" if call.name in scope.stack else f"nests blocks deeper than {MAX_BLOCK_DEPTH} levels"
            raise ArgumentError(f"block '{call.name}' {what}", call.span)
        if not block.graph:
            raise ArgumentError(f"block '{block.name}' has no statements", block.name_span)
        inner = self.bind_block(block, call, scope.env)
        body = _Scope(full + ".", inner, inputs[0], f"block '{block.name}' (used as '{full}')", closed=True,
                      group=group, stack=scope.stack + (call.name,))
        return self.statements_in([(n, s) for s in block.graph for n in s.names()], body, inputs[0])

    def call(self, call: ast.Call, env: dict, use_span: Span, stack: tuple[str, ...]):
        """Expand a call into (kind, attrs, span) triples; ``use_span`` is where the user called it."""
        args = [(a.name, evaluate(a.value, env), a.span) for a in call.args]
        if call.name in BUILTIN_OPS and call.name not in _GRAPH_OP_KINDS:
            kind = BUILTIN_OPS[call.name]
            sig = SIGNATURES[kind]
            bound, spans = sig.bind(call.name, call, args)
            try:
                attrs = sig.build(bound, spans, self.defaults)
            except ValueError as e:  # an attrs invariant the argument checks did not catch
                raise ArgumentError(f"{call.name}: {e}", call.span) from None
            return [(kind, attrs, use_span)]
        block = self.m.blocks.get(call.name)
        if block is None:
            known = [op for op in BUILTIN_OPS if op not in _GRAPH_OP_KINDS] + list(self.m.blocks)
            raise UnknownNameError(
                f"unknown op or block '{call.name}'", call.name_span, hint=did_you_mean(call.name, known)
            )
        if block.is_graph:
            raise ArgumentError(f"graph block '{call.name}' cannot be used inside a chain block", call.span)
        if call.name in stack or len(stack) > MAX_BLOCK_DEPTH:
            what = "uses itself" if call.name in stack else f"nests blocks deeper than {MAX_BLOCK_DEPTH} levels"
            raise ArgumentError(f"block '{call.name}' {what}", call.span)
        inner = self.bind_block(block, call, env)
        result = []
        for body_call in block.body:
            result.extend(self.call(body_call, inner, use_span, stack + (call.name,)))
            if len(result) > MAX_LAYER_OPS:  # checked as it grows: `block a = b b` nested 30 deep is 2**30 ops
                raise ArgumentError(f"block '{call.name}' expands to more than {MAX_LAYER_OPS} ops", call.span)
        return result

    def bind_block(self, block: ast.BlockDef, call: ast.Call, env: dict) -> dict:
        args = [(a.name, evaluate(a.value, env), a.span) for a in call.args]
        given, _ = bind_args(f"block '{block.name}'", [p.name for p in block.params], args)
        inner = dict(self.env)  # globals only: blocks are not closures
        for p in block.params:
            if p.name in given:
                inner[p.name] = given[p.name]
            elif p.default is not None:
                inner[p.name] = evaluate(p.default, inner)
            else:
                raise ArgumentError(
                    f"block '{block.name}' needs '{p.name}'", call.span, notes=((block.name_span, "block defined here"),)
                )
        return inner

    # ---- heads -----------------------------------------------------------------------------------
    def head(self, name: str, name_span: Span, tap: str, st: ast.Supervise, top: _Scope) -> Head:
        tap_span = next(s for t, s in st.taps if t == tap)
        try:
            tap_node = self.resolve(tap, tap_span, top)
        except UnknownNameError as e:
            raise UnknownNameError(f"supervision point '{tap}' is not a layer of the trunk", tap_span,
                                   hint=e.hint) from None
        if (st.head is not None and name in self.values) or name == MAIN_HEAD:
            what = "the main head" if name == MAIN_HEAD else "a value of the network"
            raise DuplicateNameError(f"head name '{name}' is already {what}", name_span,
                                     hint=f"name the head: supervise {tap} as OTHER_NAME")
        if st.head is None and any(n.startswith(name + ".") for n in self.node_spans):
            raise DuplicateNameError(
                f"the branch on '{tap}' would name its nodes inside the block instance '{tap}'", name_span,
                hint=f"name the head: supervise {tap} as {tap.replace('.', '_')}_aux")
        loss, schedule = head_settings(st, tap, self.env)
        scope = _Scope(name + ".", self.env, tap_node, f"the branch '{name}'", closed=False, group=None)
        logits = self.statements_in([(n, d) for d in st.layers for n in d.names()], scope, tap_node)
        return Head(name, logits, loss, schedule, name_span, tap_node)


def _value_arg(call: ast.Call, arg: ast.Arg) -> tuple[str, Span]:
    if arg.name is not None or not isinstance(arg.value, ast.Ref):
        raise ArgumentError(f"{call.name} takes the names of the values it reads, e.g. {call.name}(a, b)", arg.span)
    return arg.value.name, arg.value.span


def _op_names(statement: str, ops: list[tuple[OpKind, Any, Span]]) -> list[str]:
    """The first op with parameters takes the statement's name (stable ``conv1.weight`` keys); the others
    are ``NAME_relu``, ``NAME_dropout``, ``NAME_relu2``; a statement without parameters names its first op."""
    primary = next((i for i, (k, _, _) in enumerate(ops) if k.has_params), 0)
    counts: dict[str, int] = {}
    result = []
    for i, (kind, _, _) in enumerate(ops):
        if i == primary:
            result.append(statement)
        else:
            counts[kind.value] = counts.get(kind.value, 0) + 1
            n = counts[kind.value]
            result.append(f"{statement}_{kind.value}" + (f"{n}" if n > 1 else ""))
    return result


def _header_span(spec: ast.SpecFile) -> Span:
    """Where a missing header line is reported: the first statement, or the start of an empty file."""
    if spec.statements:
        return spec.statements[0].span
    return Span(Source(spec.path, "\n"), 0, 0)


def lower(spec: ast.SpecFile, path: str | Path | None = None) -> Network:
    """Build the IR graph of ``spec`` (already parsed from ``path``), resolving its ``extends`` chain."""
    merged = Merged()
    root = Path(path if path is not None else spec.path).resolve()
    load(root, (root,), None, merged, spec)
    first = _header_span(spec)

    if merged.network is None:
        raise CndsError("the spec has no `network NAME` line", first, hint="start the file with e.g. `network my_net`")
    if merged.input is None:
        raise CndsError("the spec has no `input CxHxW` line", merged.network.span, hint="e.g. `input 3x227x227`")
    if merged.classes is None:
        raise CndsError("the spec has no `classes N` line", merged.network.span, hint="e.g. `classes 1000`")

    c, h, w = merged.input.dims
    if min(c, h, w) < 1 or c > MAX_INPUT_CHANNELS or max(h, w) > MAX_INPUT_SIZE:
        raise ArgumentError(
            f"input {c}x{h}x{w} is out of range (channels 1..{MAX_INPUT_CHANNELS}, height and width "
            f"1..{MAX_INPUT_SIZE})",
            merged.input.span,
        )
    num_classes, class_names = classes_of(merged.classes)
    env: dict[str, Any] = {"classes": num_classes, "__channels__": merged.input.dims[0]}
    defaults = Defaults(init=init_of(merged.init), ceil=pooling_of(merged.pooling))
    lowering = _Lowering(merged, defaults, {"classes": num_classes}, merged.network.span)

    if not merged.layers:
        raise CndsError("the spec defines no layers", merged.network.span)
    top = _Scope("", {"classes": num_classes}, INPUT_NODE, "the network", closed=False)
    logits = lowering.statements_in(list(merged.layers), top, INPUT_NODE)
    main = Head(MAIN_HEAD, logits, LossKind.SOFTMAX, WeightSchedule(ScheduleKind.CONSTANT, 1.0), merged.network.span)
    heads = [main]
    for name, name_span, tap, st in merged.supervise:
        heads.append(lowering.head(name, name_span, tap, st, top))
    train = section_of(merged.sections.get("train", {}), TRAIN_KEYS, env, TrainConfig())
    data = section_of(merged.sections.get("data", {}), DATA_KEYS, env, DataConfig())
    return Network(
        name=merged.network.name,
        input=Shape(merged.input.dims),
        num_classes=num_classes,
        class_names=class_names,
        nodes=tuple(lowering.nodes),
        heads=tuple(heads),
        statements=tuple(lowering.statements),
        train=train,
        data=data,
        span=merged.network.span,
        sources=tuple(merged.sources),
    )

