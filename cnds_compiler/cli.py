"""Command-line entry points. Thin: parse flags, call one library function, turn a CndsError into a
``file:line:col`` message on stderr and exit code 1 (tracebacks only with ``--traceback``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import CndsError


class CompileCLI:
    """``cnds-compile SPEC``: check a spec, print its summary, emit IR JSON / DOT / ONNX."""

    def __init__(self, args: list[str] | None = None) -> None:
        self.parser = self._make_parser()
        self.args = self.parser.parse_args(args)

    @staticmethod
    def _make_parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            prog="cnds-compile",
            description="Check a .cnds spec (or an IR .json), print a per-layer summary, and emit IR JSON "
            "or a Graphviz diagram. Checking never imports torch.",
        )
        p.add_argument("spec", help="a .cnds spec file, or an IR .json written by --emit ir")
        p.add_argument("--emit", choices=("summary", "ir", "dot"), default="summary",
                       help="what to produce (default: summary table on stdout)")
        p.add_argument("-o", "--output", help="output file (default: stdout); for dot, a .svg/.png/.pdf "
                       "name renders it with Graphviz")
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing when the spec is fine")
        p.add_argument("-p", "--passes", help="comma-separated passes to run (default: all, in order)")
        p.add_argument("--print-between-passes", action="store_true", help="print the IR JSON after every pass")
        p.add_argument("--time-passes", action="store_true", help="print each pass's time to stderr")
        p.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")
        return p

    def run(self) -> int:
        a = self.args
        try:
            net = self._load()
            self._emit(net)
        except CndsError as e:
            if a.traceback:
                raise
            print(e.render(), file=sys.stderr)
            return 1
        return 0

    def _load(self):
        from .frontend import compile_spec
        from .passes import DEFAULT_PIPELINE, PassPipeline
        from .serialize import dumps, read_ir

        a = self.args
        names = tuple(n.strip() for n in a.passes.split(",")) if a.passes else DEFAULT_PIPELINE

        def callback(p, before, after, seconds):
            if a.time_passes:
                print(f"{p.name:>20}: {seconds * 1e3:7.2f} ms", file=sys.stderr)
            if a.print_between_passes:
                print(f"// ---- IR after {p.name} ----")
                print(dumps(after), end="")

        try:
            if a.spec.endswith(".json"):
                start = time.perf_counter()
                net = read_ir(a.spec)
                if a.time_passes:
                    print(f"{'read-ir':>20}: {(time.perf_counter() - start) * 1e3:7.2f} ms", file=sys.stderr)
                return PassPipeline.from_names(names, callback).apply(net)
            return compile_spec(a.spec, passes=names, callback=callback)
        except ValueError as e:  # unknown pass name in -p
            self.parser.error(str(e))

    def _emit(self, net) -> None:
        from .diagram import render, to_dot
        from .io import atomic_write_text
        from .serialize import dumps
        from .summary import format_summary

        a = self.args
        out = Path(a.output) if a.output else None
        if a.emit == "ir":
            text = dumps(net)
        elif a.emit == "dot":
            text = to_dot(net)
            if out is not None and out.suffix in (".svg", ".png", ".pdf"):
                render(text, out)
                if not a.quiet:
                    print(f"wrote {out}")
                return
        else:
            if not net.shapes_known or any(op.params is None for layer in net.all_layers() for op in layer.ops):
                text = f"{net.name}: checked ({len(net.trunk)} layers, {len(net.branches)} branches)\n"
            else:
                text = format_summary(net, a.spec) + "\n"
        if out is None:
            if not (a.quiet and a.emit == "summary"):
                sys.stdout.write(text)
        else:
            atomic_write_text(out, text)
            if not a.quiet:
                print(f"wrote {out}")


def compile_main(argv: list[str] | None = None) -> int:
    return CompileCLI(argv).run()


if __name__ == "__main__":
    sys.exit(compile_main())
