"""``cnds-probe`` and ``cnds-gradplot``: thin wrappers over :mod:`cnds_compiler.probe`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_args import seed_argument
from ..errors import CndsError, command, report
from .rule import BRANCHES_KEPT, DEFAULT_MIN_GAP, DEFAULT_THRESHOLD, Proposal

PROBE_DESCRIPTION = """\
The paper's rule for where to add supervision (Wang et al. 2015, section 2): run a few back-prop
iterations of the spec's trunk with supervision only at the final layer (its branches removed), weights
N(0, 0.01) and zero biases, record every conv layer's mean |gradient| per iteration, and add supervision
where the gradient vanishes (< 1e-7).

The rule as implemented. A conv layer's level is its mean |grad| averaged over the last quarter of the
iterations. (1) If no layer is below --threshold, nothing is proposed. (2) If the top conv layer (next
to the main loss) is below it too, the gradient vanishes everywhere - an initialisation problem no
branch can fix - and nothing is proposed. (3) Otherwise the first point is the first layer below the
threshold going down from the top (the paper's 8-layer rule: "after the layer where the mean gradient
vanishes"). (4) For deeper nets: a branch at point s restores s's gradient to about the top layer's
level, and below s it keeps decaying as measured, by level(q)/level(s); the next point is the first
layer q at least --min-gap conv layers below s where that restored gradient vanishes again
(top * level(q) / level(s) < threshold). Repeat. A steady decay so gives one branch every few layers
(the paper's 13-layer net: after the 10th, 7th and 4th conv).

The probe trains with the spec's solver (train { }: SGD, lr, momentum, weight decay, bias lr multiplier)
unless --lr overrides it; --lr 0 measures back-prop without updating the weights. Everything is seeded.

--write OUT.cnds keeps the spec's text as written (comments included) and only edits supervision: an
existing branch on a proposed layer is kept, other branches are removed (or unsupervised when inherited),
and each new point gets the paper's branch sized from the tap's CxHxW: average pooling (to 13x13 on large
maps), 1x1 conv with C/4 channels (8..64, no ReLU), two fc layers a quarter of the trunk's first fc width
(4096 -> 1024) with ReLU and the trunk's dropout, and a classifier; alpha_0 0.3 with linear decay (eq. 2).
"""

DATA_HELP = ("random (uniform pixels normalised with the spec's data mean/std, random labels; any input "
             "size, no files), or a cnds-train source: digits, fashion-mnist[:DIR], imagefolder:DIR. A source "
             "with fewer classes than the spec is allowed (its labels are a subset). Default: random")


def _probe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnds-probe", description=PROBE_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="the .cnds spec whose trunk to probe")
    p.add_argument("--data", default="random", help=DATA_HELP)
    p.add_argument("--iters", type=int, default=30, help="back-prop iterations (the paper: 10-50; default 30)")
    p.add_argument("--batch-size", type=int, help="examples per iteration (default: the spec's batch, at most 32)")
    p.add_argument("--init", choices=("gaussian", "spec"), default="gaussian",
                   help="gaussian: N(0, std^2) weights and --bias biases, the rule's standard (default); "
                   "spec: the spec's own initialisation")
    p.add_argument("--std", type=float, default=0.01, help="std of the gaussian init (default 0.01)")
    p.add_argument("--bias", default="0", help="initial value of every bias with --init gaussian, or 'spec' "
                   "to keep each layer's own (default 0)")
    p.add_argument("--lr", type=float, help="learning rate of the probe's SGD steps (default: the spec's; 0: no "
                   "weight update, back-prop only)")
    p.add_argument("--seed", type=seed_argument, default=0, help="seed of the initialisation, data order and dropout (default 0)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"mean |grad| below which a layer's gradient has vanished (default {DEFAULT_THRESHOLD:g})")
    p.add_argument("--min-gap", type=int, default=DEFAULT_MIN_GAP,
                   help=f"fewest conv layers between two proposed points (default {DEFAULT_MIN_GAP})")
    p.add_argument("--keep-branches", action="store_true",
                   help="probe the spec as written, its branches trained too (to see what a placement does)")
    p.add_argument("--plot", type=Path, help="the Figure 2(a)-style PNG (default runs/probe/<network>.png)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--json", type=Path, help="write the per-iteration gradients and the proposal as JSON "
                   "(cnds-gradplot reads it)")
    p.add_argument("--write", type=Path, metavar="OUT.cnds",
                   help="write the spec with the proposed supervise blocks (pool, 1x1 conv, fc, fc, classifier, "
                   "sized from the tap's shape); the rest of the text is kept as written")
    p.add_argument("--alpha", type=float, default=0.3, help="alpha_0 of written branches (linear decay; default 0.3)")
    p.add_argument("--write-init", choices=tuple(WRITE_INITS), default="keep",
                   help="the initialisation of the written spec: keep (the spec's own, default), paper "
                   "(N(0, 0.01), the regime the proposal was measured in) or kaiming (fan-in scaled: trains "
                   "at any width)")
    p.add_argument("--keep-existing", action="store_true",
                   help="with --write: keep the spec's existing branches as well as adding the proposed ones")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")
    return p


def _table(result, proposal) -> str:
    proposed = set(proposal.taps)
    levels = dict(proposal.levels)
    head = f"{'#':>3}  {'layer':<12}{'first':>11}{'last':>11}{'mean':>11}{'level':>11}  "
    lines = [head, "-" * (len(head) + 24)]
    for i, name in enumerate(result.layers):
        h = result.history[name]
        mark = []
        if levels[name] < proposal.threshold:
            mark.append(f"< {proposal.threshold:g}")
        if name in proposed:
            mark.append("<- supervise")
        lines.append(f"{i + 1:>3}  {name:<12}{h[0]:>11.3e}{h[-1]:>11.3e}{sum(h) / len(h):>11.3e}"
                     f"{levels[name]:>11.3e}  {'  '.join(mark)}")
    return "\n".join(lines)


def _note(point, proposal, settings, init: str) -> str:
    """The comment line above a written branch."""
    first = point is proposal.points[0]
    why = (f"mean |grad| {point.level:.3g} < {proposal.threshold:g}" if first else
           f"gradient restored by the branch above would decay to {point.restored_level:.3g} < {proposal.threshold:g}")
    return (f"{point.tap}, conv layer {point.index}: {why} ({init}, {settings.iters} iterations, "
            f"seed {settings.seed})")


@command("cnds-probe")
def probe_main(argv: list[str] | None = None) -> int:
    parser = _probe_parser()
    args = parser.parse_args(argv)
    if args.bias != "spec":
        try:
            bias: float | str = float(args.bias)
        except ValueError:
            parser.error(f"--bias takes a number or 'spec', not '{args.bias}'")
    else:
        bias = "spec"
    for name, value, low in (("--iters", args.iters, 1), ("--min-gap", args.min_gap, 1),
                             ("--batch-size", args.batch_size, 1), ("--threads", args.threads, 1)):
        if value is not None and value < low:
            parser.error(f"{name} must be at least {low}")
    if args.keep_branches and args.write:
        parser.error("--write needs a proposal, which --keep-branches does not make")
    if args.threshold <= 0 or args.std < 0 or (args.lr is not None and args.lr < 0):
        parser.error("--threshold must be > 0, --std and --lr >= 0")
    try:
        from ..frontend import compile_spec
        from ..io import atomic_write_text, refuse_unsafe_output
        from .run import ProbeSettings, run_probe

        spec = (("the probed spec", args.spec),)  # checked before the probe's minutes of work
        refuse_unsafe_output(None if args.no_plot else args.plot, "--plot", spec, kind="a PNG image",
                             suffixes=(".png",))
        refuse_unsafe_output(args.json, "--json", spec, kind="JSON", suffixes=(".json",))
        refuse_unsafe_output(args.write, "--write", spec)

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        net = compile_spec(args.spec)
        settings = ProbeSettings(
            iters=args.iters, batch_size=args.batch_size, init=args.init, std=args.std, bias=bias, lr=args.lr,
            data=args.data, seed=args.seed, keep_branches=args.keep_branches,
        )
        result = run_probe(net, settings, progress=not args.no_progress)
        proposal = result.propose(args.threshold, args.min_gap)
        if args.keep_branches:  # the rule reads a trunk supervised only at its top
            proposal = Proposal(BRANCHES_KEPT, (), proposal.levels, proposal.threshold, proposal.min_gap,
                                "none made: the spec's branches were trained too (--keep-branches); the rule "
                                "reads a trunk supervised only at its top")
        lr_note = "no weight update" if result.lr == 0 else f"SGD lr {result.lr:g}" + (
            " (the spec's)" if args.lr is None else "")
        branches = f", branches {', '.join(result.branches)} trained too" if result.branches else ""
        print(f"cnds-probe {net.name}: {args.iters} iterations, batch {result.batch_size}, "
              f"{result.init_description}, {lr_note}{branches}")
        print(f"data: {result.data_description}")
        print(f"time: {result.seconds:.1f} s ({result.seconds / args.iters:.2f} s/iteration)")
        print(_table(result, proposal))
        print(f"level = mean |grad| over the last quarter of the iterations; threshold {proposal.threshold:g}")
        print(f"proposal: {proposal.message}")
        for point in sorted(proposal.points, key=lambda p: p.index):
            print(f"  {point.tap}: {point.reason}")
        if not args.no_plot:
            from .plots import plot_probe

            out = args.plot or Path("runs") / "probe" / f"{net.name}.png"
            plot_probe(result, proposal, out)
            print(f"wrote {out}")
        if args.json:
            atomic_write_text(args.json, json.dumps(result.to_dict(proposal), indent=1) + "\n")
            print(f"wrote {args.json}")
        if args.write:
            from .rewrite import write_supervised_spec

            notes = {p.tap: _note(p, proposal, settings, result.init_description) for p in proposal.points}
            edit, new_net = write_supervised_spec(
                args.spec, net, proposal.taps, args.write, alpha=args.alpha, notes=notes,
                keep_existing=args.keep_existing, init=WRITE_INITS[args.write_init],
            )
            parts = [f"added {', '.join(edit.added)}" if edit.added else "",
                     f"kept {', '.join(edit.kept)}" if edit.kept else "",
                     f"removed {', '.join(edit.removed)}" if edit.removed else ""]
            summary = "; ".join(p for p in parts if p) or "no change to supervision"
            print(f"wrote {args.write} ({summary}; {len(new_net.branches)} branch(es), compiles)")
            print(_init_advice(result.init_description, new_net))
    except CndsError as e:
        return report(e, args.traceback)
    return 0


WRITE_INITS = {"keep": None, "paper": "init gaussian(std=0.01, bias=0)", "kaiming": "init kaiming(bias=0)"}


def _init_advice(measured: str, written) -> str:
    """What the proposal assumed and what the written spec will train with; a warning where the written
    initialisation is the paper's N(0, 0.01) on narrow layers, where it keeps the signal too small to train."""
    from ..ir import InitScheme, OpKind

    inits = {n.attrs.init for n in written.nodes if n.kind in (OpKind.CONV2D, OpKind.LINEAR)}
    schemes = sorted({i.scheme.value + (f"(std={i.std:g})" if i.scheme is InitScheme.GAUSSIAN else "") for i in inits})
    line = f"the proposal was measured with {measured}; the written spec initialises with {', '.join(schemes)}"
    widest = max((n.attrs.out_channels for n in written.nodes if n.kind is OpKind.CONV2D), default=0)
    tiny = [i for i in inits if i.scheme is InitScheme.GAUSSIAN and i.std <= 0.01]
    if tiny and widest < 256:
        line += (f"\nwarning: N(0, {max(i.std for i in tiny):g}) weights on convolutions at most {widest} wide shrink "
                 "the signal layer by layer (the paper's nets are 256-512 wide), so such a spec may train at chance; "
                 "--write-init kaiming writes one that trains, with the same supervision points")
    return line


def _gradplot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnds-gradplot",
        description="Compare one layer's mean |gradient| across training runs, log scale, one panel per layer "
        "(the paper's Figure 2 b-d: CNN-8 against CNDS-8). Reads RUN/gradients.json written by "
        "`cnds-train --grad-monitor N` (or the grad_log in RUN/last.pt), a gradients.json, or a "
        "`cnds-probe --json` file.",
    )
    p.add_argument("runs", nargs="+", help="run folders or gradient files")
    p.add_argument("--layer", action="append", default=[],
                   help="a trunk conv layer to plot (repeat for more panels; default: every layer the runs share)")
    p.add_argument("--plot", type=Path, default=None, help="PNG to write (default gradients.png), as cnds-probe --plot")
    p.add_argument("-o", "--output", type=Path, default=None, help=argparse.SUPPRESS)  # the old name, still read
    p.add_argument("--label", action="append", default=[], help="legend name of each run, in order (default: folder name)")
    p.add_argument("--threshold", type=float, help="draw this level as a dashed line (e.g. 1e-7)")
    p.add_argument("--smooth", type=int, default=1, help="moving average over N records (default 1: none)")
    p.add_argument("--title", help="figure title")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")
    return p


@command("cnds-gradplot")
def gradplot_main(argv: list[str] | None = None) -> int:
    parser = _gradplot_parser()
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.runs):
        parser.error(f"{len(args.label)} --label for {len(args.runs)} runs")
    if args.smooth < 1:
        parser.error("--smooth must be at least 1")
    try:
        from ..io import refuse_unsafe_output
        from .plots import load_gradient_log, plot_gradient_comparison

        target = args.plot or args.output or Path("gradients.png")
        refuse_unsafe_output(target, "--plot", [(f"the gradient log {run}", run) for run in args.runs],
                             kind="a PNG image", suffixes=(".png",))
        labels = args.label or [None] * len(args.runs)
        logs = [load_gradient_log(run, label) for run, label in zip(args.runs, labels, strict=True)]
        if args.output is not None:
            print("cnds-gradplot: note: -o/--output is now --plot, as in cnds-probe; -o still works",
                  file=sys.stderr)
        out = plot_gradient_comparison(logs, args.layer, target, threshold=args.threshold,
                                       smooth=args.smooth, title=args.title)
    except CndsError as e:
        return report(e, args.traceback)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(probe_main())
