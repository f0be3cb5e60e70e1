"""``extends``: a spec and its bases merged statement by statement, before anything is lowered.

A derived spec that redefines a block changes every base statement that uses it; one that defines a
statement of the base's name replaces it in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import ast
from ..errors import DuplicateNameError, SpecIncludeError, SupervisionError, UnknownNameError, did_you_mean
from ..parser import parse_file
from ..source import Span
from .ops import BUILTIN_OPS
from .settings import SECTIONS


@dataclass
class Merged:
    """The statements in force once a spec and its bases are merged."""

    network: ast.NetworkDecl | None = None
    input: ast.InputDecl | None = None
    classes: ast.ClassesDecl | None = None
    init: ast.InitDecl | None = None
    pooling: ast.PoolingDecl | None = None
    blocks: dict[str, ast.BlockDef] = field(default_factory=dict)
    layers: list[tuple[str, ast.LayerDef]] = field(default_factory=list)
    supervise: list[tuple[str, Span, str, ast.Supervise]] = field(default_factory=list)
    """(head name, its span, tap, statement) in spec order."""
    sections: dict[str, dict[str, ast.Setting]] = field(default_factory=dict)
    sources: list[tuple[str, str]] = field(default_factory=list)


def _merge(spec: ast.SpecFile, merged: Merged, is_derived: bool) -> None:
    """Apply one file's statements on top of ``merged`` (its bases already applied)."""
    seen_layers: dict[str, Span] = {}
    seen_blocks: dict[str, Span] = {}
    seen_headers: dict[str, Span] = {}
    base_layer_names = {name for name, _ in merged.layers}
    for st in spec.statements:
        header = type(st).__name__
        if isinstance(st, (ast.NetworkDecl, ast.InputDecl, ast.ClassesDecl, ast.InitDecl, ast.PoolingDecl)):
            if header in seen_headers:
                word = {"NetworkDecl": "network", "InputDecl": "input", "ClassesDecl": "classes",
                        "InitDecl": "init", "PoolingDecl": "pooling"}[header]
                raise DuplicateNameError(
                    f"'{word}' given twice", st.span, notes=((seen_headers[header], "first given here"),)
                )
            seen_headers[header] = st.span
        if isinstance(st, ast.NetworkDecl):
            merged.network = st
        elif isinstance(st, ast.InputDecl):
            merged.input = st
        elif isinstance(st, ast.ClassesDecl):
            merged.classes = st
        elif isinstance(st, ast.InitDecl):
            merged.init = st
        elif isinstance(st, ast.PoolingDecl):
            merged.pooling = st
        elif isinstance(st, ast.ExtendsDecl):
            pass  # resolved by the caller before this file's statements
        elif isinstance(st, ast.BlockDef):
            if st.name in seen_blocks:
                raise DuplicateNameError(
                    f"block '{st.name}' defined twice", st.name_span, notes=((seen_blocks[st.name], "first defined here"),)
                )
            if st.name in BUILTIN_OPS:
                raise DuplicateNameError(f"block '{st.name}' would hide the built-in op of that name", st.name_span)
            seen_blocks[st.name] = st.name_span
            merged.blocks[st.name] = st
        elif isinstance(st, ast.LayerDef):
            _merge_layer(st, merged, seen_layers, base_layer_names, is_derived)
        elif isinstance(st, ast.Supervise):
            if st.head is not None and len(st.taps) > 1:
                raise SupervisionError("'as NAME' names one head; give each tap its own supervise statement",
                                       st.head[1])
            for tap, span in st.taps:
                name, name_span = st.head if st.head is not None else (tap, span)
                for other, other_span, _, _ in merged.supervise:
                    if other == name:
                        what = f"'{tap}' is already supervised" if st.head is None else f"head '{name}' defined twice"
                        hint = None if st.head is not None else f"name a second head on it: supervise {tap} as NAME"
                        raise DuplicateNameError(what, name_span, notes=((other_span, "first defined here"),), hint=hint)
                merged.supervise.append((name, name_span, tap, st))
        elif isinstance(st, ast.Unsupervise):
            for name, span in st.taps:
                supervised = [n for n, _, _, _ in merged.supervise]
                if name not in supervised:
                    raise SupervisionError(
                        f"'{name}' is not supervised, nothing to remove", span, hint=did_you_mean(name, supervised)
                    )
                merged.supervise = [entry for entry in merged.supervise if entry[0] != name]
        elif isinstance(st, ast.Section):
            if st.name not in SECTIONS:
                raise UnknownNameError(
                    f"unknown section '{st.name}' (sections: {', '.join(SECTIONS)})",
                    st.name_span,
                    hint=did_you_mean(st.name, SECTIONS),
                )
            current = merged.sections.setdefault(st.name, {})
            own: dict[str, Span] = {}
            for setting in st.settings:
                if setting.key in own:
                    raise DuplicateNameError(
                        f"'{setting.key}' set twice in {st.name}",
                        setting.key_span,
                        notes=((own[setting.key], "first set here"),),
                    )
                own[setting.key] = setting.key_span
                current[setting.key] = setting


def _merge_layer(st: ast.LayerDef, merged: Merged, seen: dict[str, Span], base_names: set[str], derived: bool):
    for name in st.names():
        if name in seen:
            raise DuplicateNameError(
                f"layer '{name}' defined twice", st.name_span, notes=((seen[name], "first defined here"),)
            )
        seen[name] = st.name_span
        if derived:
            if name not in base_names:
                raise UnknownNameError(
                    f"'{name}' is not a layer of the base spec; a derived spec replaces layers by name",
                    st.name_span,
                    hint=did_you_mean(name, base_names),
                )
            merged.layers = [(n, st if n == name else d) for n, d in merged.layers]
        else:
            merged.layers.append((name, st))


MAX_EXTENDS_DEPTH = 32
"""Most bases one spec may stand on, through ``extends`` chains (each level is a recursive call)."""


def load(path: Path, stack: tuple[Path, ...], span: Span | None, merged: Merged, spec: ast.SpecFile | None = None):
    if spec is None:
        try:
            spec = parse_file(path)
        except SpecIncludeError as e:
            if span is None:
                raise
            raise SpecIncludeError(f"cannot extend {str(path)!r}: {e.message}", span) from None
    extends = [st for st in spec.statements if isinstance(st, ast.ExtendsDecl)]
    if len(extends) > 1:
        raise DuplicateNameError("a spec extends at most one base", extends[1].span)
    for st in spec.statements:
        if isinstance(st, (ast.LayerDef, ast.BlockDef, ast.Supervise)) and extends and st.span.start < extends[0].span.start:
            raise SpecIncludeError("'extends' must come before blocks, layers and supervise statements", extends[0].span)
    if extends:
        try:
            target = (path.parent / extends[0].path).resolve()
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte in the path, a symlink loop
            raise SpecIncludeError(f"cannot extend {extends[0].path!r}: {e}", extends[0].span) from None
        if target in stack:
            raise SpecIncludeError(f"{extends[0].path!r} extends itself (cycle through {target.name})", extends[0].span)
        if len(stack) > MAX_EXTENDS_DEPTH:  # checked before recursing: a chain of thousands never nears Python's limit
            raise SpecIncludeError(f"'extends' chain deeper than {MAX_EXTENDS_DEPTH} bases", extends[0].span)
        load(target, stack + (target,), extends[0].span, merged)
    text_source = spec.statements[0].span.source if spec.statements else None
    if text_source is not None:
        merged.sources.append((text_source.name, text_source.text))
    _merge(spec, merged, is_derived=bool(extends))


