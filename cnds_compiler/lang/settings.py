"""Header lines, ``train { }``/``data { }`` sections and supervise settings: AST values → typed config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .. import ast
from ..errors import ArgumentError, DuplicateNameError, SupervisionError, UnknownNameError, did_you_mean
from ..ir import (
    MAX_SEED,
    InitScheme,
    LossKind,
    LrPolicy,
    ParamInit,
    ScheduleKind,
    WeightSchedule,
)
from ..source import Span
from .values import REQUIRED, Policy, Signature, Word, as_bool, as_float, as_int, as_pair, as_word, evaluate

# ---- settings of sections ------------------------------------------------------------------------

_LR_POLICIES = ("fixed", "step", "multistep", "cosine", "poly")


def _lr_policy(value: Any, span: Span, env: dict) -> LrPolicy:
    if isinstance(value, Word):
        name, args = value.name, []
    elif isinstance(value, Policy):
        name = value.call.name
        args = [(a.name, evaluate(a.value, env), a.span) for a in value.call.args]
    else:
        raise ArgumentError(f"lr_policy must be one of {', '.join(_LR_POLICIES)}", span)
    if name not in _LR_POLICIES:
        raise UnknownNameError(f"unknown lr_policy '{name}'", span, hint=did_you_mean(name, _LR_POLICIES))
    params = {
        "fixed": (),
        "step": (("gamma", 0.1), ("every", REQUIRED)),
        "multistep": (("gamma", 0.1), ("milestones", REQUIRED)),
        "cosine": (),
        "poly": (("power", 1.0),),
    }[name]
    call = value.call if isinstance(value, Policy) else ast.Call(name, (), span, span)
    bound, spans = Signature(params).bind(name, call, args)
    if name == "step":
        return LrPolicy("step", gamma=as_float(bound["gamma"], spans["gamma"], "gamma", 0.0), every=as_int(bound["every"], spans["every"], "every"))
    if name == "multistep":
        ms = bound["milestones"]
        if not isinstance(ms, list):
            ms = [ms]
        return LrPolicy(
            "multistep",
            gamma=as_float(bound["gamma"], spans["gamma"], "gamma", 0.0),
            milestones=tuple(as_int(m, spans["milestones"], "milestone") for m in ms),
        )
    if name == "poly":
        return LrPolicy("poly", power=as_float(bound["power"], spans["power"], "power", 0.0))
    return LrPolicy(name)


def _float_list(value: Any, span: Span, what: str, length: int | None) -> tuple[float, ...]:
    items = value if isinstance(value, list) else [value]
    result = tuple(as_float(v, span, what) for v in items)
    if length is not None and len(result) not in (1, length):
        raise ArgumentError(f"{what} needs 1 or {length} values (one per input channel), got {len(result)}", span)
    return result * (length if len(result) == 1 and length else 1)


def _nonzero(values: tuple[float, ...], span: Span, what: str) -> tuple[float, ...]:
    if any(v == 0 for v in values):
        raise ArgumentError(f"{what} must not be 0 (pixels are divided by it)", span)
    return values


TRAIN_KEYS: dict[str, Callable[[Any, Span, dict], Any]] = {
    "optimizer": lambda v, s, e: as_word(v, s, "optimizer", ("sgd", "adam", "adamw")),
    "lr": lambda v, s, e: as_float(v, s, "lr", lo=0.0),
    "lr_policy": _lr_policy,
    "momentum": lambda v, s, e: as_float(v, s, "momentum", 0.0, 1.0),
    "weight_decay": lambda v, s, e: as_float(v, s, "weight_decay", lo=0.0),
    "epochs": lambda v, s, e: as_int(v, s, "epochs"),
    "batch": lambda v, s, e: as_int(v, s, "batch"),
    "bias_lr_mult": lambda v, s, e: as_float(v, s, "bias_lr_mult", lo=0.0),
    "bias_decay": lambda v, s, e: as_float(v, s, "bias_decay", lo=0.0),
    "seed": lambda v, s, e: as_int(v, s, "seed", minimum=0, maximum=MAX_SEED),
}

DATA_KEYS: dict[str, Callable[[Any, Span, dict], Any]] = {
    "resize": lambda v, s, e: as_pair(v, s, "resize"),
    "mean": lambda v, s, e: _float_list(v, s, "mean", e["__channels__"]),
    "std": lambda v, s, e: _nonzero(_float_list(v, s, "std", e["__channels__"]), s, "std"),
    "mirror": lambda v, s, e: as_bool(v, s, "mirror"),
}

SECTIONS = {"train": TRAIN_KEYS, "data": DATA_KEYS}
_LOSSES = {"softmax": LossKind.SOFTMAX, "cross_entropy": LossKind.SOFTMAX, "hinge": LossKind.HINGE,
           "squared_hinge": LossKind.HINGE}
SUPERVISE_KEYS = ("loss", "weight", "decay")

def classes_of(decl: ast.ClassesDecl) -> tuple[int, tuple[str, ...]]:
    value = evaluate(decl.value, {})
    if isinstance(value, list):
        if len(value) < 2 or not all(isinstance(v, str) for v in value):
            raise ArgumentError("classes takes a count (>= 2) or a list of at least two quoted class names",
                                decl.value.span)
        if len(set(value)) != len(value):
            raise DuplicateNameError("class names must be unique", decl.value.span)
        return len(value), tuple(value)
    return as_int(value, decl.value.span, "classes", minimum=2), ()


def init_of(decl: ast.InitDecl | None) -> ParamInit:
    if decl is None:
        return ParamInit(InitScheme.GAUSSIAN, 0.01, 0.0)
    call = decl.call
    schemes = tuple(s.value for s in InitScheme)
    if call.name not in schemes:
        raise UnknownNameError(
            f"unknown init scheme '{call.name}' (one of {', '.join(schemes)})", call.name_span,
            hint=did_you_mean(call.name, schemes),
        )
    args = [(a.name, evaluate(a.value, {}), a.span) for a in call.args]
    bound, spans = Signature((("std", 0.01), ("bias", 0.0))).bind(call.name, call, args)
    bias = bound["bias"]
    bias = None if isinstance(bias, Word) and bias.name == "none" else as_float(bias, spans["bias"], "bias")
    scheme = InitScheme(call.name)
    std = as_float(bound["std"], spans["std"], "std", lo=0.0) if scheme is InitScheme.GAUSSIAN else 0.0
    return ParamInit(scheme, std, bias)


def pooling_of(decl: ast.PoolingDecl | None) -> bool:
    if decl is None:
        return False
    if decl.mode not in ("floor", "ceil"):
        raise ArgumentError(
            f"pooling must be floor or ceil, got '{decl.mode}'", decl.span, hint=did_you_mean(decl.mode, ("floor", "ceil"))
        )
    return decl.mode == "ceil"


def section_of(settings: dict[str, ast.Setting], keys: dict, env: dict, default):
    values = {}
    for key, setting in settings.items():
        if key not in keys:
            raise UnknownNameError(
                f"unknown setting '{key}' (settings: {', '.join(keys)})", setting.key_span, hint=did_you_mean(key, keys)
            )
        values[key] = keys[key](evaluate(setting.value, env), setting.value.span, env)
    return replace(default, **values)




def head_settings(st: ast.Supervise, tap: str, env: dict) -> tuple[LossKind, WeightSchedule]:
    """Loss and α schedule of a ``supervise`` statement (default: softmax, α₀ 0.3, eq. 2 linear decay)."""
    settings = {}
    for s in st.settings:
        if s.key not in SUPERVISE_KEYS:
            raise UnknownNameError(
                f"unknown supervise setting '{s.key}' (one of {', '.join(SUPERVISE_KEYS)})",
                s.key_span,
                hint=did_you_mean(s.key, SUPERVISE_KEYS),
            )
        if s.key in settings:
            raise DuplicateNameError(f"'{s.key}' given twice", s.key_span)
        settings[s.key] = s
    loss = LossKind.SOFTMAX
    if "loss" in settings:
        s = settings["loss"]
        loss = _LOSSES[as_word(evaluate(s.value, env), s.value.span, "loss", tuple(_LOSSES))]
    alpha0, values = 0.3, ()
    kind = ScheduleKind.LINEAR
    if "weight" in settings:
        s = settings["weight"]
        w = evaluate(s.value, env)
        if isinstance(w, list):
            if not w:
                raise ArgumentError("an explicit weight list needs at least one value", s.value.span)
            values = tuple(as_float(v, s.value.span, "weight", lo=0.0) for v in w)
            alpha0, kind = values[0], ScheduleKind.LIST
        else:
            alpha0 = as_float(w, s.value.span, "weight", lo=0.0)
    if "decay" in settings:
        s = settings["decay"]
        decay = as_word(evaluate(s.value, env), s.value.span, "decay", ("linear", "none", "constant"))
        if kind is ScheduleKind.LIST:
            raise SupervisionError("'decay' does not apply to an explicit list of weights", s.span)
        kind = ScheduleKind.LINEAR if decay == "linear" else ScheduleKind.CONSTANT
    if not st.layers:
        raise SupervisionError(f"the branch on '{tap}' has no layers", st.span)
    return loss, WeightSchedule(kind, alpha0, values)
