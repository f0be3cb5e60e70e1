"""Command-line entry points. Thin: parse flags, call one library function, turn a CndsError into a
``file:line:col`` message on stderr and exit code 1 (tracebacks only with ``--traceback``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_args import gib_argument, seed_argument
from .errors import CndsError, command, report
from .lowering.deploy import PRECISIONS


class CompileCLI:
    """``cnds-compile SPEC``: check a spec, print its summary, emit IR JSON / DOT / ONNX."""

    def __init__(self, args: list[str] | None = None) -> None:
        self.parser = self._make_parser()
        self.args = self.parser.parse_args(args)

    @staticmethod
    def _make_parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            prog="cnds-compile",
            description="Check a .cnds spec (or an IR .json), print a per-layer summary, and emit IR JSON, "
            "a Graphviz diagram, or a checked ONNX model of the trunk without its supervision branches. "
            "Checking never imports torch.",
        )
        p.add_argument("spec", help="a .cnds spec file, or an IR .json written by --emit ir")
        p.add_argument("--emit", choices=("summary", "ir", "dot", "onnx"), default="summary",
                       help="what to produce (default: summary table on stdout); onnx needs -o")
        p.add_argument("-o", "--output", help="output file (default: stdout); for dot, a .svg/.png/.pdf "
                       "name renders it with Graphviz")
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing when the spec is fine")
        p.add_argument("-p", "--passes", help="comma-separated passes to run (default: all, in order)")
        p.add_argument("--print-between-passes", action="store_true", help="print the IR JSON after every pass")
        p.add_argument("--time-passes", action="store_true", help="print each pass's time to stderr")
        p.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")
        onnx = p.add_argument_group("ONNX export (--emit onnx)")
        onnx.add_argument("--weights", metavar="CKPT", help="checkpoint from cnds-train (or a bare state dict); "
                          "default: the spec's initialisation with --seed (an untrained model)")
        onnx.add_argument("--features", metavar="LAYERS", help="comma-separated trunk layers to output, e.g. "
                          "fc7,pool5; add 'logits' to keep the classifier (default: logits only); layers above "
                          "the deepest one are pruned")
        onnx.add_argument("--precision", choices=PRECISIONS, default="fp32",
                          help="fp32 (default), fp16, or int8 (static quantisation; needs --calibration-data)")
        onnx.add_argument("--calibration-data", metavar="SOURCE",
                          help="data source whose training split calibrates int8 ranges")
        onnx.add_argument("--calibration-size", type=int, default=512, metavar="N",
                          help="calibration images (default 512)")
        onnx.add_argument("--val-data", metavar="SOURCE", help="data source whose validation split measures the "
                          "accuracy change of fp16/int8 (int8 default: the calibration source)")
        onnx.add_argument("--val-size", type=int, default=10_000, metavar="N",
                          help="at most this many validation images (default 10000)")
        onnx.add_argument("--seed", type=seed_argument, default=0, help="initialisation seed without --weights (default 0)")
        onnx.add_argument("--memory-budget", type=gib_argument, metavar="GiB", help="memory the network's parameters "
                          "may take (default: the RAM available now; env CNDS_MEMORY_BUDGET_GIB)")
        onnx.add_argument("--opset", type=int, default=17, choices=range(17, 21), metavar="{17..20}",
                          help="ai.onnx opset (default 17)")
        return p

    def _check_flags(self) -> None:
        """Usage errors (exit code 2) for flag combinations that cannot work."""
        a, p = self.args, self.parser
        onnx_only = {"--weights": a.weights, "--features": a.features, "--calibration-data": a.calibration_data,
                     "--val-data": a.val_data, "--precision": a.precision != "fp32" or None,
                     "--memory-budget": a.memory_budget}
        if a.emit != "onnx":
            given = [flag for flag, value in onnx_only.items() if value]
            if given:
                p.error(f"{', '.join(given)} only apply to --emit onnx")
            return
        if not a.output:
            p.error("--emit onnx needs -o FILE.onnx")
        if a.precision == "int8" and not a.calibration_data:
            p.error("--precision int8 needs --calibration-data SOURCE")
        if a.calibration_data and a.precision != "int8":
            p.error("--calibration-data only applies to --precision int8")
        if a.val_data and a.precision == "fp32":
            p.error("--val-data measures the accuracy change of --precision fp16/int8 against fp32")
        if a.calibration_size < 1 or a.val_size < 1:
            p.error("--calibration-size and --val-size must be >= 1")

    def run(self) -> int:
        a = self.args
        self._check_flags()
        try:
            self._refuse_overwriting_inputs()
            net = self._load()
            if a.emit == "onnx":
                self._export(net)
            else:
                self._emit(net)
        except CndsError as e:
            return report(e, a.traceback)
        return 0

    def _refuse_overwriting_inputs(self) -> None:
        """``-o`` naming one of the command's own input files (the spec, ``--weights``) is refused before
        any work, so nothing the user has is overwritten."""
        from .io import refuse_unsafe_output

        a = self.args
        refuse_unsafe_output(a.output or None, "-o", (("the spec", a.spec), ("--weights", a.weights)))

    def _load(self):
        from .frontend import compile_spec
        from .passes import DEFAULT_PIPELINE

        a = self.args
        names = tuple(n.strip() for n in a.passes.split(",")) if a.passes else DEFAULT_PIPELINE

        def callback(p, before, after, seconds):  # passes, and the stage that makes the IR (lower / read-ir)
            if a.time_passes:
                print(f"{p.name:>20}: {seconds * 1e3:7.2f} ms", file=sys.stderr)
            if a.print_between_passes:
                from .serialize import dumps  # only here: importing it costs a spec check ~10 ms

                print(f"// ---- IR after {p.name} ----")
                print(dumps(after), end="")

        try:
            return compile_spec(a.spec, passes=names, callback=callback)
        except ValueError as e:  # unknown pass name in -p
            self.parser.error(str(e))

    def _export(self, net) -> None:
        from .errors import UnsupportedError
        from .lowering import parse_features
        from .lowering.onnx_export import export_onnx

        a = self.args
        if not net.shapes_known:
            raise UnsupportedError("--emit onnx needs the checked IR: run all passes (drop -p)", path=a.spec)
        from .memory import budget_from_gib, budget_given, check_fits, default_budget, weights_estimate

        with budget_given(budget_from_gib(a.memory_budget)):
            check_fits(weights_estimate(net), *default_budget())  # before any weight is read or module built
            report = export_onnx(
                net, a.output, weights=a.weights, features=parse_features(a.features), precision=a.precision,
                calibration=a.calibration_data, validation=a.val_data, calibration_size=a.calibration_size,
                validation_size=a.val_size, seed=a.seed, opset=a.opset,
            )
        if not a.quiet:
            print("\n".join(report.lines()))

    def _emit(self, net) -> None:
        from .diagram import render, to_dot
        from .io import atomic_write_text
        from .summary import format_summary

        a = self.args
        out = Path(a.output) if a.output else None
        if a.emit == "ir":
            from .serialize import dumps

            text = dumps(net)
        elif a.emit == "dot":
            text = to_dot(net)
            if out is not None and out.suffix.lower() in (".svg", ".png", ".pdf"):
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


@command("cnds-compile")
def compile_main(argv: list[str] | None = None) -> int:
    return CompileCLI(argv).run()


if __name__ == "__main__":
    sys.exit(compile_main())
