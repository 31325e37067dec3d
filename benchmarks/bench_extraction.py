"""Static vs dynamic (PI-CAI, peak-relative) candidate extraction: the CPM each gives on the same
predictions, and the README picture.

Data (``--real``, default ``../shared/data/real``): every shared real lesion mask (MS lesion changes,
QIN head-and-neck PET lesions) made into probability maps with *perfect localisation*: the mask blurred
(Gaussian, sigma 1 voxel) to a peak drawn per lesion in [0.5, 1], plus an in-plane halo of 2 or 3 voxels
at probability 0.15-0.3 (the situation of issue 13), plus 5 false-positive blobs per scan. Optionally
(``--predictions P --labels L``) a folder of real predictions (e.g. the default run's
``results/predictions/probabilities`` against the test labels) is evaluated both ways too.

Usage::

    .venv/bin/python benchmarks/bench_extraction.py                      # CPM table
    .venv/bin/python benchmarks/bench_extraction.py --figure docs/img/extraction.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent


def halo_prediction(mask: np.ndarray, halo_vox: int, rng: np.random.Generator, n_fp: int = 5,
                    peaks: list[float] | None = None, halo: float | None = None) -> np.ndarray:
    """Perfectly placed probability map of ``mask`` with an in-plane halo of ``halo_vox`` voxels."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    peaks = np.r_[0.0, rng.uniform(0.5, 1.0, n) if peaks is None else peaks].astype(np.float32)
    core = ndimage.gaussian_filter(mask.astype(np.float32), 1.0) / 0.5
    core = np.clip(core, 0, 1) * ndimage.grey_dilation(peaks[labels], size=(3, 3, 3))
    prob = core
    if halo_vox:
        ring = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 1), bool), iterations=halo_vox)
        prob = np.maximum(prob, ring * (rng.uniform(0.15, 0.3) if halo is None else halo))
    for _ in range(n_fp):
        c = [rng.integers(0, s) for s in mask.shape]
        box = tuple(slice(max(ci - 2, 0), ci + 3) for ci in c)
        prob[box] = np.maximum(prob[box], rng.uniform(0.2, 0.9))
    return np.clip(prob, 0, 1).astype(np.float32)


def real_masks(real: Path):
    import nibabel as nib

    from pipeline.io.volume import make_affine

    paths = sorted((real / "ms_lesion_change_lit_longitudinal").glob("*/lesion_change_mask.nii.gz"))
    paths += [real / "qin_headneck_pet_multilesion" / "lesion_instances.nii.gz"]
    for p in paths:
        if p.exists():
            img = nib.load(p)
            yield (p.parent.name, np.ascontiguousarray(np.asarray(img.dataobj) > 0),
                   make_affine(img.header.get_zooms()[:3]))  # the spacing's diagonal affine (mm)


def cpm_both(cases, lesion_label=1) -> dict[str, float]:
    from pipeline.config import EvaluationConfig
    from pipeline.evaluation.evaluate import evaluate_cases

    out = {}
    for mode in ("static", "dynamic"):
        cfg = EvaluationConfig(extraction=mode, bootstrap=0)
        res = evaluate_cases(list(cases), cfg, lesion_label=lesion_label, voxel_metrics=False)
        out[mode] = (res.cpm, float(res.sensitivity_at_fp[3]), res.curve.n_lesions)
    return out


def figure(path: Path) -> None:
    """Two lesions 3 voxels apart and one alone, predicted in the right place (peaks 0.9, 0.8, 0.7) with a
    4-voxel in-plane halo at 0.2."""
    from pipeline.evaluation.candidates import DynamicExtraction
    from pipeline.evaluation.report import plot_extraction

    shape = (64, 48, 9)
    g = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    mask = np.zeros(shape, bool)
    for c, r in (((18, 24, 4), 4.5), ((30, 24, 4), 4.5), ((48, 22, 4), 3.0)):
        mask |= ((g[0] - c[0]) ** 2 + (g[1] - c[1]) ** 2 + (3 * (g[2] - c[2])) ** 2) <= r * r
    rng = np.random.default_rng(3)
    prob = halo_prediction(mask, 4, rng, n_fp=0, peaks=[0.9, 0.8, 0.7], halo=0.2)
    plot_extraction(path, prob, mask, 4, 0.1, DynamicExtraction(max_lesions=100),
                    ("static (p >= 0.1)", "dynamic (p >= peak / 2.5)"))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", type=Path, default=REPO.parent / "shared" / "data" / "real")
    ap.add_argument("--predictions", type=Path, default=None)
    ap.add_argument("--labels", type=Path, default=None)
    ap.add_argument("--lesion-label", type=int, default=None)
    ap.add_argument("--figure", type=Path, default=None, help="only write the README picture here")
    args = ap.parse_args(argv)
    if args.figure:
        figure(args.figure)
        return 0
    rows = []
    for halo in (0, 2, 3):
        rng = np.random.default_rng(halo)
        cases = [(name, halo_prediction(m, halo, rng), m.astype(np.uint8), sp)
                 for name, m, sp in real_masks(args.real)]
        if not cases:
            print(f"no real masks under {args.real}")
            break
        r = cpm_both(cases)
        rows.append((f"real masks, perfect placement, halo {halo} vox ({len(cases)} scans, {r['static'][2]} lesions)",
                     r))
    if args.predictions:
        from pipeline.evaluation.folders import _read_cases, pair_files

        pairs, problems = pair_files(args.predictions, args.labels)
        cases = list(_read_cases(pairs, problems, args.lesion_label))
        r = cpm_both(cases, args.lesion_label)
        rows.append((f"{args.predictions} ({len(cases)} scans, {r['static'][2]} lesions)", r))
    print("| predictions | static CPM | dynamic CPM | static sens @ 1 FP | dynamic sens @ 1 FP |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['static'][0]:.3f} | {r['dynamic'][0]:.3f} | {r['static'][1]:.3f} | "
              f"{r['dynamic'][1]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
