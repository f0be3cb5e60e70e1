"""``cnds-import``: a Caffe net definition or a torchvision model → a readable ``.cnds`` spec
(and, with ``--weights``, a cnds checkpoint beside it).

    cnds-import models/bvlc_googlenet/train_val.prototxt -o googlenet.cnds
    cnds-import torchvision:resnet18 -o resnet18.cnds --weights resnet18.pth      # also writes resnet18.pt
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from ..errors import CndsError, OutputError, SpecIncludeError, command, report

TORCHVISION = "torchvision:"


def _shape(text: str) -> tuple[int, int, int]:
    if not re.fullmatch(r"\d+x\d+x\d+", text):
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 3x224x224, got {text!r}")
    c, h, w = (int(v) for v in text.split("x"))
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError("every dimension must be >= 1")
    return c, h, w


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnds-import",
        description="Write the .cnds spec of an existing network: a Caffe text net definition (.prototxt, "
                    "current `layer {}` or legacy V1 `layers {}` form) or a torchvision model "
                    "(torchvision:NAME, traced with torch.fx; nothing is downloaded).",
    )
    p.add_argument("source", help="NET.prototxt or torchvision:NAME (e.g. torchvision:resnet18)")
    p.add_argument("-o", "--output", required=True, help="the .cnds file to write")
    p.add_argument("--weights", metavar="STATE_DICT", help="torchvision only: a local state dict (.pth); also "
                   "writes OUT.pt, a cnds checkpoint for --init-from, cnds-eval and cnds-compile --weights")
    p.add_argument("--input", type=_shape, metavar="CxHxW",
                   help="input size (torchvision default 3x224x224; Caffe: from the data or input layer)")
    p.add_argument("--name", help="network name (default: the file or model name)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--traceback", action="store_true", help=argparse.SUPPRESS)
    return p


@command("cnds-import")
def import_main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    out = Path(args.output)
    if out.suffix != ".cnds":
        parser.error(f"-o must name a .cnds file, got {out.name!r}")
    if args.weights and not args.source.startswith(TORCHVISION):
        parser.error("--weights applies to torchvision:NAME sources")
    try:
        start = time.perf_counter()
        text, state, params = _import(args, out)
        _write(out, text, state, args)
        if not args.quiet:
            extra = f" and {out.with_suffix('.pt')}" if state is not None else ""
            print(f"wrote {out}{extra}: {params:,} parameters, checked by compiling it "
                  f"({time.perf_counter() - start:.1f} s)")
    except CndsError as e:
        return report(e, args.traceback)
    return 0


def _import(args, out: Path):
    """(spec text, checkpoint state or None, parameter count); the text is compiled before anything is written."""
    from ..frontend import compile_text

    source = args.source
    if source.startswith(TORCHVISION):
        from .torchvision import import_torchvision, load_state_dict

        name = source[len(TORCHVISION):]
        imported = import_torchvision(name, args.input or (3, 224, 224))
        text = imported.text if not args.name else imported.text.replace(
            f"\nnetwork {imported.name}\n", f"\nnetwork {args.name}\n", 1)
        net = compile_text(text, str(out), base_dir=out.resolve().parent)
        if sum(layer.params for layer in net.trunk) != imported.params:
            raise CndsError(f"the written spec has {sum(layer.params for layer in net.trunk):,} parameters, "
                            f"the model {imported.params:,}; nothing was written", path=str(out))
        state = None
        if args.weights:
            weights = Path(args.weights)
            if weights.resolve() == out.with_suffix(".pt").resolve():
                raise OutputError("the checkpoint would overwrite the weights it is made from", path=str(weights))
            state = _checkpoint(net, imported.state_dict(load_state_dict(weights, imported.model)))
        return text, state, imported.params
    path = Path(source)
    if not path.exists() and not path.is_symlink():  # a link leading nowhere is reported by the reader
        raise SpecIncludeError("no such prototxt file", path=str(path))
    try:
        overwrites = path.resolve() == out.resolve()
    except (OSError, RuntimeError):  # a symlink loop: it is no file -o could name
        overwrites = False
    if overwrites:
        raise OutputError("-o would overwrite the prototxt it imports", path=str(out))
    from .caffe import import_caffe

    imported = import_caffe(path, name=args.name, input_shape=args.input)
    net = compile_text(imported.text, str(out), base_dir=out.resolve().parent)
    return imported.text, None, sum(layer.params for layer in net.all_layers())


def _checkpoint(net, state) -> dict:
    from ..serialize import dumps

    return {"model": state, "epoch": 0, "spec_name": net.name, "spec_text": dumps(net), "ir_hash": net.digest()}


def _write(out: Path, text: str, state: dict | None, args) -> None:
    """Both files or neither: the checkpoint first (the larger write), then the spec; a failed spec write
    removes the checkpoint it would have described."""
    from ..io import atomic_write_text

    ckpt = out.with_suffix(".pt")
    if state is not None:
        from ..checkpoint import save_checkpoint

        existed = ckpt.exists()
        save_checkpoint(ckpt, state)
        try:
            atomic_write_text(out, text)
        except CndsError:
            if not existed:
                ckpt.unlink(missing_ok=True)
            raise
        return
    atomic_write_text(out, text)


if __name__ == "__main__":
    sys.exit(import_main())
