"""Figures in the style of the paper's Figure 2: (a) the probe, (b–d) one layer in two training runs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CndsError, did_you_mean


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _positive(values: Sequence[float]) -> list[float]:
    """Log axes cannot show 0 (a dead layer): plot it as a gap."""
    return [v if v > 0 and math.isfinite(v) else float("nan") for v in values]


def _save(fig, out: Path) -> None:
    import io

    from ..io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(out, buf.getvalue())


def plot_probe(result, proposal, out: str | Path, title: str | None = None) -> Path:
    """Figure 2(a): mean |grad| per conv layer against iteration, log scale, threshold drawn,
    proposed taps drawn thick with their name marked at the right end."""
    plt = _pyplot()
    out = Path(out)
    proposed = set(proposal.taps)
    cmap = plt.get_cmap("viridis")
    n = len(result.layers)
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    iters = list(range(1, len(result.losses) + 1))
    for i, name in enumerate(result.layers):
        colour = cmap(i / max(1, n - 1) * 0.9)
        label = f"{name} ({i + 1})" + ("  ← supervise" if name in proposed else "")
        ax.plot(iters, _positive(result.history[name]), color=colour, label=label,
                linewidth=2.8 if name in proposed else 1.3, marker="o" if name in proposed else None,
                markersize=3, markevery=max(1, len(iters) // 10))
    ax.axhline(proposal.threshold, color="crimson", linestyle="--", linewidth=1.2,
               label=f"threshold {proposal.threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("back-prop iteration")
    ax.set_ylabel("mean |gradient| of the layer's conv weights")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="conv layer (depth)",
              title_fontsize=8)
    ax.set_title(title or f"{result.network}: {result.init_description}, batch {result.batch_size}, "
                 f"lr {result.lr:g}", fontsize=10)
    fig.text(0.01, 0.01, f"data: {result.data_description}\nrule: {proposal.message}", fontsize=7,
             va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, out)
    plt.close(fig)
    return out


# ---- training runs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradientLog:
    """One run's per-layer gradient records."""

    label: str
    records: list[dict]
    path: str

    def layers(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.records:
            for k in r:
                if k != "step":
                    seen.setdefault(k, None)
        return list(seen)

    def series(self, layer: str) -> tuple[list[int], list[float]]:
        steps, values = [], []
        for r in self.records:
            if layer in r:
                steps.append(int(r["step"]))
                values.append(float(r[layer]))
        return steps, values


def _records_from(doc, path: Path) -> tuple[list[dict], str | None]:
    if isinstance(doc, dict) and isinstance(doc.get("gradients"), list):  # a probe's --json
        return doc["gradients"], f"{doc.get('network', path.stem)} (probe)"
    if isinstance(doc, list):
        return doc, None
    raise CndsError("not a gradient log (expected gradients.json from `cnds-train --grad-monitor N` "
                    "or a `cnds-probe --json` file)", path=str(path))


def load_gradient_log(path: str | Path, label: str | None = None) -> GradientLog:
    """A run folder (its ``gradients.json``, else the ``grad_log`` of its ``last.pt``), a
    ``gradients.json`` or a ``cnds-probe --json`` file."""
    path = Path(path)
    default_label = path.name
    if path.is_dir():
        run = path
        path = run / "gradients.json"
        if not path.exists():
            ckpt = run / "last.pt"
            if ckpt.exists():
                from ..checkpoint import load_checkpoint

                records = list(load_checkpoint(ckpt).get("grad_log") or [])
                if not records:
                    raise CndsError("the run recorded no gradients; train it with --grad-monitor N",
                                    path=str(ckpt))
                return GradientLog(label or default_label, records, str(ckpt))
            raise CndsError("no gradients.json in this folder; train with `cnds-train --grad-monitor N`",
                            path=str(run))
    elif not path.exists():
        raise CndsError("no such run folder or gradient file", path=str(path))
    else:
        default_label = path.parent.name if path.name == "gradients.json" else path.stem
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CndsError(f"cannot read the gradient log ({e.__class__.__name__}: {e})", path=str(path)) from None
    records, probe_label = _records_from(doc, path)
    if not records or not all(isinstance(r, dict) and "step" in r for r in records):
        raise CndsError("the gradient log has no records with a 'step'", path=str(path))
    return GradientLog(label or probe_label or default_label, records, str(path))


def plot_gradient_comparison(
    logs: Sequence[GradientLog],
    layers: Sequence[str],
    out: str | Path,
    *,
    threshold: float | None = None,
    smooth: int = 1,
    title: str | None = None,
) -> Path:
    """Figure 2(b–d): one panel per layer, that layer's mean |grad| against step in every run, log scale."""
    if not logs:
        raise CndsError("no run to plot")
    if not layers:
        common = [name for name in logs[0].layers() if all(name in log.layers() for log in logs[1:])]
        if not common:
            raise CndsError("the runs share no layer; name one with --layer")
        layers = common
    for log in logs:
        names = log.layers()
        for layer in layers:
            if layer not in names:
                raise CndsError(f"run '{log.label}' has no gradients of '{layer}' (it has {', '.join(names)})",
                                path=log.path, hint=did_you_mean(layer, names))
    plt = _pyplot()
    out = Path(out)
    cols = min(3, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for k, layer in enumerate(layers):
        ax = axes[k // cols][k % cols]
        for j, log in enumerate(logs):
            steps, values = log.series(layer)
            if smooth > 1 and values:
                values = [sum(values[max(0, i - smooth + 1): i + 1]) / len(values[max(0, i - smooth + 1): i + 1])
                          for i in range(len(values))]
            ax.plot(steps, _positive(values), color=colours(j % 10), label=log.label, linewidth=1.4)
        if threshold is not None:
            ax.axhline(threshold, color="crimson", linestyle="--", linewidth=1.0, label=f"threshold {threshold:g}")
        ax.set_yscale("log")
        ax.set_title(f"({chr(ord('b') + k)}) {layer}" if len(layers) <= 3 else layer, fontsize=10)
        ax.set_xlabel("iteration (optimizer step)")
        ax.set_ylabel("mean |gradient|")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    for k in range(len(layers), rows * cols):
        axes[k // cols][k % cols].axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return out
