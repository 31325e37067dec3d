"""FROC curve, CPM, bootstrap confidence intervals, operating points and size buckets (pure maths).

Inputs are the per-scan outcome of matching (:class:`~pipeline.evaluation.lesions.CaseMatch`), reduced
to two arrays per scan: the best hitting score of each GT lesion (NaN when missed) and the scores of
the false-positive candidates. Ignored candidates (extra hits on a lesion) play no part.

Definitions (LUNA16):

* For a score threshold ``t``: ``TP(t) = #{lesions with best score >= t}``,
  ``FP(t) = #{false-positive candidates with score >= t}``,
  ``sensitivity(t) = TP(t) / lesions_total``, ``fps_per_scan(t) = FP(t) / scans_total``.
* The **FROC curve** is evaluated at every distinct score (candidates with equal scores enter
  together), in decreasing order, after the point ``(0, 0)`` at threshold ``+inf``.
* **Reading the curve** at an FP rate ``x`` is linear interpolation on that polyline, exactly
  ``np.interp(x, fps, sens)`` on the full curve (what the LUNA16 script and MONAI's
  ``compute_froc_score`` do): with ``j`` the last vertex having ``fps <= x`` (so among equal-fps
  vertices the highest sensitivity), the value is interpolated between vertex ``j`` and ``j + 1``.
  Where false positives enter one at a time this is a staircase (sensitivity holds until the next FP
  adds nothing), and at ``x`` equal to a vertex's FP rate it is the best sensitivity reached there.
  Before the first false positive, sensitivity holds at the value reached with zero FPs; beyond the
  curve's end the last sensitivity holds.
* **CPM** = mean sensitivity at the FP rates (1/8, 1/4, 1/2, 1, 2, 4, 8 per scan).
* With no GT lesions at all, sensitivity and CPM are undefined (NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.contracts import OperatingPoint


@dataclass(frozen=True)
class FrocCurve:
    """FROC curve vertices in decreasing threshold order (first vertex: ``(+inf, 0, 0)``).

    Attributes:
        thresholds: ``(K,)`` score thresholds (``+inf`` then every distinct score, decreasing).
        tp: ``(K,)`` detected lesions at each threshold.
        fp: ``(K,)`` false-positive candidates at each threshold.
        fps_per_scan: ``(K,)`` ``fp / n_scans``.
        sensitivity: ``(K,)`` ``tp / n_lesions`` (NaN when ``n_lesions == 0``).
        n_lesions, n_scans: totals.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    n_lesions: int
    n_scans: int


def froc_curve(lesion_scores: np.ndarray, fp_scores: np.ndarray, n_scans: int,
               n_lesions: int | None = None) -> FrocCurve:
    """FROC curve over all thresholds.

    Args:
        lesion_scores: ``(M,)`` best hitting score of every GT lesion of every scan, NaN when missed.
        fp_scores: ``(F,)`` scores of every false-positive candidate of every scan.
        n_scans: number of scans (including those without lesions or candidates).
        n_lesions: lesion count (default ``len(lesion_scores)``).

    Returns:
        :class:`FrocCurve`.

    Example:
        >>> c = froc_curve(np.array([0.9, np.nan]), np.array([0.5]), n_scans=2)
        >>> c.fps_per_scan.tolist(), c.sensitivity.tolist()
        ([0.0, 0.0, 0.5], [0.0, 0.5, 0.5])
    """
    if n_scans <= 0:
        raise ValueError("FROC needs at least one scan")
    lesion_scores = np.asarray(lesion_scores, dtype=np.float64).reshape(-1)
    fp_scores = np.asarray(fp_scores, dtype=np.float64).reshape(-1)
    n_lesions = int(lesion_scores.size if n_lesions is None else n_lesions)
    tp_s = np.sort(lesion_scores[~np.isnan(lesion_scores)])
    fp_s = np.sort(fp_scores)
    thr = np.unique(np.concatenate([tp_s, fp_s]))[::-1]
    tp = np.concatenate([[0], tp_s.size - np.searchsorted(tp_s, thr, side="left")]).astype(np.int64)
    fp = np.concatenate([[0], fp_s.size - np.searchsorted(fp_s, thr, side="left")]).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / n_lesions if n_lesions else np.full(tp.shape, np.nan)
    return FrocCurve(np.concatenate([[np.inf], thr]), tp, fp, fp / n_scans, sens, n_lesions, n_scans)


def froc_corners(curve: FrocCurve) -> np.ndarray:
    """Indices ``(K',)`` of the curve's corners: every vertex except those strictly inside a run of
    vertices with equal TP count (horizontal) or equal FP count (vertical).

    A vertex inside such a run lies on the straight segment between its neighbours, so the corners
    give the same polyline: :func:`interpolate_sensitivity` on them equals the full curve's reading at
    every FP rate, bit for bit (on a horizontal run the interpolated difference is exactly 0; on a
    vertical one the last vertex of the run is kept). Why: a noise-only map gives one vertex per false
    positive (~10^4 per scan) and writing them all dominated the report time. The first (``+inf``) and
    last vertices are always kept. Counts, not the float rates, decide equality (NaN sensitivity when
    there are no lesions is one horizontal run).

    Example:
        >>> c = froc_curve(np.array([0.9, np.nan]), np.array([0.5, 0.4, 0.3]), n_scans=1)
        >>> c.fp.tolist(), froc_corners(c).tolist()
        ([0, 0, 1, 2, 3], [0, 1, 4])
    """
    tp, fp = np.asarray(curve.tp), np.asarray(curve.fp)
    k = tp.size
    if k <= 2:
        return np.arange(k)
    inner = ((tp[:-2] == tp[1:-1]) & (tp[1:-1] == tp[2:])) | ((fp[:-2] == fp[1:-1]) & (fp[1:-1] == fp[2:]))
    return np.flatnonzero(np.r_[True, ~inner, True])


def interpolate_sensitivity(fps_per_scan: np.ndarray, sensitivity: np.ndarray,
                            at: Sequence[float] | np.ndarray) -> np.ndarray:
    """Read a FROC polyline at FP rates ``at`` (= ``np.interp`` on the full, non-decreasing curve).

    ``j`` = last vertex with ``fps <= x``; linear interpolation between vertices ``j`` and ``j + 1``
    (``fps[j + 1] > x``); beyond the last vertex the last sensitivity holds. Written out rather than
    relying on ``np.interp``, whose result with repeated x values is not documented.
    """
    fps = np.asarray(fps_per_scan, dtype=np.float64)
    sens = np.asarray(sensitivity, dtype=np.float64)
    x = np.asarray(at, dtype=np.float64)
    j = np.searchsorted(fps, x, side="right") - 1
    if np.any(j < 0):
        raise ValueError("FP rates below the curve's first vertex")
    last = j >= fps.size - 1
    jj = np.minimum(j, fps.size - 2) if fps.size > 1 else j
    out = np.empty_like(x)
    out[last] = sens[-1]
    if np.any(~last):
        j0, j1 = jj[~last], jj[~last] + 1
        t = (x[~last] - fps[j0]) / (fps[j1] - fps[j0])
        out[~last] = sens[j0] + t * (sens[j1] - sens[j0])
    return out


def sensitivity_at(curve: FrocCurve, fp_rates: Sequence[float]) -> np.ndarray:
    """Sensitivity read off the curve at each FP rate (see :func:`interpolate_sensitivity`)."""
    if curve.n_lesions == 0:
        return np.full(len(fp_rates), np.nan)
    return interpolate_sensitivity(curve.fps_per_scan, curve.sensitivity, fp_rates)


def cpm(curve: FrocCurve, fp_rates: Sequence[float] = (0.125, 0.25, 0.5, 1, 2, 4, 8)) -> float:
    """Competition performance metric: mean sensitivity at ``fp_rates`` FPs per scan (NaN without lesions)."""
    return float(np.mean(sensitivity_at(curve, fp_rates)))


def fp_rate_key(rate: float) -> str:
    """JSON key of an FP rate: 0.125 -> "0.125", 1.0 -> "1"."""
    return f"{rate:g}"


def operating_points(curve: FrocCurve, targets: Sequence[float]) -> list[OperatingPoint]:
    """For each target FP rate, the lowest threshold (most sensitive) with ``fps_per_scan <= target``.

    ``precision`` = detected lesions / (detected lesions + false-positive candidates) (lesion level;
    NaN when both are 0). ``threshold`` keeps candidates with ``score >= threshold``; when even the top
    score gives too many FPs it is just above the top score (nothing kept), ``inf`` with no candidates.
    """
    out = []
    for target in targets:
        j = int(np.searchsorted(curve.fps_per_scan, target * (1 + 1e-12), side="right") - 1)
        thr = float(curve.thresholds[j])
        if j == 0 and curve.thresholds.size > 1:
            thr = float(np.nextafter(curve.thresholds[1], np.inf))
        tp, fp = int(curve.tp[j]), int(curve.fp[j])
        precision = tp / (tp + fp) if tp + fp else float("nan")
        out.append(OperatingPoint(target_fp_rate=float(target), threshold=thr,
                                  fps_per_scan=float(curve.fps_per_scan[j]),
                                  sensitivity=float(curve.sensitivity[j]), precision=precision, tp=tp, fp=fp))
    return out


@dataclass(frozen=True)
class FrocSummary:
    """What both the evaluation and the training validation report from the pooled scores."""

    curve: FrocCurve
    fp_rates: tuple[float, ...]
    sensitivity_at_fp: np.ndarray  # (R,) at ``fp_rates``
    cpm: float  # mean of ``sensitivity_at_fp``; NaN without lesions
    operating_points: list[OperatingPoint]  # at ``fp_rates``
    operating_point: OperatingPoint  # at the operating FP rate


def summarize_scores(lesion_scores: np.ndarray, fp_scores: np.ndarray, n_scans: int,
                     fp_rates: Sequence[float], operating_fp_rate: float) -> FrocSummary:
    """The FROC curve, the sensitivities and CPM at ``fp_rates`` and the operating points, from every scan's
    lesion scores ``(M,)`` (NaN: missed) and false-positive scores ``(F,)`` pooled in scan order (pure)."""
    rates = tuple(float(r) for r in fp_rates)
    curve = froc_curve(lesion_scores, fp_scores, n_scans=n_scans)
    sens = sensitivity_at(curve, rates)
    targets = tuple(sorted(set(rates) | {float(operating_fp_rate)}))
    ops = operating_points(curve, targets)
    op = next(o for o in ops if o.target_fp_rate == float(operating_fp_rate))
    return FrocSummary(curve, rates, sens, float(np.mean(sens)), [o for o in ops if o.target_fp_rate in rates], op)


# --------------------------------------------------------------------------------------------------
# size buckets


def size_bucket_names(edges_mm: Sequence[float]) -> list[str]:
    """Names of the buckets cut by ``edges_mm``: (5, 10) -> ["<5mm", "5-10mm", ">=10mm"].

    Buckets are left-closed: a lesion of exactly 5 mm falls in "5-10mm".
    """
    e = [f"{x:g}" for x in edges_mm]
    if not e:
        return ["all"]
    return [f"<{e[0]}mm"] + [f"{a}-{b}mm" for a, b in zip(e[:-1], e[1:])] + [f">={e[-1]}mm"]


def size_bucket(diameter_mm: np.ndarray, edges_mm: Sequence[float]) -> np.ndarray:
    """Bucket index of each equivalent diameter (mm), ``searchsorted(edges, d, side="right")``."""
    return np.searchsorted(np.asarray(edges_mm, dtype=np.float64), np.asarray(diameter_mm), side="right")


def sensitivity_by_size(lesion_scores: np.ndarray, diameters_mm: np.ndarray, fp_scores: np.ndarray,
                        n_scans: int, edges_mm: Sequence[float], fp_rates: Sequence[float],
                        operating_threshold: float | None = None) -> dict[str, dict]:
    """Per size bucket: lesion count, detections, sensitivity, sensitivity at FP rates and CPM.

    False positives cannot be given a lesion size, so each bucket's FROC uses all false positives and
    only that bucket's lesions. ``sensitivity`` is the fraction detected at any threshold;
    ``sensitivity_at_operating_point`` the fraction with score >= ``operating_threshold``.
    """
    lesion_scores = np.asarray(lesion_scores, dtype=np.float64)
    bucket = size_bucket(diameters_mm, edges_mm)
    out: dict[str, dict] = {}
    for b, name in enumerate(size_bucket_names(edges_mm)):
        s = lesion_scores[bucket == b]
        curve = froc_curve(s, fp_scores, n_scans)
        sens = sensitivity_at(curve, fp_rates)
        detected = int(np.count_nonzero(~np.isnan(s)))
        entry = {
            "lesions": int(s.size),
            "detected": detected,
            "sensitivity": detected / s.size if s.size else float("nan"),
            "sensitivity_at_fp": {fp_rate_key(r): float(v) for r, v in zip(fp_rates, sens)},
            "cpm": float(np.mean(sens)) if s.size else float("nan"),
        }
        if operating_threshold is not None:
            hit = np.count_nonzero(s >= operating_threshold)  # NaN compares False
            entry["sensitivity_at_operating_point"] = hit / s.size if s.size else float("nan")
        out[name] = entry
    return out


# --------------------------------------------------------------------------------------------------
# bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    """Bootstrap replicates over scans.

    Attributes:
        cpm: ``(B,)`` CPM per replicate (NaN when a replicate holds no lesion).
        sensitivity: ``(B, R)`` sensitivity at each FP rate.
        grid_fps: ``(G,)`` FP rates of the band grid; ``grid_sensitivity``: ``(B, G)``.
    """

    cpm: np.ndarray
    sensitivity: np.ndarray
    grid_fps: np.ndarray
    grid_sensitivity: np.ndarray

    def ci95(self) -> tuple[tuple[float, float], np.ndarray, np.ndarray]:
        """(CPM (2.5, 97.5) percentiles, ``(R, 2)`` per FP rate, ``(G, 2)`` band on the grid)."""
        def pct(a: np.ndarray) -> np.ndarray:
            if a.size == 0 or np.all(np.isnan(a)):
                return np.full((2,) + a.shape[1:], np.nan)
            return np.nanpercentile(a, [2.5, 97.5], axis=0)

        c = pct(self.cpm)
        return (float(c[0]), float(c[1])), pct(self.sensitivity).T, pct(self.grid_sensitivity).T


def bootstrap_froc(per_scan: Sequence[tuple[np.ndarray, np.ndarray]], fp_rates: Sequence[float],
                   n_boot: int, seed: int = 0, grid_fps: np.ndarray | None = None) -> BootstrapResult:
    """Resample scans with replacement ``n_boot`` times and recompute the FROC readings.

    A scan's lesions and false positives move together. Each replicate draws ``n_scans`` scan indices
    with ``np.random.default_rng(seed).integers``; the curve is the one of :func:`froc_curve` on the
    resampled set (a scan drawn k times counts k times), read with :func:`interpolate_sensitivity`.

    Args:
        per_scan: per scan, ``(lesion_scores (M_s,) NaN = missed, fp_scores (F_s,))``.
        fp_rates: FP rates for CPM.
        n_boot: number of replicates (0: empty result).
        seed: RNG seed.
        grid_fps: extra FP rates to read (for a confidence band in plots).
    """
    n = len(per_scan)
    rates = np.asarray(fp_rates, dtype=np.float64)
    grid = np.zeros(0) if grid_fps is None else np.asarray(grid_fps, dtype=np.float64)
    if n_boot <= 0 or n == 0:
        return BootstrapResult(np.zeros(0), np.zeros((0, rates.size)), grid, np.zeros((0, grid.size)))
    # pool every scoring item once, sorted by score descending, with its scan and kind
    scores, is_tp, scan_of, lesions_per_scan = [], [], [], np.zeros(n, np.int64)
    for s, (ls, fs) in enumerate(per_scan):
        ls = np.asarray(ls, dtype=np.float64).reshape(-1)
        fs = np.asarray(fs, dtype=np.float64).reshape(-1)
        lesions_per_scan[s] = ls.size
        hit = ls[~np.isnan(ls)]
        scores += [hit, fs]
        is_tp += [np.ones(hit.size, bool), np.zeros(fs.size, bool)]
        scan_of += [np.full(hit.size + fs.size, s)]
    score = np.concatenate(scores) if scores else np.zeros(0)
    tp_item = np.concatenate(is_tp) if is_tp else np.zeros(0, bool)
    scan_item = np.concatenate(scan_of) if scan_of else np.zeros(0, np.int64)
    order = np.argsort(-score, kind="stable")
    score, tp_item, scan_item = score[order], tp_item[order], scan_item[order]
    # the last item of each group of equal scores closes a threshold
    group_end = np.flatnonzero(np.r_[score[1:] != score[:-1], True]) if score.size else np.zeros(0, np.int64)
    at = np.concatenate([rates, grid])
    # A reading at x needs only the vertices up to the first one with fps > x, so a replicate whose curve
    # passes max(at) within a prefix of the items reads the same off that prefix (exact; a replicate that
    # does not is redone on all items). The prefix holds ~4x the FPs needed unweighted: with a noisy map
    # of 10^5 candidates this skips most of the cumulative sums.
    short = group_end
    if group_end.size:
        fp_unweighted = np.cumsum(~tp_item)[group_end]
        short = group_end[:int(np.searchsorted(fp_unweighted, 4.0 * at.max() * n, side="right")) + 1]
    rng = np.random.default_rng(seed)
    out = np.full((n_boot, at.size), np.nan)
    for b in range(n_boot):
        w = np.bincount(rng.integers(0, n, size=n), minlength=n)
        n_les = int(w @ lesions_per_scan)
        if n_les == 0:
            continue
        for ends in ((short, group_end) if short.size < group_end.size else (group_end,)):
            stop = int(ends[-1]) + 1 if ends.size else 0
            wi = w[scan_item[:stop]]
            tp = np.concatenate([[0], np.cumsum(wi * tp_item[:stop])[ends]])
            fp = np.concatenate([[0], np.cumsum(wi * ~tp_item[:stop])[ends]])
            if ends is group_end or fp[-1] / n > at.max():
                break
        out[b] = interpolate_sensitivity(fp / n, tp / n_les, at)
    sens = out[:, : rates.size]
    return BootstrapResult(np.mean(sens, axis=1), sens, grid, out[:, rates.size:])
