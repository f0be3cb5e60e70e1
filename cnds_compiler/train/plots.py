"""PNG of a run's curves: training loss per head, α per branch, validation top-1 error per head."""

from __future__ import annotations

import io
from pathlib import Path

from ..io import atomic_write_bytes


def plot_curves(history: list[dict], out: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for head in history[0]["train_loss"]:
        axes[0].plot(epochs, [m["train_loss"].get(head, float("nan")) for m in history], marker="o", label=head)
    axes[0].set(title="training loss per head", xlabel="epoch", ylabel="loss")
    for name in history[0]["alphas"]:
        axes[1].plot(epochs, [m["alphas"][name] for m in history], marker="o", label=f"α[{name}]")
    axes[1].set(title="branch weight α_t (eq. 2)", xlabel="epoch", ylabel="α")
    for head in history[0]["val_top1_error"]:
        axes[2].plot(epochs, [100 * m["val_top1_error"][head] for m in history], marker="o", label=head)
    axes[2].set(title="validation top-1 error per head", xlabel="epoch", ylabel="error %")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buffer.getvalue())
