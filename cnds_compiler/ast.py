"""Syntax tree of a .cnds file: what the user wrote, with spans, before any name is resolved."""

from __future__ import annotations

from dataclasses import dataclass

from .source import Span

# ---- expressions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Number:
    value: float | int
    span: Span


@dataclass(frozen=True, slots=True)
class Ref:
    """A bare name: a block parameter, ``classes``, or a word such as ``ceil`` or ``sgd``."""

    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class String:
    value: str
    span: Span


@dataclass(frozen=True, slots=True)
class BinOp:
    op: str
    """One of ``+ - * /``."""
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Neg:
    operand: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class ListValue:
    items: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument of a call: positional when ``name`` is ``None``."""

    name: str | None
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Call:
    """``name(args)`` or a bare ``name``: an op, a block, a policy such as ``step(0.1, every=20)``."""

    name: str
    args: tuple[Arg, ...]
    span: Span
    name_span: Span


Expr = Number | Ref | String | BinOp | Neg | ListValue | Call

# ---- statements --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    value: Expr
    span: Span
    key_span: Span


@dataclass(frozen=True, slots=True)
class NetworkDecl:
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class ExtendsDecl:
    path: str
    span: Span


@dataclass(frozen=True, slots=True)
class InputDecl:
    dims: tuple[int, int, int]
    span: Span


@dataclass(frozen=True, slots=True)
class ClassesDecl:
    value: Expr
    """A count, or a list of class-name strings."""
    span: Span


@dataclass(frozen=True, slots=True)
class InitDecl:
    call: Call
    span: Span


@dataclass(frozen=True, slots=True)
class PoolingDecl:
    mode: str
    span: Span


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    default: Expr | None
    span: Span


@dataclass(frozen=True, slots=True)
class BlockDef:
    """``block NAME(params) = op op ...`` (``body``: a chain, inlined where used) or
    ``block NAME(params) { statements }`` (``graph``: a small graph whose input is ``in``)."""

    name: str
    params: tuple[Param, ...]
    body: tuple[Call, ...]
    span: Span
    name_span: Span
    graph: tuple[LayerDef, ...] | None = None

    @property
    def is_graph(self) -> bool:
        return self.graph is not None


@dataclass(frozen=True, slots=True)
class LayerDef:
    """``label: [sources ->] op op ... [if cond]``.

    ``repeat`` holds the suffixes of ``conv3_{1,2}`` (``("1", "2")``; ``layer1.{0,1}`` gives ``(".0", ".1")``).
    ``sources`` are the explicit inputs (``None``: the previous statement's value). A statement whose
    ``condition`` is zero is the identity on its one input.
    """

    name: str
    repeat: tuple[str, ...] | None
    ops: tuple[Call, ...]
    span: Span
    name_span: Span
    sources: tuple[tuple[str, Span], ...] | None = None
    condition: Expr | None = None

    def names(self) -> tuple[str, ...]:
        if self.repeat is None:
            return (self.name,)
        return tuple(self.name + suffix for suffix in self.repeat)


@dataclass(frozen=True, slots=True)
class Supervise:
    taps: tuple[tuple[str, Span], ...]
    settings: tuple[Setting, ...]
    layers: tuple[LayerDef, ...]
    span: Span
    head: tuple[str, Span] | None = None
    """``as NAME``: the head's own name (default: the tap's)."""


@dataclass(frozen=True, slots=True)
class Unsupervise:
    taps: tuple[tuple[str, Span], ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    settings: tuple[Setting, ...]
    span: Span
    name_span: Span


Statement = (
    NetworkDecl | ExtendsDecl | InputDecl | ClassesDecl | InitDecl | PoolingDecl | BlockDef | LayerDef
    | Supervise | Unsupervise | Section
)


@dataclass(frozen=True, slots=True)
class SpecFile:
    """One parsed file; ``extends`` is resolved later, by the lowering (``lang.merge``)."""

    path: str
    statements: tuple[Statement, ...]
