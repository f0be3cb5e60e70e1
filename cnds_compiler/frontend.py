"""Spec file → checked IR: parse, lower to the IR graph, run the pass pipeline. Pure Python: never imports torch."""

from __future__ import annotations

from pathlib import Path

from .ir import Network
from .lang.lower import lower
from .parser import parse_file, parse_text
from .passes import DEFAULT_PIPELINE, LOWER_STAGE, PassCallback, PassPipeline


def compile_spec(
    path: str | Path,
    *,
    passes=DEFAULT_PIPELINE,
    callback: PassCallback | None = None,
) -> Network:
    """Parse ``path`` (following ``extends``), lower it to the IR graph and run ``passes``; return the
    checked IR. The lowering runs under ``callback`` too, as the stage ``lower``. An IR JSON file
    (``.json``, as ``cnds-compile --emit ir`` writes) is read instead and checked by the same passes."""
    pipeline = PassPipeline.from_names(passes, callback)
    if str(path).endswith(".json"):
        from .serialize import read_ir

        return pipeline.apply(pipeline.run_stage("read-ir", lambda: read_ir(path)))
    spec = parse_file(path)
    return pipeline.apply(pipeline.run_stage(LOWER_STAGE, lambda: lower(spec, path)))


def compile_text(text: str, name: str = "<spec>", *, base_dir: str | Path = ".") -> Network:
    """Like :func:`compile_spec` for text in memory; ``extends`` resolves against ``base_dir``."""
    spec = parse_text(text, name)
    return PassPipeline.from_names(DEFAULT_PIPELINE).apply(lower(spec, Path(base_dir) / Path(name).name))
