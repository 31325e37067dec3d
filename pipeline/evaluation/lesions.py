"""Lesion candidates, ground-truth lesions and per-scan matching (pure functions, no file I/O).

Conventions (the LUNA16 ones, see also :mod:`pipeline.evaluation`):

* **Candidates** (static extraction) are the 26-connected components of
  ``probability >= extraction_threshold``, each scored by its maximum probability (``score="max"``) or
  its mean probability (``"mean"``); with dynamic extraction, PI-CAI's peak-relative candidates
  (:mod:`pipeline.evaluation.candidates`), scored by their peak. A label or binary prediction map gives
  one candidate per 26-connected component of its lesion voxels, score 1.0, in either mode.
* **GT lesions** are the 26-connected components of the lesion label (``label == lesion_label``, or any
  nonzero label when ``lesion_label`` is None).
* **Hit** (``hit_criterion``):
    - ``"iou"``: IoU(candidate mask, lesion mask) >= ``iou_threshold`` (inclusive; 1e-12 slack for
      float rounding so that e.g. 3/30 counts as 0.1);
    - ``"peak"``: the candidate's maximum-probability voxel lies inside the lesion (first voxel in C
      order on ties);
    - ``"distance"``: the candidate centroid lies strictly closer to the lesion centroid than the
      lesion's equivalent radius (mm, world coordinates) -- LUNA16's ``dist < radius``.
  One candidate may hit several lesions (a candidate spanning two lesions hits both).
* Each GT lesion counts once, with the best score among the candidates that hit it (ties: lowest
  candidate id is recorded as its match). A candidate that hits at least one lesion but is the match of
  none is **ignored** (neither TP nor FP, the LUNA16 rule for extra marks on a found nodule). Candidates
  that hit nothing are **false positives**. Scans without lesions contribute only false positives.
* GT lesions smaller than ``min_lesion_mm3`` (default 0: none) are **excluded** from the count, and a
  candidate that would be a false positive but touches one is ignored -- as the BraTS 2023+ lesion-wise
  metrics leave out lesions below a volume threshold (50 voxels for gliomas), so that one-voxel label
  fragments do not dominate a lesion count.
* At most ``max_candidates_per_scan`` candidates are kept per scan (the highest-scoring; ties by id);
  the others are dropped entirely (a warning names the scan).

Everything per component is computed in one pass over the foreground voxels (``np.bincount`` on label
images, a sparse joint histogram for intersections), never with one whole-volume operation per
component: a noisy map can have tens of thousands of components.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np

from pipeline.evaluation.candidates import DynamicExtraction, dynamic_candidates

FP, TP, IGNORED = 0, 1, 2
CANDIDATE_OUTCOMES = {FP: "fp", TP: "tp", IGNORED: "ignored"}
_IOU_SLACK = 1e-12


@dataclass(frozen=True)
class ComponentTable:
    """Per-component statistics of one scan, struct-of-arrays; row ``i`` is component id ``i + 1``.

    Attributes:
        voxels: ``(N,)`` voxel counts.
        centroid_vox: ``(N, 3)`` centroid in voxel indices (x, y, z).
        centroid_mm: ``(N, 3)`` centroid in world coordinates (mm; RAS when an affine was given).
        volume_mm3: ``(N,)`` volume = voxels x |det(affine[:3, :3])| (mm^3).
        diameter_mm: ``(N,)`` equivalent diameter ``(6 V / pi) ** (1/3)`` (mm), the sphere of equal volume.
        score: ``(N,)`` candidate score (max or mean probability); NaN for GT lesions.
        peak_vox: ``(N, 3)`` voxel index of the maximum-probability voxel; -1 for GT lesions.
    """

    voxels: np.ndarray
    centroid_vox: np.ndarray
    centroid_mm: np.ndarray
    volume_mm3: np.ndarray
    diameter_mm: np.ndarray
    score: np.ndarray
    peak_vox: np.ndarray

    def __len__(self) -> int:
        return int(self.voxels.shape[0])

    def subset(self, keep: np.ndarray) -> ComponentTable:
        """Rows selected by a boolean mask or index array (ids are renumbered 1..len)."""
        return ComponentTable(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))


@dataclass(frozen=True)
class CaseMatch:
    """Matching result of one scan (what aggregation needs, plus what ``lesions.csv`` shows).

    Attributes:
        scan: scan name.
        lesions: GT lesion table (M rows; ids 1..M).
        candidates: kept candidate table (N rows; ids 1..N).
        lesion_score: ``(M,)`` best score among the candidates hitting each lesion; NaN if missed.
        lesion_match: ``(M,)`` id of that best candidate (1-based); 0 if missed.
        lesion_iou: ``(M,)`` IoU between each lesion and its matched candidate (0 if missed).
        candidate_outcome: ``(N,)`` ``TP`` (1), ``FP`` (0) or ``IGNORED`` (2).
        pairs: ``(P, 2)`` (candidate id, lesion id) of every hit, 1-based.
        pair_iou: ``(P,)`` IoU of each hit pair.
        n_dropped: candidates dropped by the ``max_candidates_per_scan`` cap.
        n_excluded: GT lesions left out for being smaller than ``min_lesion_mm3``.
    """

    scan: str
    lesions: ComponentTable
    candidates: ComponentTable
    lesion_score: np.ndarray
    lesion_match: np.ndarray
    lesion_iou: np.ndarray
    candidate_outcome: np.ndarray
    pairs: np.ndarray
    pair_iou: np.ndarray
    n_dropped: int = 0
    n_excluded: int = 0

    @property
    def n_lesions(self) -> int:
        return len(self.lesions)

    @property
    def fp_scores(self) -> np.ndarray:
        """Scores of the false-positive candidates, ``(K,)``."""
        return self.candidates.score[self.candidate_outcome == FP]

    def records(self) -> list[tuple[int, float, float]]:
        """picai_eval-style records ``(is_lesion, confidence, overlap)``.

        One per GT lesion (confidence 0.0 when missed) and one per false-positive candidate
        (overlap 0.0); ignored candidates do not appear.
        """
        out = [
            (1, 0.0 if np.isnan(s) else float(s), float(o))
            for s, o in zip(self.lesion_score, self.lesion_iou)
        ]
        out += [(0, float(s), 0.0) for s in self.fp_scores]
        return out


# --------------------------------------------------------------------------------------------------
# input conventions


def check_affine(affine) -> np.ndarray:
    """The 4x4 voxel-to-world affine (mm) as float64; anything else (e.g. a bare spacing, which would
    leave the origin and direction unknown) is refused: build one with :func:`pipeline.io.volume.make_affine`."""
    arr = np.asarray(affine, dtype=np.float64)
    if arr.shape != (4, 4):
        raise ValueError(f"expected a 4x4 voxel-to-world affine (mm), got shape {arr.shape} "
                         "(for a spacing use pipeline.io.volume.make_affine(spacing_mm))")
    if not np.all(np.isfinite(arr)) or abs(np.linalg.det(arr[:3, :3])) == 0:
        raise ValueError(f"the affine must be finite with a non-singular 3x3 part, got {arr.tolist()}")
    return arr


def _is_integral(a: np.ndarray) -> bool:
    return bool(np.all(np.equal(np.mod(a, 1), 0)))


def lesion_score_map(pred: np.ndarray, lesion_label: int | None = None) -> tuple[np.ndarray, bool]:
    """Apply the prediction input conventions; return ``(map (X, Y, Z), is_label_map)``.

    * bool / integer ``(X, Y, Z)``: a label map; the result is the boolean lesion mask
      (``pred == lesion_label``, or ``pred != 0`` when ``lesion_label`` is None), ``is_label_map=True``.
    * float ``(X, Y, Z)``: the lesion probability (values in [0, 1]). A float map whose values are all
      integers is read as a label map when its maximum exceeds 1 or ``lesion_label`` is not None/1
      (a 0/1 float map gives the same candidates either way).
    * ``(C, X, Y, Z)``, C > 1: per-class probabilities; the lesion probability is channel
      ``lesion_label``, or ``1 - p(channel 0)`` (= the sum of channels 1..C-1) when it is None.
      ``(1, X, Y, Z)`` is treated as ``(X, Y, Z)``.

    Raises:
        ValueError: unsupported shape, negative values, a channel index out of range, or a float map
            that is neither a probability nor a label map.
    """
    pred = np.asarray(pred)
    if pred.ndim == 4 and pred.shape[0] == 1:
        pred = pred[0]
    if pred.ndim == 4:
        n_ch = pred.shape[0]
        if pred.dtype.kind not in "f":
            raise ValueError(f"a multi-channel prediction {pred.shape} must hold float probabilities")
        if lesion_label is None:
            prob = 1.0 - pred[0].astype(np.float32)
            np.clip(prob, 0.0, 1.0, out=prob)
            return prob, False
        if not 0 < lesion_label < n_ch:
            raise ValueError(f"lesion label {lesion_label} has no channel in a {n_ch}-channel prediction")
        return np.ascontiguousarray(pred[lesion_label]), False
    if pred.ndim != 3:
        raise ValueError(f"prediction must be (X, Y, Z) or (C, X, Y, Z), got shape {pred.shape}")
    if pred.dtype == bool or pred.dtype.kind in "iu":
        mask = pred != 0 if lesion_label is None else pred == lesion_label
        return mask, True
    if pred.dtype.kind != "f":
        raise ValueError(f"unsupported prediction dtype {pred.dtype}")
    if pred.size == 0:
        return np.zeros(pred.shape, bool), True
    lo, hi = float(pred.min()), float(pred.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("prediction holds NaN or infinite values")
    if lo < 0:
        raise ValueError(f"prediction has negative values (min {lo:g}); expected probabilities or labels")
    if hi > 1 or lesion_label not in (None, 1):
        if _is_integral(pred):
            mask = pred != 0 if lesion_label is None else pred == lesion_label
            return mask, True
        if hi > 1:
            raise ValueError(f"prediction values reach {hi:g} but are not integers: neither a probability "
                             "map (values in [0, 1]) nor a label map")
    return pred, False


def lesion_mask_from_labels(label: np.ndarray, lesion_label: int | None = None) -> np.ndarray:
    """Boolean lesion mask ``(X, Y, Z)`` from a label map (``== lesion_label``, or any nonzero)."""
    label = np.asarray(label)
    if label.ndim == 4 and label.shape[0] == 1:
        label = label[0]
    if label.ndim != 3:
        raise ValueError(f"label map must be (X, Y, Z), got shape {label.shape}")
    if label.dtype.kind == "f" and not _is_integral(label):
        raise ValueError("label map holds non-integer values")
    return label != 0 if lesion_label is None else label == lesion_label


# --------------------------------------------------------------------------------------------------
# components


def _connected(mask: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """26-connected labelling; returns (label image, n, foreground flat indices, their labels)."""
    import cc3d

    mask = np.ascontiguousarray(mask, dtype=bool)
    labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    idx = np.flatnonzero(mask)  # ~15x faster on the bool mask than on the uint32 label image
    return labels, int(n), idx, labels.reshape(-1)[idx].astype(np.intp)


def _component_table(shape: tuple[int, ...], n: int, idx: np.ndarray, lab: np.ndarray, affine: np.ndarray,
                     values: np.ndarray | None = None, score: str = "max") -> ComponentTable:
    """Statistics of components 1..n from the foreground voxels (``idx`` flat C-order, ``lab`` ids)."""
    counts = np.bincount(lab, minlength=n + 1)[1:].astype(np.int64)
    coords = np.unravel_index(idx, shape)
    safe = np.maximum(counts, 1)
    centroid = np.stack([np.bincount(lab, weights=c, minlength=n + 1)[1:] / safe for c in coords], axis=1) \
        if n else np.zeros((0, 3))
    centroid_mm = centroid @ affine[:3, :3].T + affine[:3, 3]
    volume = counts * abs(float(np.linalg.det(affine[:3, :3])))
    diameter = np.cbrt(6.0 * volume / np.pi)
    peak = np.full((n, 3), -1, dtype=np.int64)
    if values is None:
        scores = np.full(n, np.nan)
    else:
        vals = values.reshape(-1)[idx].astype(np.float64)
        mx = np.full(n + 1, -np.inf)
        np.maximum.at(mx, lab, vals)
        if score == "max":
            scores = mx[1:]
        elif score == "mean":
            scores = np.bincount(lab, weights=vals, minlength=n + 1)[1:] / safe
        else:
            raise ValueError(f"unknown score {score!r} (use 'max' or 'mean')")
        # peak voxel: the first (C-order) foreground voxel whose value equals its component's maximum
        at_max = vals == mx[lab]
        ids, first = np.unique(lab[at_max], return_index=True)
        peak[ids - 1] = np.stack(np.unravel_index(idx[at_max][first], shape), axis=1)
    return ComponentTable(counts, centroid, centroid_mm, volume, diameter, scores, peak)


def extract_candidates(score_map: np.ndarray, threshold: float, affine, score: str = "max",
                       is_label_map: bool = False,
                       dynamic: DynamicExtraction | None = None) -> tuple[np.ndarray, ComponentTable]:
    """Candidates of one scan: static (components at a fixed level) or dynamic (grown from each peak).

    * static (``dynamic`` None): the 26-connected components of ``score_map >= threshold``, scored by
      their max or mean probability;
    * dynamic: PI-CAI's peak-relative candidates (:func:`pipeline.evaluation.candidates.dynamic_candidates`,
      ``extract_lesion_candidates(..., threshold="dynamic")`` voxel for voxel), scored by their (rounded)
      peak; the reference's 0-confidence whole-volume candidate (every component too small) is dropped,
      as it is invisible in PI-CAI's detection map.

    Args:
        score_map: ``(X, Y, Z)`` lesion probability, or a boolean lesion mask when ``is_label_map``.
        threshold: static extraction threshold (probability; unused by dynamic and label maps).
        affine: 4x4 voxel-to-world affine (mm).
        score: ``"max"`` or ``"mean"`` probability over the component's voxels (static only).
        is_label_map: every component of the mask is a candidate with score 1.0 (either mode).
        dynamic: the peak-relative extraction's parameters, or None for static.

    Returns:
        (label image ``(X, Y, Z)`` with ids 1..N, :class:`ComponentTable` of N candidates)
    """
    affine = check_affine(affine)
    if is_label_map:
        mask = np.asarray(score_map, dtype=bool)
        labels, n, idx, lab = _connected(mask)
        table = _component_table(mask.shape, n, idx, lab, affine, values=mask, score="max")
        return labels, table
    score_map = np.ascontiguousarray(score_map)
    if dynamic is None:
        labels, n, idx, lab = _connected(score_map >= threshold)
        return labels, _component_table(score_map.shape, n, idx, lab, affine, values=score_map, score=score)
    labels, scores = dynamic_candidates(score_map, dynamic)
    if scores.size and not np.all(scores > 0):
        labels = np.zeros(labels.shape, labels.dtype)  # only the whole-volume 0-confidence one can be 0
        scores = scores[:0]
    idx = np.flatnonzero(labels != 0)  # ~4x faster than flatnonzero on the int32 labels
    lab = labels.reshape(-1)[idx].astype(np.intp)
    table = _component_table(score_map.shape, scores.size, idx, lab, affine, values=score_map, score="max")
    return labels, replace(table, score=scores.copy())


def extract_lesions(lesion_mask: np.ndarray, affine) -> tuple[np.ndarray, ComponentTable]:
    """GT lesions: 26-connected components of a boolean lesion mask ``(X, Y, Z)``."""
    affine = check_affine(affine)
    labels, n, idx, lab = _connected(lesion_mask)
    return labels, _component_table(lesion_mask.shape, n, idx, lab, affine)


# --------------------------------------------------------------------------------------------------
# matching


def _intersections(cand_labels: np.ndarray, gt_labels: np.ndarray, n_gt: int,
                   gt_mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sparse joint histogram: (candidate id, lesion id, intersecting voxels) for every overlapping pair."""
    gflat = gt_labels.reshape(-1)
    gidx = np.flatnonzero(np.ascontiguousarray(gt_mask, dtype=bool))
    c = cand_labels.reshape(-1)[gidx].astype(np.int64)
    sel = c > 0
    codes = c[sel] * (n_gt + 1) + gflat[gidx][sel].astype(np.int64)
    uniq, inter = np.unique(codes, return_counts=True)
    return uniq // (n_gt + 1), uniq % (n_gt + 1), inter


def hit_pairs(criterion: str, candidates: ComponentTable, lesions: ComponentTable, inter_c: np.ndarray,
              inter_g: np.ndarray, inter_n: np.ndarray, gt_labels: np.ndarray,
              iou_threshold: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(candidate ids, lesion ids), 1-based, of every hitting pair under ``criterion``.

    ``inter_*`` is the sparse intersection table of the kept candidates (ids 1..N) and the lesions.
    """
    if len(candidates) == 0 or len(lesions) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if criterion == "iou":
        union = candidates.voxels[inter_c - 1] + lesions.voxels[inter_g - 1] - inter_n
        hit = inter_n / union >= iou_threshold - _IOU_SLACK
        return inter_c[hit], inter_g[hit]
    if criterion == "peak":
        pk = candidates.peak_vox
        g = gt_labels[pk[:, 0], pk[:, 1], pk[:, 2]].astype(np.int64)
        c = np.flatnonzero(g) + 1
        return c, g[c - 1]
    if criterion == "distance":
        from scipy.spatial import cKDTree

        tree = cKDTree(candidates.centroid_mm)
        radius = lesions.diameter_mm / 2.0
        # query_ball_point is inclusive (<= r); LUNA16 uses dist < r, so shrink r by one ulp
        hits = tree.query_ball_point(lesions.centroid_mm, r=np.nextafter(radius, 0))
        g = np.repeat(np.arange(1, len(lesions) + 1), [len(h) for h in hits])
        c = np.asarray([i for h in hits for i in h], dtype=np.int64) + 1
        order = np.lexsort((g, c))
        return c[order], g[order]
    raise ValueError(f"unknown hit criterion {criterion!r} (use 'iou', 'peak' or 'distance')")


def resolve_hits(scores: np.ndarray, n_lesions: int, pair_c: np.ndarray,
                 pair_g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LUNA16 resolution of hits into lesion scores and candidate outcomes.

    Args:
        scores: ``(N,)`` candidate scores.
        n_lesions: M.
        pair_c, pair_g: 1-based ids of hitting pairs.

    Returns:
        lesion_score ``(M,)`` (max score over hitting candidates, NaN if none),
        lesion_match ``(M,)`` (id of the best candidate, lowest id on ties; 0 if none),
        candidate_outcome ``(N,)``: TP if it is the match of some lesion, IGNORED if it hits only
        lesions matched to other candidates, FP if it hits nothing.
    """
    n = scores.shape[0]
    lesion_score = np.full(n_lesions, np.nan)
    lesion_match = np.zeros(n_lesions, np.int64)
    outcome = np.full(n, FP, dtype=np.int8)
    if pair_c.size:
        # sort pairs by lesion, then score descending, then candidate id: first per lesion is its match
        order = np.lexsort((pair_c, -scores[pair_c - 1], pair_g))
        g_sorted, c_sorted = pair_g[order], pair_c[order]
        first = np.r_[True, g_sorted[1:] != g_sorted[:-1]]
        lesion_match[g_sorted[first] - 1] = c_sorted[first]
        lesion_score[g_sorted[first] - 1] = scores[c_sorted[first] - 1]
        outcome[np.unique(pair_c) - 1] = IGNORED
        outcome[c_sorted[first] - 1] = TP
    return lesion_score, lesion_match, outcome


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` highest scores, ties to the lower index: the same set as
    ``np.argsort(-scores, kind="stable")[:k]``, from one partition instead of a full sort (a noisy map
    has ~10^5 candidates)."""
    scores = np.asarray(scores)
    if k >= scores.size:
        return np.arange(scores.size)
    if np.isnan(scores).any():  # NaN has no place in the partition order; keep the sort's
        return np.sort(np.argsort(-scores, kind="stable")[:k])
    v = np.partition(scores, scores.size - k)[scores.size - k]  # the k-th largest
    above = np.flatnonzero(scores > v)
    ties = np.flatnonzero(scores == v)[:k - above.size]
    return np.union1d(above, ties)


def match_case(scan: str, score_map: np.ndarray, lesion_mask: np.ndarray, affine, *,
               is_label_map: bool = False, extraction_threshold: float = 0.1, score: str = "max",
               hit_criterion: str = "iou", iou_threshold: float = 0.1,
               max_candidates: int | None = None, dynamic: DynamicExtraction | None = None,
               min_lesion_mm3: float = 0.0) -> CaseMatch:
    """Extract candidates and GT lesions of one scan and match them (see the module conventions).

    Args:
        scan: scan name (carried into the records).
        score_map: ``(X, Y, Z)`` lesion probability, or a boolean lesion mask if ``is_label_map``
            (use :func:`lesion_score_map` to apply the input conventions).
        lesion_mask: ``(X, Y, Z)`` boolean GT lesion mask (:func:`lesion_mask_from_labels`).
        affine: 4x4 voxel-to-world affine (mm).
        extraction_threshold, score, hit_criterion, iou_threshold: see the module docstring.
        max_candidates: keep at most this many candidates (highest scores), warn when exceeded.
        dynamic: peak-relative extraction parameters (None: static at ``extraction_threshold``).
        min_lesion_mm3: GT lesions with a volume below this (mm^3) are **excluded**: they are not counted
            (neither hit nor missed), and a candidate that would otherwise be a false positive but overlaps
            an excluded lesion by at least one voxel is ignored. 0 keeps every lesion.

    Returns:
        :class:`CaseMatch` (``lesions`` holds the counted lesions only; ``n_excluded`` the others).
    """
    affine = check_affine(affine)
    if score_map.shape != lesion_mask.shape:
        raise ValueError(f"{scan}: prediction shape {score_map.shape} != label shape {lesion_mask.shape}")
    cand_labels, cands = extract_candidates(score_map, extraction_threshold, affine, score, is_label_map,
                                            dynamic)
    gt_labels, lesions = extract_lesions(lesion_mask, affine)
    n_total, n_dropped = len(cands), 0
    remap = np.arange(n_total + 1)
    if max_candidates is not None and n_total > max_candidates:
        keep = top_k(cands.score, max_candidates)
        n_dropped = n_total - keep.size
        warnings.warn(f"{scan}: {n_total} candidates, keeping the {max_candidates} highest-scoring "
                      f"(max_candidates_per_scan); {n_dropped} dropped", RuntimeWarning, stacklevel=2)
        remap = np.zeros(n_total + 1, np.int64)
        remap[keep + 1] = np.arange(1, keep.size + 1)
        cands = cands.subset(keep)
    ic, ig, inter = _intersections(cand_labels, gt_labels, len(lesions), lesion_mask)
    ic = remap[ic]
    sel = ic > 0
    ic, ig, inter = ic[sel], ig[sel], inter[sel]
    pc, pg = hit_pairs(hit_criterion, cands, lesions, ic, ig, inter, gt_labels, iou_threshold)
    pair_iou = _pair_iou(pc, pg, ic, ig, inter, cands, lesions)
    touches_excluded = np.zeros(0, np.int64)
    n_excluded = 0
    if min_lesion_mm3 > 0 and len(lesions):
        lesions, (pc, pg, pair_iou), touches_excluded, n_excluded = _exclude_small(
            lesions, min_lesion_mm3, (pc, pg, pair_iou), ic, ig)
    lesion_score, lesion_match, outcome = resolve_hits(cands.score, len(lesions), pc, pg)
    if touches_excluded.size:
        fp_touching = touches_excluded[outcome[touches_excluded - 1] == FP]
        outcome[fp_touching - 1] = IGNORED
    lesion_iou = np.zeros(len(lesions))
    is_match = lesion_match[pg - 1] == pc
    lesion_iou[pg[is_match] - 1] = pair_iou[is_match]
    return CaseMatch(scan, lesions, cands, lesion_score, lesion_match, lesion_iou, outcome,
                     np.stack([pc, pg], axis=1).astype(np.int64), pair_iou, n_dropped, n_excluded)


def _exclude_small(lesions: ComponentTable, min_mm3: float, pairs: tuple[np.ndarray, ...], ic: np.ndarray,
                   ig: np.ndarray) -> tuple[ComponentTable, tuple[np.ndarray, ...], np.ndarray, int]:
    """Drop GT lesions below ``min_mm3`` from the table and the hit pairs (lesion ids renumbered 1..kept).

    Returns:
        (kept lesions, (pair candidate ids, pair lesion ids, pair IoU) of kept lesions, ids of the
        candidates overlapping an excluded lesion (1-based, unique), number excluded)
    """
    keep = lesions.volume_mm3 >= min_mm3 * (1 - 1e-9)  # the affine's determinant is not exact (8 -> 7.99..)
    n_excluded = int(np.count_nonzero(~keep))
    if n_excluded == 0:
        return lesions, pairs, np.zeros(0, np.int64), 0
    new_id = np.zeros(len(lesions) + 1, np.int64)
    new_id[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    pc, pg, piou = pairs
    sel = keep[pg - 1]  # pg, ig: int64 ids (empty when nothing overlaps)
    touching = np.unique(ic[~keep[ig - 1]])
    return lesions.subset(keep), (pc[sel], new_id[pg[sel]], piou[sel]), touching.astype(np.int64), n_excluded


def _pair_iou(pc: np.ndarray, pg: np.ndarray, ic: np.ndarray, ig: np.ndarray, inter: np.ndarray,
              cands: ComponentTable, lesions: ComponentTable) -> np.ndarray:
    """IoU of each hit pair, looked up in the sparse intersection table (0 when they do not overlap)."""
    out = np.zeros(pc.shape[0])
    if pc.size == 0 or ic.size == 0:
        return out
    m = len(lesions) + 1
    codes = ic * m + ig  # sorted: np.unique produced them in order
    want = pc * m + pg
    pos = np.clip(np.searchsorted(codes, want), 0, codes.size - 1)
    found = codes[pos] == want
    n = inter[pos[found]]
    out[found] = n / (cands.voxels[pc[found] - 1] + lesions.voxels[pg[found] - 1] - n)
    return out
