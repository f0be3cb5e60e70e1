"""``cnds-train`` and ``cnds-eval``: thin wrappers over :mod:`cnds_compiler.train.trainer`."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from ..cli_args import count_argument, fraction_argument, gib_argument, seed_argument
from ..errors import CndsError, Interrupted, OutputClosed, OutputError, OutputFailed, command, report
from ..ir import MAX_SEED

DATA_HELP = ("digits (scikit-learn's bundled 8x8 digits, offline), fashion-mnist[:DIR] (IDX .gz files; "
             "default /usr/share/datasets/fashion-mnist), imagefolder:DIR (DIR/train/<class>/..., DIR/val/<class>/...)")


def _precision(text: str) -> str:
    """argparse type: fp32 (also 'no', Accelerate's name), bf16 or fp16 → Accelerate's mixed_precision."""
    value = {"fp32": "no", "no": "no", "bf16": "bf16", "fp16": "fp16"}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"choose fp32, bf16 or fp16, not {text!r}")
    return value


ENVIRONMENT = """environment:
  CNDS_THREADS=N|torch|auto  CPU threads (default auto: one per free core, read before torch starts)
  CNDS_ALLOCATOR=system      keep glibc's defaults instead of reusing freed memory between steps
  CNDS_MAX_IMAGE_PIXELS=N    largest image decoded (default 89,478,485 pixels; larger ones are refused)
"""
TRAIN_ENVIRONMENT = ENVIRONMENT + """  CNDS_MEMORY_BUDGET_GIB=G   memory the run may use, as --memory-budget
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help=f"data source: {DATA_HELP} (default: digits)")
    p.add_argument("--workers", type=count_argument(0), default=0, help="data-loader worker processes (default 0)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--ten-crop", action="store_true", help="evaluate on 10 crops (corners, centre, mirrors)")
    p.add_argument("--limit-val", type=count_argument(1), help="use only the first N validation examples")
    p.add_argument("--val-split", type=fraction_argument, metavar="F",
                   help="hold out a seeded fraction F of the training set as the validation set; the source's "
                   "own val set is then not used (keep it as the test set: cnds-eval without --val-split)")
    p.add_argument("--split-seed", type=count_argument(0), default=0, metavar="S",
                   help="which samples --val-split holds out (default 0; independent of --seed)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnds-train",
        description=textwrap.fill(
            "Train a .cnds network with deep supervision: L = L0 + sum_b alpha_t^(b) L_b (eq. 1), alpha per "
            "the spec's schedule (eq. 2: alpha_0 (1 - t/N)). Runs as a plain command or under "
            "`accelerate launch` / `torchrun` with no change."),  # filled here: the raw formatter keeps the epilog's table
        epilog=TRAIN_ENVIRONMENT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", help="the .cnds spec to train")
    p.add_argument("--out", default=None, help="run directory for checkpoints and logs (default: runs/<network>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--init-from", type=Path, help="copy every layer whose tensors all match by name and shape "
                   "from this checkpoint (whole layers or nothing)")
    p.add_argument("--processes", type=count_argument(1), default=1, metavar="N",
                   help="run N processes (DDP over gloo on CPU, NCCL on GPUs) through torchrun; the same as "
                   "`torchrun --nproc_per_node N -m cnds_compiler.train.cli ...` (default 1)")
    p.add_argument("--epochs", type=count_argument(1), help="override the spec's epochs (with --resume: the run's)")
    p.add_argument("--batch-size", type=count_argument(1), help="override the spec's (global) batch size")
    p.add_argument("--lr", type=float, help="override the spec's base learning rate")
    p.add_argument("--momentum", type=float, help="override the spec's momentum")
    p.add_argument("--weight-decay", type=float, help="override the spec's weight decay")
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), help="override the spec's optimizer")
    p.add_argument("--seed", type=seed_argument, help=f"override the spec's seed (0..{MAX_SEED})")
    p.add_argument("--precision", "--mixed-precision", dest="mixed_precision", type=_precision, default="no",
                   metavar="fp32|bf16|fp16", help="arithmetic of the forward and backward passes through "
                   "Accelerate's autocast (weights and optimiser stay fp32); bf16 runs on CPU and GPU, fp16 "
                   "(with loss scaling) on CUDA GPUs only (default fp32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="model and images in channels-last (NHWC) memory layout (default: on for CPU training, "
                   "where it is measured faster, off on GPUs; --resume keeps the checkpoint's layout)")
    p.add_argument("--compile", action="store_true", help="train through torch.compile of the training module "
                   "(the first step compiles: seconds to minutes; the time is printed)")
    p.add_argument("--prefetch", type=count_argument(1), metavar="N",
                   help="batches each loader worker prepares ahead (needs --workers; default 2)")
    p.add_argument("--grad-accum", type=count_argument(1), default=1, help="gradient accumulation steps")
    p.add_argument("--limit-train", type=count_argument(1), help="use only the first N training examples")
    p.add_argument("--max-steps", type=count_argument(1), help="stop after N optimizer steps (smoke tests)")
    p.add_argument("--grad-monitor", type=count_argument(0), default=0, metavar="N",
                   help="record every conv layer's mean |gradient| every N steps into gradients.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--memory-budget", type=gib_argument, metavar="GiB",
                   help="memory the training may use, checked against an estimate before anything is allocated "
                   "(default: the GPU's free memory, else the RAM available now; env CNDS_MEMORY_BUDGET_GIB)")
    _common(p)
    return p


def _relaunch(argv: list[str], processes: int) -> int:
    """Run this command again under torchrun with ``processes`` processes (``--processes`` dropped)."""
    import os
    import socket
    import subprocess

    from ..threads import configure_threads

    rest, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--processes":
            skip = i + 1 < len(argv)
            continue
        if not arg.startswith("--processes="):
            rest.append(arg)
    with socket.socket() as s:  # a free port for the rendezvous: a fixed one may still be in TIME_WAIT
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "cnds_compiler.train.launch", "--nproc_per_node", str(processes),
               "--master_port", str(port), "-m", "cnds_compiler.train.cli", *rest]
    env = dict(os.environ)
    configure_threads(env, processes)  # the free cores shared out (torchrun would give each one, and say so)
    try:
        return subprocess.run(command, env=env).returncode
    except KeyboardInterrupt:
        return Interrupted.exit_code


def _warn_single_process_launch() -> None:
    """`accelerate launch --cpu --num_processes N` starts one process on CPU (it sets a rendezvous address
    but no world size); say so instead of training silently at a fraction of the asked parallelism."""
    import os

    if os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ and os.environ.get("ACCELERATE_USE_CPU"):
        print("cnds-train: warning: the launcher asked for several processes but started 1 (accelerate launch "
              "runs one process on CPU); use `cnds-train ... --processes N` (torchrun underneath)",
              file=sys.stderr)


def _terminate_as_exit() -> None:
    """SIGTERM (``kill``, a batch system's time limit, torchrun stopping its workers) and SIGHUP (the terminal
    or ssh session closed) unwind like an error: the run lock is released and a checkpoint being written is
    left whole (its temp file removed); the exit code is 128 + the signal's number, as when it kills."""
    import signal
    import threading

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):  # no SIGHUP on Windows
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, stop)


def _remove_if_empty(folder: Path | None) -> None:
    """A run refused before it wrote anything (memory check, bad data, a bad checkpoint) leaves no empty
    run folder behind; ``folder`` is the one this command created, if any."""
    if folder is None:
        return
    try:
        folder.rmdir()  # only succeeds when empty: nothing the run or anyone else wrote is touched
    except OSError:
        pass


@command("cnds-train")
def train_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _train_parser().parse_args(argv)
    import os

    if args.processes > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch(argv, args.processes)
    _warn_single_process_launch()
    from ..threads import configure_process

    configure_process()  # threads and memory reuse, before torch is imported
    _terminate_as_exit()
    trainer, out, created_out = None, None, None
    try:
        try:
            from ..frontend import compile_spec
            from ..memory import budget_from_gib
            from .rundir import saved_train_config
            from .trainer import RunOptions, Trainer, effective_config

            net = compile_spec(args.spec)
            out = Path(args.out) if args.out else Path("runs") / net.name
            overrides = {
                "epochs": args.epochs, "batch": args.batch_size, "lr": args.lr, "momentum": args.momentum,
                "weight_decay": args.weight_decay, "optimizer": args.optimizer, "seed": args.seed,
            }
            saved = saved_train_config(out) if args.resume else None  # --resume alone: the run's own settings
            cfg = effective_config(net, overrides, saved)
            if saved is not None and int(os.environ.get("RANK", "0")) == 0:
                for key, value in overrides.items():
                    if value is not None and value != getattr(saved, key):
                        flag = "--batch-size" if key == "batch" else f"--{key.replace('_', '-')}"
                        print(f"note: {flag} {value} replaces the run's {getattr(saved, key)} from here on")
            created_out = out if not out.exists() else None
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"cannot create the run folder ({e.strerror or e})", path=str(out)) from None
            if not args.resume and (out / "last.pt").exists():
                raise CndsError(f"{out} already holds a run; pass --resume to continue it or choose another --out",
                                path=str(out))
            opts = RunOptions(
                data=args.data, out_dir=out, resume=args.resume, init_from=args.init_from,
                mixed_precision=args.mixed_precision, grad_accum=args.grad_accum, cpu=args.cpu,
                workers=args.workers, strict=args.strict, ten_crop=args.ten_crop, limit_train=args.limit_train,
                limit_val=args.limit_val, val_split=args.val_split, split_seed=args.split_seed,
                progress=not args.no_progress, grad_monitor=args.grad_monitor,
                max_steps=args.max_steps, memory_budget=budget_from_gib(args.memory_budget),
                channels_last=args.channels_last, compile=args.compile, prefetch=args.prefetch,
            )
            trainer = Trainer(net, cfg, opts)
            history = trainer.run()
            if not trainer.acc.is_main_process:
                history = []  # only the main process reports
        except (KeyboardInterrupt, OSError) as stop:
            from cnds_runtime.errors import output_write_failed

            if isinstance(stop, KeyboardInterrupt):
                error, why = Interrupted, ""
            elif isinstance(stop, BrokenPipeError):
                error, why = OutputClosed, ""
            elif output_write_failed(stop):
                error, why = OutputFailed, f"{stop.strerror}; "
            else:
                raise
            if trainer is not None and not trainer.acc.is_main_process:
                return error.exit_code  # the main process says it, once
            where = trainer.interruption() if trainer is not None else "before training started"
            raise error(why + where, path=str(out) if out is not None else None) from None
    except CndsError as e:
        _remove_if_empty(created_out)
        if trainer is None and int(os.environ.get("RANK", "0")) > 0:
            return e.exit_code  # before training every process checks the same spec, arguments and folder
        return report(e, args.traceback)
    if history:
        last = history[-1]
        error = last["val_top1_error"]["main"] * 100
        print(f"done: {len(history)} epoch{'s' * (len(history) != 1)}, val top-1 error {error:.2f}% "
              f"(accuracy {100 - error:.2f}%), run in {out}")
    return 0


@command("cnds-eval")
def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cnds-eval", description=textwrap.fill(
                                "Top-1/top-5 error of a checkpoint, for the main head and every supervision "
                                "branch."), epilog=ENVIRONMENT,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="the .cnds spec the checkpoint was trained from")
    p.add_argument("checkpoint", help="a checkpoint (last.pt / best.pt)")
    p.add_argument("--batch-size", type=count_argument(1), default=256)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--per-class", action="store_true", help="also the main head's top-1 error per class")
    _common(p)
    args = p.parse_args(argv)
    from ..threads import configure_process

    configure_process()
    try:
        import torch

        from ..backends.pytorch import build_module
        from ..checkpoint import load_checkpoint
        from ..data import load_source, make_loader
        from ..frontend import compile_spec
        from .evaluate import evaluate

        net = compile_spec(args.spec)
        ckpt = load_checkpoint(args.checkpoint, net, need="model")
        model = build_module(net)
        model.load_state_dict(ckpt["model"])
        data = load_source(args.data, net, strict=args.strict, ten_crop=args.ten_crop, limit_val=args.limit_val,
                           val_split=args.val_split, split_seed=args.split_seed)
        loader = make_loader(data.val, args.batch_size, shuffle=False, workers=args.workers)
        device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        model.to(device)
        per_class = torch.zeros(net.num_classes, 2, dtype=torch.float64)
        top1, top5, skipped = evaluate(model, loader, device, model.branch_names, ten_crop=args.ten_crop,
                                       per_class=per_class)
    except CndsError as e:
        return report(e, args.traceback)
    names = net.class_names or tuple(str(i) for i in range(net.num_classes))
    classes = [{"class": name, "examples": int(n), "top1_error": (float(w) / n) if n else None}
               for name, (n, w) in zip(names, per_class.tolist(), strict=True)]
    if args.json:
        import json

        doc = {"spec": net.name, "checkpoint": str(args.checkpoint), "data": data.description,
               "examples": int(per_class[:, 0].sum()), "skipped": skipped,
               "heads": {h: {"top1_error": top1[h], "top5_error": top5[h]} for h in top1}}
        if args.per_class:
            doc["per_class"] = classes
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{net.name} on {data.description}" + (f" ({skipped} unreadable images skipped)" if skipped else ""))
    print(f"{'head':<16}{'top-1 error %':>15}{'top-5 error %':>15}")
    for head in top1:
        print(f"{head:<16}{top1[head] * 100:>15.2f}{top5[head] * 100:>15.2f}")
    if args.per_class:
        print(f"\n{'class (main head)':<20}{'examples':>10}{'top-1 error %':>15}")
        for c in classes:
            error = "-" if c["top1_error"] is None else f"{c['top1_error'] * 100:.2f}"
            print(f"{c['class']:<20}{c['examples']:>10}{error:>15}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
