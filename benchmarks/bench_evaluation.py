"""Benchmark lesion-level evaluation: ours (cc3d, one pass per scan) vs picai_eval on the same scans.

Each synthetic scan (``--size``^3 voxels, 0.8 x 0.8 x 1.5 mm) holds 0-4 spherical lesions of 3-20 mm, a
blurred-sphere probability blob on ~85% of them, a few false-positive blobs and some single-voxel
speckle above the extraction threshold. Scans are generated one at a time (deterministic per index)
and handed to both evaluators in turn, so memory stays flat; generation is not timed.

Timed, per tool:

* ours: ``evaluate_case`` per scan (candidate extraction, GT components, matching, voxel Dice / HD95 /
  surface Dice) + one ``summarize`` (FROC, CPM, 1000-replicate bootstrap, operating points, buckets);
* picai_eval (if importable): ``extract_lesion_candidates`` (static threshold, same 0.1 threshold,
  no minimum size, no rounding) + ``evaluate_case`` per scan + ``Metrics`` (AP, FROC-style sensitivity).

Usage::

    .venv/bin/python benchmarks/bench_evaluation.py                       # 100 scans of 256^3
    .venv/bin/python benchmarks/bench_evaluation.py --n 20 --size 128 --picai-scans 5
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SPACING = (0.8, 0.8, 1.5)
_NOISE = False  # set by --noise


def _ball(out: np.ndarray, centre: np.ndarray, radius_mm: float, value, soft: bool = False) -> None:
    """Write a sphere (mm radius) into ``out`` inside its bounding box only."""
    sp = np.asarray(SPACING)
    r_vox = np.ceil(radius_mm * 1.6 / sp).astype(int) + 1
    lo = np.maximum(centre - r_vox, 0)
    hi = np.minimum(centre + r_vox + 1, out.shape)
    if np.any(hi <= lo):
        return
    grids = np.meshgrid(*[(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, centre, sp)], indexing="ij")
    d = np.sqrt(sum(g * g for g in grids))
    view = out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if soft:  # peak `value` at the centre, 0.5 * value at the radius, fading beyond
        blob = (value * np.exp(-np.log(2) * (d / radius_mm) ** 2)).astype(out.dtype)
        np.maximum(view, blob, out=view)
    else:
        view[d <= radius_mm] = value


def make_scan(index: int, size: int, seed: int = 0, noise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(probability float32, label uint8) of scan ``index``: deterministic, ``size``^3 voxels.

    ``noise``: a noise-only probability map instead (``u ** 45``, u uniform in [0, 1]: 5% of the voxels
    >= 0.1, below the 26-connected percolation threshold, so tens of thousands of components at 0.1 on a
    128^3 scan; no lesion blobs) over the same labels.
    """
    rng = np.random.default_rng([seed, index])
    shape = (size, size, size)
    # fill() touches every page now, as a file reader would; np.zeros would defer the page faults
    # into whichever evaluator first reads the array
    gt = np.empty(shape, np.uint8)
    gt.fill(0)
    prob = np.empty(shape, np.float32)
    prob.fill(0)
    for _ in range(rng.integers(0, 5)):
        centre = rng.integers(8, size - 8, size=3)
        radius = rng.uniform(1.5, 10.0)
        _ball(gt, centre, radius, 1)
        if rng.random() < 0.85:
            shift = rng.integers(-1, 2, size=3)
            peak = np.float32(rng.uniform(0.3, 1.0))
            _ball(prob, centre + shift, radius * rng.uniform(0.8, 1.2), peak, soft=True)
    for _ in range(rng.poisson(3)):
        peak = np.float32(rng.uniform(0.15, 0.9))
        _ball(prob, rng.integers(4, size - 4, size=3), rng.uniform(1.0, 6.0), peak, soft=True)
    if noise:
        u = rng.random(shape, dtype=np.float32)
        np.power(u, 45, out=u)
        return u, gt
    n_speckle = int(rng.integers(0, 30))
    idx = rng.integers(0, size, size=(n_speckle, 3))
    prob[idx[:, 0], idx[:, 1], idx[:, 2]] = np.maximum(prob[idx[:, 0], idx[:, 1], idx[:, 2]],
                                                       rng.uniform(0.1, 0.3, n_speckle).astype(np.float32))
    return prob, gt


def _picai():
    try:
        from picai_eval.eval import evaluate_case as picai_case
        from picai_eval.metrics import Metrics
        from report_guided_annotation import extract_lesion_candidates
    except ImportError:
        return None
    return picai_case, Metrics, extract_lesion_candidates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100, help="number of scans (default 100)")
    ap.add_argument("--size", type=int, default=256, help="edge length in voxels (default 256)")
    ap.add_argument("--picai-scans", type=int, default=None, help="run picai_eval on the first K scans only "
                    "(default: all; 0 disables); the ratio is per scan")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--io-scans", type=int, default=0, help="also write K scans as .nii.gz and time "
                    "evaluate_folders on them against the plain read time (default 0: skip)")
    ap.add_argument("--extraction", choices=["static", "dynamic"], default="static",
                    help="candidate extraction (evaluation.extraction; dynamic with its default parameters)")
    ap.add_argument("--noise", action="store_true", help="noise-only probability maps (see make_scan)")
    ap.add_argument("--workers", type=int, default=2, help="evaluate_folders threads (pairs read and evaluated "
                    "at once; default 2, its default)")
    args = ap.parse_args(argv)

    from pipeline.config import EvaluationConfig
    from pipeline.evaluation.evaluate import classes_of, evaluate_case, summarize

    cfg = EvaluationConfig(bootstrap=args.bootstrap, extraction=args.extraction)
    global _NOISE
    _NOISE = args.noise
    picai = _picai() if args.picai_scans != 0 else None
    n_picai = args.n if args.picai_scans is None else min(args.picai_scans, args.n)
    if picai is None:
        n_picai = 0
    from pipeline.io.volume import make_affine

    affine = make_affine(SPACING)
    classes = classes_of(None, 1)
    t_ours = t_ours_match = t_picai = t_gen = 0.0
    matches, voxel = [], {"lesion": []}
    picai_results, n_cand_ours, n_cand_picai = {}, 0, 0
    for i in range(args.n):
        t0 = time.perf_counter()
        prob, gt = make_scan(i, args.size, args.seed, _NOISE)
        t_gen += time.perf_counter() - t0

        t0 = time.perf_counter()
        m, vs = evaluate_case(f"s{i:03d}", prob, gt, affine, cfg, 1, classes, voxel_metrics=True)
        t_ours += time.perf_counter() - t0
        matches.append(m)
        voxel["lesion"].append(vs["lesion"])
        n_cand_ours += len(m.candidates)
        if i < n_picai:
            picai_case, _, extract = picai
            t0 = time.perf_counter()
            det = extract(prob, threshold=0.1, min_voxels_detection=0, max_prob_round_decimals=None)[0]
            y_list, *_ = picai_case(y_det=det, y_true=gt, min_overlap=0.1)
            t_picai += time.perf_counter() - t0
            picai_results[i] = y_list
            n_cand_picai += sum(1 for y in y_list if y[1] > 0)
        print(f"\r{i + 1}/{args.n} scans", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    t0 = time.perf_counter()
    result = summarize(matches, voxel, cfg)
    t_sum = time.perf_counter() - t0
    t_ours_total = t_ours + t_sum
    # ours without voxel metrics on the picai subset, to compare like with like (lesion level only)
    for i in range(n_picai):
        prob, gt = make_scan(i, args.size, args.seed, _NOISE)  # regenerated, not timed
        tm = time.perf_counter()
        evaluate_case(f"s{i:03d}", prob, gt, affine, cfg, 1, classes, voxel_metrics=False)
        t_ours_match += time.perf_counter() - tm

    lines = [
        f"scans: {args.n} of {args.size}^3 (spacing {SPACING} mm){', noise-only maps' if args.noise else ''}, "
        f"lesions {result.curve.n_lesions}, candidates {n_cand_ours}, extraction {args.extraction}",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
        f"python {platform.python_version()}, numpy {np.__version__}",
        f"generation (not timed): {t_gen:.1f} s",
        f"ours: {t_ours_total:.2f} s total = {t_ours:.2f} s per-scan work ({t_ours / args.n:.3f} s/scan, "
        f"incl. voxel metrics) + {t_sum:.2f} s aggregation (bootstrap {args.bootstrap})",
        f"ours CPM {result.cpm:.4f}, sensitivity at 1 FP/scan {result.sensitivity_at_fp[3]:.4f}",
    ]
    if n_picai:
        _, Metrics, _ = picai
        t0 = time.perf_counter()
        metrics = Metrics(lesion_results=picai_results)
        ap_ = metrics.AP
        t_picai_agg = time.perf_counter() - t0
        ours_per_scan = t_ours_match / n_picai
        picai_per_scan = t_picai / n_picai
        lines += [
            f"ours, lesion level only, on the {n_picai} picai scans: {t_ours_match:.2f} s "
            f"({ours_per_scan:.3f} s/scan)",
            f"picai_eval on {n_picai} scans: {t_picai:.2f} s ({picai_per_scan:.3f} s/scan) "
            f"+ {t_picai_agg:.2f} s "
            f"aggregation; candidates {n_cand_picai}; AP {ap_:.4f}",
            f"ratio picai_eval / ours (lesion level, per scan): {picai_per_scan / ours_per_scan:.1f}x",
        ]
    else:
        lines.append("picai_eval: not importable (or disabled); no ratio")
    if args.io_scans:
        lines += _bench_io(args.io_scans, args.size, args.seed, cfg, args.workers)
    print("\n".join(lines))
    return 0


def _bench_io(k: int, size: int, seed: int, cfg, workers: int = 2) -> list[str]:
    """evaluate_folders on K NIfTI pairs vs just reading them (the floor set by file decoding).

    Three figures: the whole cold call (first in the process: one-off imports of scipy / matplotlib /
    cc3d, FROC plot, CSV / JSON, bootstrap) over the plain read of the same K pairs; the same call warm;
    and the per-scan (marginal) cost, ``(T_warm(K) - T_warm(1)) / (K - 1)`` over the read time per pair,
    which is what the target (evaluation <= 1.25x reading) is about once one-off costs are amortised.
    The fixed cost is ``T_warm(1)`` minus one pair's read.
    """
    import shutil
    import tempfile
    import warnings

    from pipeline.evaluation import evaluate_folders
    from pipeline.io import Volume, read_volume, write_volume
    from pipeline.io.volume import make_affine

    warnings.simplefilter("ignore", RuntimeWarning)  # the candidate cap warns on every noise-only scan
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        root = Path(tmp)
        affine = make_affine(SPACING)
        for i in range(k):
            prob, gt = make_scan(i, size, seed, _NOISE)
            write_volume(root / "pred" / f"s{i:03d}.nii.gz", Volume(prob[None], affine))
            write_volume(root / "lab" / f"s{i:03d}.nii.gz", Volume(gt[None], affine))
        for sub in ("pred", "lab"):
            (root / f"{sub}1").mkdir()
            shutil.copy(root / sub / "s000.nii.gz", root / f"{sub}1" / "s000.nii.gz")
        t0 = time.perf_counter()
        for i in range(k):
            read_volume(root / "pred" / f"s{i:03d}.nii.gz"), read_volume(root / "lab" / f"s{i:03d}.nii.gz")
        t_read = time.perf_counter() - t0

        def run(pred: str, lab: str) -> float:
            t = time.perf_counter()
            evaluate_folders(root / pred, root / lab, root / "out", cfg, lesion_label=1, workers=workers)
            return time.perf_counter() - t

        t_cold = run("pred", "lab")
        t_warm = run("pred", "lab")
        t_one = run("pred1", "lab1")
    read1 = t_read / k
    marginal = (t_warm - t_one) / (k - 1) if k > 1 else float("nan")
    return [f"files: evaluate_folders ({workers} threads) on {k} .nii.gz pairs, cold {t_cold:.2f} s / "
            f"warm {t_warm:.2f} s vs "
            f"reading them alone {t_read:.2f} s ({read1:.3f} s/pair): whole call {t_cold / t_read:.2f}x cold, "
            f"{t_warm / t_read:.2f}x warm",
            f"per scan: {marginal:.3f} s/scan evaluated vs {read1:.3f} s/pair read: {marginal / read1:.2f}x; "
            f"fixed cost per call (warm, 1 scan minus its read): {t_one - read1:.2f} s"]


if __name__ == "__main__":
    raise SystemExit(main())
