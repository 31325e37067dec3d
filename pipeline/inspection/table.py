"""The per-lesion table for inspection: one row per GT lesion and per false-positive candidate.

Built from the evaluate stage's ``lesions.csv`` (see :mod:`pipeline.evaluation.report` for its columns):

* GT lesions (``kind=lesion``) become ``TP`` (hit by a candidate; ``score`` = the best hitting candidate's
  score) or ``missed`` (no candidate hits it; ``score`` NaN);
* candidates with outcome ``fp`` become ``FP``;
* candidates that hit a lesion (outcome ``tp``, the detection already shown on its lesion's row, or
  ``ignored``, an extra mark on a found lesion) are left out unless ``include_hit_candidates``, as
  ``TP candidate`` / ``ignored``.

``at_operating_point`` says whether the row counts at the chosen operating point (``score >=`` its
threshold): a detected lesion for TP rows, a counted false positive for FP rows, never for missed rows.
Centroids are world RAS mm, volumes mm^3, diameters the equivalent-sphere diameter in mm.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.contracts import OperatingPoint

TABLE_COLUMNS = ["scan", "kind", "id", "diameter_mm", "volume_mm3", "score", "at_operating_point", "iou",
                 "size_bucket", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "voxels", "matched_id"]
KIND_ORDER = ("missed", "TP", "FP", "TP candidate", "ignored")
_KIND = {("lesion", "hit"): "TP", ("lesion", "missed"): "missed", ("candidate", "fp"): "FP",
         ("candidate", "tp"): "TP candidate", ("candidate", "ignored"): "ignored"}


def operating_threshold(metrics: Mapping[str, Any] | None) -> float | None:
    """The chosen operating point's score threshold from ``metrics.json`` (None: no operating point, or no
    candidate at all when it was chosen)."""
    data = (metrics or {}).get("operating_point")
    if not data:
        return None
    return OperatingPoint.from_dict(data, "metrics.json: operating_point").score_threshold


def lesion_table(lesions: pd.DataFrame, threshold: float | None = None,
                 include_hit_candidates: bool = False) -> pd.DataFrame:
    """The inspection table from a ``lesions.csv`` DataFrame (see the module docstring).

    Args:
        lesions: ``lesions.csv`` as read by pandas.
        threshold: the operating point's score threshold (``at_operating_point``); None: no row counts.
        include_hit_candidates: keep the candidates that hit a lesion (kinds ``TP candidate``, ``ignored``).

    Returns:
        Columns :data:`TABLE_COLUMNS`, sorted by scan, kind (missed, TP, FP) and id; ``kind`` is an
        ordered categorical, so ``df.sort_values("kind")`` keeps that order.
    """
    df = lesions.copy()
    if df.empty:
        out = pd.DataFrame({c: pd.Series(dtype=object) for c in TABLE_COLUMNS})
        out["kind"] = pd.Categorical(out["kind"], categories=KIND_ORDER, ordered=True)
        return out
    kinds = [_KIND.get((k, o)) for k, o in zip(df["kind"].astype(str), df["outcome"].astype(str))]
    unknown = {(k, o) for (k, o), v in zip(zip(df["kind"], df["outcome"]), kinds) if v is None}
    if unknown:
        raise ValueError(f"lesions table: unknown kind/outcome pairs {sorted(unknown)}")
    df["kind"] = pd.Categorical(kinds, categories=KIND_ORDER, ordered=True)
    kept = ["TP", "missed", "FP"] + (["TP candidate", "ignored"] if include_hit_candidates else [])
    keep = df["kind"].isin(kept)
    df = df[keep].copy()
    score = pd.to_numeric(df["score"], errors="coerce")
    df["score"] = score
    if threshold is not None:
        # lesions.csv keeps 6 significant digits: round the threshold alike, or the lowest-scoring
        # candidate of the operating point (score == threshold) would read as below it
        counted = score.ge(float(f"{threshold:.6g}"))
    else:
        counted = pd.Series(False, index=df.index)
    df["at_operating_point"] = counted.fillna(False).astype(bool) & (df["kind"] != "missed")
    df["matched_id"] = df["matched_id"].fillna("").astype(str).replace("nan", "")
    df = df.sort_values(["scan", "kind", "id"], kind="stable").reset_index(drop=True)
    return df[TABLE_COLUMNS]


def read_lesion_table(path: str | Path, metrics: Mapping[str, Any] | None = None,
                      include_hit_candidates: bool = False) -> pd.DataFrame:
    """:func:`lesion_table` of a ``lesions.csv`` file, thresholded at ``metrics``' operating point."""
    raw = pd.read_csv(path, dtype={"scan": str, "matched_id": str})
    return lesion_table(raw, operating_threshold(metrics), include_hit_candidates)


def filter_lesions(df: pd.DataFrame, *, kind: str | list[str] | None = None,
                   scan: str | list[str] | None = None, min_diameter_mm: float | None = None,
                   max_diameter_mm: float | None = None,
                   min_score: float | None = None, size_bucket: str | None = None) -> pd.DataFrame:
    """Rows matching every given condition (None = no condition on that column).

    >>> t = pd.DataFrame({"kind": ["TP", "FP"], "scan": ["a", "b"], "diameter_mm": [6.0, 3.0],
    ...                   "score": [0.9, 0.4], "size_bucket": ["5-10mm", "<5mm"]})
    >>> filter_lesions(t, kind="FP", min_score=0.3)["scan"].tolist()
    ['b']
    """
    mask = pd.Series(True, index=df.index)
    if kind is not None:
        mask &= df["kind"].isin([kind] if isinstance(kind, str) else kind)
    if scan is not None:
        mask &= df["scan"].isin([scan] if isinstance(scan, str) else scan)
    if min_diameter_mm is not None:
        mask &= df["diameter_mm"] >= min_diameter_mm
    if max_diameter_mm is not None:
        mask &= df["diameter_mm"] <= max_diameter_mm
    if min_score is not None:
        mask &= df["score"].fillna(-np.inf) >= min_score
    if size_bucket is not None:
        mask &= df["size_bucket"] == size_bucket
    return df[mask]


def missed(df: pd.DataFrame) -> pd.DataFrame:
    """Missed GT lesions, largest first."""
    rows = df[df["kind"] == "missed"]
    return rows.sort_values(["diameter_mm", "scan"], ascending=[False, True], kind="stable")


def detected(df: pd.DataFrame) -> pd.DataFrame:
    """Detected GT lesions (TP), highest score first."""
    return df[df["kind"] == "TP"].sort_values(["score", "scan"], ascending=[False, True], kind="stable")


def false_positives(df: pd.DataFrame, top: int | None = None) -> pd.DataFrame:
    """False-positive candidates, highest score first (the ``top`` first if given)."""
    out = df[df["kind"] == "FP"].sort_values(["score", "scan"], ascending=[False, True], kind="stable")
    return out.head(top) if top is not None else out


def centre_mm(row: Mapping[str, Any] | pd.Series) -> np.ndarray:
    """``(3,)`` world RAS centroid (mm) of a table row."""
    return np.array([row["centroid_x_mm"], row["centroid_y_mm"], row["centroid_z_mm"]], dtype=np.float64)


def describe(row: Mapping[str, Any] | pd.Series, short: bool = False) -> str:
    """One line for titles: scan, what it is, size, score (``short``: two compact lines for a gallery).

    >>> describe({"scan": "s1", "kind": "FP", "id": 3, "diameter_mm": 4.2, "volume_mm3": 38.8,
    ...           "score": 0.91, "at_operating_point": True})
    's1 | false positive (candidate 3) | 4.2 mm, 38.8 mm^3 | score 0.910, counted at the operating point'
    """
    kind = str(row["kind"])
    what = {"TP": "detected lesion", "missed": "missed lesion", "FP": "false positive",
            "TP candidate": "detecting candidate", "ignored": "ignored candidate"}.get(kind, kind)
    noun = "candidate" if kind in ("FP", "TP candidate", "ignored") else "lesion"
    score = row.get("score") if hasattr(row, "get") else row["score"]
    has_score = score is not None and not (isinstance(score, float) and np.isnan(score))
    if short:
        s = f"p={float(score):.2f}" if has_score else "no candidate"
        return f"{row['scan']} {noun} {int(row['id'])} ({kind})\n{float(row['diameter_mm']):.1f} mm, {s}"
    text = (f"{row['scan']} | {what} ({noun} {int(row['id'])}) | {float(row['diameter_mm']):.1f} mm, "
            f"{float(row['volume_mm3']):.1f} mm^3 | ")
    if not has_score:
        return text + "no candidate hits it"
    at_op = bool(row.get("at_operating_point", False)) if hasattr(row, "get") else False
    verb = "detected" if kind == "TP" else "counted"
    return text + f"score {float(score):.3f}, " + (f"{verb} at the operating point" if at_op
                                                   else f"not {verb} at the operating point")
