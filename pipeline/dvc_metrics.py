"""What DVC experiments compare: a few numbers and plot tables in a git-tracked folder (``paths.metrics``).

``dvc exp run`` commits git-tracked files, so the headline metrics must live outside the git-ignored
``models/`` and ``results/`` folders (those hold the detailed outputs, cached by DVC). Each file here is
small and numeric, so ``dvc exp show --only-changed`` and ``dvc metrics diff`` stay readable:

* ``train.json``: best epoch, validation CPM / lesion Dice of the chosen checkpoint, final training loss.
* ``metrics.json``: test CPM with its 95% bootstrap CI, sensitivity at each FROC FP rate, lesion Dice and
  HD95 (mm), lesion / detected / false-positive / scan counts, and the extraction group of the detailed
  ``metrics.json`` when it holds only scalars.
* ``froc.csv``: the FROC curve as a step function, one row per distinct FP rate (the best sensitivity at
  that rate), drawn with ``interpolate: step-after`` (``.dvc/plots/step.json``).
* ``train_loss.csv``: one row per epoch; ``validation.csv``: one row per *validated* epoch only (epochs
  without validation would otherwise be drawn as 0).

Timings are left out on purpose: they differ on every run and would fill ``--only-changed``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.atomic import write_json, write_text

LOSS_COLUMNS = ("epoch", "loss", "focal", "dice_loss", "lr")
TRAIN_KEYS = ("best_epoch", "best_val_cpm", "best_val_dice_lesion", "final_train_loss")


def rate_key(rate: float) -> str:
    """FP-rate key readable in a DVC column name: 0.125 -> ``"1/8"``, 2.0 -> ``"2"``."""
    frac = Fraction(rate).limit_denominator(1024)
    if abs(float(frac) - rate) > 1e-9:
        return f"{rate:g}"
    return str(frac.numerator) if frac.denominator == 1 else f"{frac.numerator}/{frac.denominator}"


def _number(value: Any) -> float | int | None:
    """A finite int/float (bools excluded) or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = value.item() if isinstance(value, np.generic) else value
    return value if math.isfinite(value) else None


def _numbers(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` without non-numeric or non-finite leaves (DVC shows a missing key as ``-``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            sub = _numbers(value)
            if sub:
                out[key] = sub
        elif (num := _number(value)) is not None:
            out[key] = num
    return out


def evaluation_summary(metrics: dict[str, Any], fp_rates: Sequence[float],
                       lesion_names: Iterable[str]) -> dict[str, Any]:
    """The headline test metrics from the evaluate stage's detailed ``metrics`` dict.

    Args:
        metrics: the detailed metrics (``EvaluationResult.to_metrics()`` plus ``dice`` / ``hd95_mm`` per
            class name).
        fp_rates: the FROC FP rates, in the order of ``metrics["sensitivity_at_fp"]``.
        lesion_names: names of the lesion classes (Dice and HD95 are reported for these only).

    Returns:
        Nested dict of finite numbers, e.g. ``{"cpm": 0.9, "cpm_ci95": {"low": 0.8, "high": 1.0},
        "sensitivity_at_fp": {"1/8": ..., ..., "8": ...}, "dice": {"lesion": 0.7}, ...}``.
    """
    ci = metrics.get("cpm_ci95") or [None, None]
    sens = list((metrics.get("sensitivity_at_fp") or {}).values())
    names = list(lesion_names)
    out: dict[str, Any] = {
        "cpm": metrics.get("cpm"),
        "cpm_ci95": {"low": ci[0], "high": ci[1]},
        "sensitivity_at_fp": {rate_key(r): s for r, s in zip(fp_rates, sens)},
        "dice": {n: (metrics.get("dice") or {}).get(n) for n in names},
        "hd95_mm": {n: (metrics.get("hd95_mm") or {}).get(n) for n in names},
        "lesions": metrics.get("lesions_total"),
        "lesions_detected": metrics.get("lesions_detected"),
        "false_positives": metrics.get("false_positives_total"),
        "scans": metrics.get("scans_total"),
    }
    for name, per_class in (metrics.get("per_class") or {}).items():
        out.setdefault("cpm_by_class", {})[name] = per_class.get("cpm")
    extraction = metrics.get("extraction")
    if isinstance(extraction, dict):
        # the extraction / hit rule's parameters (issue 13's group), numbers only
        out["extraction"] = extraction
    return _numbers(out)


def froc_step_rows(fps_per_scan: Sequence[float], sensitivity: Sequence[float],
                   x_max: float) -> list[tuple[float, float]]:
    """The FROC curve as step vertices ``(fps_per_scan, sensitivity)`` with distinct, increasing x.

    At each distinct FP rate the highest sensitivity reached there is kept (the top of the vertical
    jump); drawn with ``step-after`` interpolation, the sensitivity holds until the next rate. A last
    point at ``x_max`` (the largest CPM rate) carries the final sensitivity to the axis end.

    Example:
        >>> froc_step_rows([0.0, 0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 0.9, 0.9, 1.0], x_max=8)
        [(0.0, 0.9), (0.5, 0.9), (1.0, 1.0), (8.0, 1.0)]
    """
    fps = np.asarray(fps_per_scan, dtype=np.float64)
    sens = np.asarray(sensitivity, dtype=np.float64)
    if fps.size == 0 or not np.isfinite(sens).any():
        return []
    xs, inverse = np.unique(fps, return_inverse=True)
    best = np.full(xs.size, -np.inf)
    np.maximum.at(best, inverse, np.nan_to_num(sens, nan=-np.inf))
    best = np.maximum.accumulate(best)  # a FROC curve never falls; guards against NaN-only groups
    rows = [(float(x), float(y)) for x, y in zip(xs, best)]
    if x_max > rows[-1][0]:
        rows.append((float(x_max), rows[-1][1]))
    return rows


def _csv(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    return "\n".join([",".join(columns), *(",".join(fmt(v) for v in row) for row in rows)]) + "\n"


def training_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Headline training numbers (no timings): best epoch, its validation CPM and lesion Dice, final loss."""
    return _numbers({k: summary.get(k) for k in TRAIN_KEYS})


def loss_rows(history: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """``LOSS_COLUMNS`` of every epoch."""
    return [[row.get(c, "") for c in LOSS_COLUMNS] for row in history]


def validation_rows(history: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of the validated epochs only: ``epoch`` and every ``val_*`` key."""
    val = [row for row in history if any(k.startswith("val_") for k in row)]
    columns = ["epoch"]
    for row in val:
        columns += [k for k in row if k.startswith("val_") and k not in columns]
    return columns, [[row.get(c, "") for c in columns] for row in val]


def write_training_metrics(folder: Path, summary: dict[str, Any], history: Sequence[dict[str, Any]]) -> None:
    """``train.json``, ``train_loss.csv`` and ``validation.csv`` in ``folder`` (each atomically)."""
    folder = Path(folder)
    write_json(folder / "train.json", training_summary(summary))
    write_text(folder / "train_loss.csv", _csv(LOSS_COLUMNS, loss_rows(history)))
    write_text(folder / "validation.csv", _csv(*validation_rows(history)))


def write_evaluation_metrics(folder: Path, metrics: dict[str, Any], fp_rates: Sequence[float],
                             lesion_names: Iterable[str], fps_per_scan: Sequence[float],
                             sensitivity: Sequence[float]) -> None:
    """``metrics.json`` (see :func:`evaluation_summary`) and ``froc.csv`` (step vertices) in ``folder``."""
    folder = Path(folder)
    write_json(folder / "metrics.json", evaluation_summary(metrics, fp_rates, lesion_names))
    rows = froc_step_rows(fps_per_scan, sensitivity, max(fp_rates) if len(fp_rates) else 0.0)
    write_text(folder / "froc.csv", _csv(("fps_per_scan", "sensitivity"), rows))
