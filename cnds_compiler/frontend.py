"""Spec file → checked IR: parse, expand, run the pass pipeline. Pure Python: never imports torch."""

from __future__ import annotations

from pathlib import Path

from .ir import Network
from .parser import parse_file, parse_text
from .passes import DEFAULT_PIPELINE, PassCallback, PassPipeline
from .passes.expand import expand


def compile_spec(
    path: str | Path,
    *,
    passes=DEFAULT_PIPELINE,
    callback: PassCallback | None = None,
) -> Network:
    """Parse ``path`` (following ``extends``), expand it and run ``passes``; return the checked IR."""
    spec = parse_file(path)
    return PassPipeline.from_names(passes, callback).apply(expand(spec, path))


def compile_text(text: str, name: str = "<spec>", *, base_dir: str | Path = ".") -> Network:
    """Like :func:`compile_spec` for text in memory; ``extends`` resolves against ``base_dir``."""
    spec = parse_text(text, name)
    return PassPipeline.from_names(DEFAULT_PIPELINE).apply(expand(spec, Path(base_dir) / Path(name).name))
