"""Values of spec expressions and the checks that turn them into typed settings.

Also the one argument binder: op calls, block calls, policies and ``init`` bind their arguments here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import ast
from ..errors import ArgumentError, UnknownNameError, did_you_mean
from ..source import Span

# ---- values --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Word:
    """A bare name used as a value (``ceil``, ``sgd``, ``none``)."""

    name: str


@dataclass(frozen=True, slots=True)
class Policy:
    """A call used as a value: ``step(0.1, every=20)``, ``gaussian(std=0.01)``."""

    call: ast.Call


def evaluate(expr: ast.Expr, env: dict[str, Any]) -> Any:
    """Value of an expression; names in ``env`` are substituted, other names become :class:`Word`."""
    if isinstance(expr, ast.Number):
        return expr.value
    if isinstance(expr, ast.String):
        return expr.value
    if isinstance(expr, ast.Ref):
        return env[expr.name] if expr.name in env else Word(expr.name)
    if isinstance(expr, ast.ListValue):
        return [evaluate(item, env) for item in expr.items]
    if isinstance(expr, ast.Call):
        return Policy(expr)
    if isinstance(expr, ast.Neg):
        return -_number(evaluate(expr.operand, env), expr.operand, env)
    if isinstance(expr, ast.BinOp):
        left = _number(evaluate(expr.left, env), expr.left, env)
        right = _number(evaluate(expr.right, env), expr.right, env)
        if expr.op == "+":
            return left + right
        if expr.op == "-":
            return left - right
        if expr.op == "*":
            return left * right
        if right == 0:
            raise ArgumentError("division by zero", expr.span)
        try:
            result = left / right
        except OverflowError:  # int / int beyond the float range
            raise ArgumentError("number too large", expr.span) from None
        return int(result) if float(result).is_integer() and isinstance(left, int) else result
    raise TypeError(f"unknown expression {expr!r}")


def _number(value: Any, expr: ast.Expr, env: dict[str, Any]) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, Word):
            raise UnknownNameError(
                f"unknown name '{value.name}' in arithmetic", expr.span, hint=did_you_mean(value.name, env)
            )
        raise ArgumentError("arithmetic needs numbers", expr.span)
    return value


def _describe(value: Any) -> str:
    if isinstance(value, Word):
        return f"'{value.name}'"
    if isinstance(value, Policy):
        return f"'{value.call.name}(...)'"
    return repr(value)


# ---- argument checking ------------------------------------------------------------------------------


MAX_INT = 2**31 - 1
"""Largest integer a spec may give (sizes, counts, epochs, seed); beyond it no backend can follow."""


def as_int(value: Any, span: Span, what: str, minimum: int = 1, maximum: int = MAX_INT) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{what} must be an integer, got {_describe(value)}", span)
    if value < minimum:
        raise ArgumentError(f"{what} must be >= {minimum}, got {value}", span)
    if value > maximum:
        shown = value if value.bit_length() <= 64 else f"a {len(str(value))}-digit number"
        raise ArgumentError(f"{what} must be <= {maximum}, got {shown}", span)
    return value


def as_float(value: Any, span: Span, what: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(f"{what} must be a number, got {_describe(value)}", span)
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        raise ArgumentError(f"{what} is too large", span) from None
    if not math.isfinite(value):
        raise ArgumentError(f"{what} must be a finite number, got {value}", span)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ArgumentError(f"{what} must be in {bounds}, got {value}", span)
    return float(value)


def as_pair(value: Any, span: Span, what: str, minimum: int = 1) -> tuple[int, int]:
    if isinstance(value, list):
        if len(value) != 2:
            raise ArgumentError(f"{what} takes one integer or [height, width]", span)
        return (as_int(value[0], span, what, minimum), as_int(value[1], span, what, minimum))
    v = as_int(value, span, what, minimum)
    return (v, v)


def as_word(value: Any, span: Span, what: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, Word) or value.name not in choices:
        shown = value.name if isinstance(value, Word) else _describe(value)
        raise ArgumentError(
            f"{what} must be one of {', '.join(choices)}; got {shown}",
            span,
            hint=did_you_mean(shown, choices) if isinstance(value, Word) else None,
        )
    return value.name


def as_bool(value: Any, span: Span, what: str) -> bool:
    return as_word(value, span, what, ("true", "false")) == "true"



# ---- the one argument binder ---------------------------------------------------------------------------

REQUIRED = object()
"""Default of a parameter that must be given."""


def bind_args(
    callee: str, names: list[str], args: list[tuple[str | None, Any, Span]]
) -> tuple[dict[str, Any], dict[str, Span]]:
    """Match positional and keyword ``args`` to ``names`` (defaults are the caller's business).

    ``callee`` names what is called in messages (``conv2d``, ``block 'inception'``).
    """
    bound: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    positional_done = False
    for key, value, span in args:
        if key is None:
            if positional_done:
                raise ArgumentError("positional argument after a keyword argument", span)
            if len(bound) >= len(names):
                raise ArgumentError(
                    f"{callee} takes no arguments" if not names
                    else f"{callee} takes at most {len(names)} arguments ({', '.join(names)})", span
                )
            key = names[len(bound)]
        else:
            positional_done = True
            if key not in names:
                raise UnknownNameError(
                    f"{callee} has no parameter '{key}' (it takes {', '.join(names) or 'none'})",
                    span,
                    hint=did_you_mean(key, names),
                )
            if key in bound:
                raise ArgumentError(f"{callee}: '{key}' given twice", span)
        bound[key] = value
        spans[key] = span
    return bound, spans


@dataclass(frozen=True)
class Signature:
    """Parameters of a built-in op or policy, in positional order, with defaults (``REQUIRED`` = none)."""

    params: tuple[tuple[str, Any], ...]

    def bind(self, callee: str, call: ast.Call, args: list[tuple[str | None, Any, Span]]):
        names = [p for p, _ in self.params]
        bound, spans = bind_args(callee, names, args)
        for name, default in self.params:
            if name not in bound:
                if default is REQUIRED:
                    raise ArgumentError(f"{callee} needs '{name}' ({', '.join(names)})", call.span)
                bound[name] = default
                spans[name] = call.span
        return bound, spans
