"""Training outputs for people and DVC: the per-epoch CSV, the summary JSON and the curves plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from pipeline.io.atomic import atomic_path, write_text


def write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """One row per epoch; columns are the union of all rows' keys (validation columns are blank
    on epochs without validation)."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(path, buf.getvalue())


def plot_training_curves(path: Path, history: list[dict[str, Any]]) -> None:
    """Loss (total, focal, Dice) and validation CPM / lesion Dice against epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("loss", "total"), ("focal", "focal"), ("dice_loss", "Dice")):
        ax_loss.plot(epochs, [r[key] for r in history], label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss")
    ax_loss.legend()
    val = [r for r in history if "val_cpm" in r]
    if val:
        ax_val.plot([r["epoch"] for r in val], [r["val_cpm"] for r in val], "o-", label="CPM")
        ax_val.plot([r["epoch"] for r in val], [r["val_dice_lesion"] for r in val], "s--", label="lesion Dice")
        ax_val.legend()
    ax_val.set(xlabel="epoch", ylim=(0, 1.02), title="Validation (lesion level)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
