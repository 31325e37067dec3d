"""How much a visit difference tells about MS lesion changes, with and without N4 bias-field correction.

For each patient of ``ms_lesion_change_lit_longitudinal`` (two FLAIR visits on one grid, expert masks of
the lesion *changes*): each visit is divided by its N4 field (:func:`pipeline.preprocessing.bias_field.n4_correct`,
the settings of ``preprocess.intensity.bias_field: [n4]``) or not, scaled to (x - median) / IQR inside the
brain mask, and the absolute visit difference, smoothed by a 1 mm Gaussian, is scored against the change
mask voxel by voxel inside the brain mask (ROC AUC: 0.5 = no information, 1 = perfect). Also reported:
the correlation of the two visits inside the brain and the N4 time per visit (seconds, this machine).

No training: a measure of the input signal the networks get, not of a detector.

Usage::

    .venv/bin/python benchmarks/bench_bias_field.py [--data-root ../shared/data/real]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.stats import rankdata

from pipeline.preprocessing.bias_field import DEFAULT_GRID_MM, n4_correct

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "real"
FOLDER = "ms_lesion_change_lit_longitudinal"


def robust_scale(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(x - median) / IQR over ``mask`` (unitless)."""
    lo, med, hi = np.percentile(x[mask], [25, 50, 75])
    return (x - med) / (hi - lo)


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``positive`` (Mann-Whitney U / (n+ n-), ties
    counted half)."""
    ranks = rankdata(score)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def patient_row(folder: Path, grid_mm: float = DEFAULT_GRID_MM) -> dict:
    visits = [nib.load(folder / f"study{v}_FLAIR_common.nii.gz") for v in (1, 2)]
    spacing = [float(s) for s in visits[0].header.get_zooms()[:3]]
    brain = np.asarray(nib.load(folder / "brainmask.nii.gz").dataobj) > 0
    change = np.asarray(nib.load(folder / "lesion_change_mask.nii.gz").dataobj)[brain] > 0
    row: dict = {"patient": folder.name}
    for mode in ("raw", "n4"):
        scaled, seconds = [], []
        for img in visits:
            data = np.asarray(img.dataobj, dtype=np.float32)
            if mode == "n4":
                start = time.perf_counter()
                data, _ = n4_correct(data, spacing, grid_mm)
                seconds.append(time.perf_counter() - start)
            scaled.append(robust_scale(data, brain))
        diff = np.abs(ndi.gaussian_filter(scaled[1] - scaled[0], [1.0 / s for s in spacing]))
        row[f"auc_{mode}"] = roc_auc(change, diff[brain])
        row[f"corr_{mode}"] = float(np.corrcoef(scaled[0][brain], scaled[1][brain])[0, 1])
        if seconds:
            row["n4_s_per_visit"] = float(np.mean(seconds))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    p.add_argument("--grid-mm", type=float, default=DEFAULT_GRID_MM,
                   help="N4 fitting grid (preprocess.intensity.n4_grid_mm)")
    opts = p.parse_args()
    base = opts.data_root / FOLDER
    if not base.is_dir():
        raise SystemExit(f"data set not found: {base}")
    print("| patient | AUC, abs. visit difference, raw | with N4 | visit correlation, raw | with N4 | N4 s / visit |")
    print("| --- | --- | --- | --- | --- | --- |")
    for folder in sorted(d for d in base.iterdir() if d.is_dir()):
        r = patient_row(folder, opts.grid_mm)
        print(f"| {r['patient']} | {r['auc_raw']:.3f} | {r['auc_n4']:.3f} | {r['corr_raw']:.3f} | "
              f"{r['corr_n4']:.3f} | {r['n4_s_per_visit']:.1f} |")


if __name__ == "__main__":
    main()
