"""Candidate extraction and per-scan matching on hand-built scans; the expected answer is in each test."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pipeline.evaluation.lesions import (
    FP,
    IGNORED,
    TP,
    extract_candidates,
    extract_lesions,
    lesion_mask_from_labels,
    lesion_score_map,
    match_case,
)

S = (20, 20, 20)


def box(lo, hi, value=1.0, out=None, dtype=np.float32):
    """``out`` (or a new 20^3 volume) with ``value`` in the half-open box [lo, hi)."""
    a = np.zeros(S, dtype) if out is None else out
    a[tuple(slice(x, y) for x, y in zip(lo, hi))] = value
    return a


def run(prob, gt, **kw):
    return match_case("scan", prob, gt.astype(bool), np.eye(4), **kw)


def test_perfect_prediction_hits_every_lesion_with_no_fp():
    gt = box((2, 2, 2), (6, 6, 6), dtype=bool)
    box((10, 10, 10), (14, 16, 12), out=gt)
    prob = box((2, 2, 2), (6, 6, 6), 0.9)
    box((10, 10, 10), (14, 16, 12), 0.7, out=prob)
    m = run(prob, gt)
    assert m.n_lesions == 2 and len(m.candidates) == 2
    np.testing.assert_allclose(m.lesion_score, [0.9, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(m.lesion_match, [1, 2])
    np.testing.assert_array_equal(m.lesion_iou, [1.0, 1.0])
    np.testing.assert_array_equal(m.candidate_outcome, [TP, TP])
    assert m.fp_scores.size == 0
    assert m.records() == [(1, pytest.approx(0.9), 1.0), (1, pytest.approx(0.7), 1.0)]


def test_only_false_positives_on_a_scan_without_lesions():
    prob = box((1, 1, 1), (3, 3, 3), 0.8)
    box((10, 10, 10), (12, 12, 12), 0.3, out=prob)
    m = run(prob, np.zeros(S, bool))
    assert m.n_lesions == 0
    np.testing.assert_allclose(np.sort(m.fp_scores), [0.3, 0.8], rtol=1e-6)
    assert [r[0] for r in m.records()] == [0, 0]


def test_two_candidates_on_one_lesion_best_counts_other_ignored():
    gt = box((2, 2, 2), (12, 6, 6), dtype=bool)  # 10 x 4 x 4 = 160 voxels
    prob = box((2, 2, 2), (6, 6, 6), 0.6)  # 64 voxels: IoU 0.4
    box((8, 2, 2), (12, 6, 6), 0.9, out=prob)  # x = 6, 7 empty: a separate component, IoU 0.4
    m = run(prob, gt)
    assert len(m.candidates) == 2
    np.testing.assert_allclose(m.lesion_score, [0.9], rtol=1e-6)
    assert m.lesion_match[0] == 2  # the 0.9 candidate (second in raster order along x)
    np.testing.assert_array_equal(m.candidate_outcome, [IGNORED, TP])
    assert m.fp_scores.size == 0  # the 0.6 candidate is ignored, not a false positive


def test_one_candidate_spanning_two_lesions_hits_both():
    gt = box((2, 2, 2), (6, 6, 6), dtype=bool)
    box((8, 2, 2), (12, 6, 6), out=gt)  # two lesions of 64 voxels, gap at x = 6, 7
    prob = box((2, 2, 2), (12, 6, 6), 0.8)  # one candidate of 160 voxels: IoU 64/160 = 0.4 with each
    m = run(prob, gt)
    assert m.n_lesions == 2 and len(m.candidates) == 1
    np.testing.assert_allclose(m.lesion_score, [0.8, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(m.lesion_match, [1, 1])
    np.testing.assert_allclose(m.lesion_iou, [0.4, 0.4])
    np.testing.assert_array_equal(m.pairs, [[1, 1], [1, 2]])
    np.testing.assert_array_equal(m.candidate_outcome, [TP])


def test_lesion_touching_the_volume_border():
    gt = box((0, 0, 17), (3, 4, 20), dtype=bool)  # touches three faces
    prob = box((0, 0, 18), (3, 4, 20), 0.95)  # 24 of its 36 voxels: IoU 2/3
    m = run(prob, gt)
    assert m.lesion_score[0] == pytest.approx(0.95)
    np.testing.assert_allclose(m.lesion_iou, [24 / 36])
    np.testing.assert_allclose(m.lesions.centroid_mm[0], [1.0, 1.5, 18.0])
    assert m.lesions.voxels[0] == 36


def test_iou_exactly_at_threshold_hits_and_just_below_misses():
    gt = box((2, 2, 2), (12, 3, 3), dtype=bool)  # a 10-voxel rod
    hit = box((2, 2, 2), (3, 3, 3), 0.5)  # 1 voxel inside: IoU = 1/10 = 0.1 exactly
    m = run(hit, gt, iou_threshold=0.1)
    assert m.lesion_score[0] == pytest.approx(0.5)
    gt30 = box((2, 2, 2), (12, 5, 3), dtype=bool)  # 30 voxels; 3 inside: IoU 3/30
    m = run(box((2, 2, 2), (5, 3, 3), 0.5), gt30)
    assert not np.isnan(m.lesion_score[0])
    # 1 voxel inside and 1 outside (26-connected): IoU = 1 / 11 < 0.1 -> missed, and a false positive
    miss = box((2, 2, 2), (3, 3, 3), 0.5)
    miss[1, 1, 1] = 0.5
    m = run(miss, gt)
    assert np.isnan(m.lesion_score[0]) and m.lesion_match[0] == 0
    np.testing.assert_array_equal(m.candidate_outcome, [FP])


def test_extraction_threshold_is_inclusive_and_26_connected():
    prob = np.zeros(S, np.float32)
    prob[5, 5, 5] = 0.1  # == threshold: a candidate voxel
    prob[6, 6, 6] = 0.4  # diagonal neighbour: same component (26-connectivity)
    prob[9, 9, 9] = 0.0999  # below the threshold
    _, table = extract_candidates(prob, 0.1, np.diag([1.0, 1.0, 2.0, 1.0]))
    assert len(table) == 1
    assert table.voxels[0] == 2
    assert table.score[0] == pytest.approx(0.4)
    np.testing.assert_array_equal(table.peak_vox[0], [6, 6, 6])
    np.testing.assert_allclose(table.centroid_mm[0], [5.5, 5.5, 11.0])
    assert table.volume_mm3[0] == pytest.approx(4.0)
    assert table.diameter_mm[0] == pytest.approx((6 * 4.0 / np.pi) ** (1 / 3))


def test_mean_score():
    prob = box((2, 2, 2), (4, 2 + 1, 2 + 1), 0.2)
    prob[3, 2, 2] = 0.6
    _, table = extract_candidates(prob, 0.1, np.eye(4), score="mean")
    assert table.score[0] == pytest.approx(0.4)


def test_affine_centroid_in_world_mm():
    affine = np.array([[0, -2.0, 0, 10], [1.0, 0, 0, -5], [0, 0, 3.0, 1], [0, 0, 0, 1]])
    gt = box((4, 6, 2), (5, 7, 3), dtype=bool)  # voxel (4, 6, 2)
    _, table = extract_lesions(gt, affine)
    np.testing.assert_allclose(table.centroid_mm[0], [10 - 12, 4 - 5, 6 + 1])
    assert table.volume_mm3[0] == pytest.approx(6.0)


def test_peak_criterion():
    gt = box((2, 2, 2), (5, 5, 5), dtype=bool)  # 27 voxels
    prob = box((4, 4, 4), (12, 12, 12), 0.3)  # IoU 1 / 538: no IoU hit
    prob[4, 4, 4] = 0.9  # the peak lies in the lesion
    assert np.isnan(run(prob, gt).lesion_score[0])
    m = run(prob, gt, hit_criterion="peak")
    assert m.lesion_score[0] == pytest.approx(0.9)
    prob[11, 11, 11] = 0.95  # the peak moves out of the lesion
    assert np.isnan(run(prob, gt, hit_criterion="peak").lesion_score[0])


def test_distance_criterion_is_strict_in_mm():
    gt = box((8, 8, 8), (12, 12, 12), dtype=bool)  # 64 mm^3, radius (3 * 64 / 4 pi)^(1/3) = 2.481 mm
    r = (3 * 64 / (4 * np.pi)) ** (1 / 3)
    near = box((11, 9, 9), (12, 10, 10), 0.5)  # centroid (11, 9, 9), lesion centroid (9.5, 9.5, 9.5)
    d = np.linalg.norm(np.array([11, 9, 9]) - 9.5)
    assert d < r
    assert run(near, gt, hit_criterion="distance").lesion_score[0] == pytest.approx(0.5)
    far = box((13, 9, 9), (14, 10, 10), 0.5)  # centroid 3.6 mm away: a miss although adjacent
    m = run(far, gt, hit_criterion="distance")
    assert np.isnan(m.lesion_score[0]) and m.candidate_outcome.tolist() == [FP]


def test_label_map_prediction_gives_score_one():
    pred = box((2, 2, 2), (5, 5, 5), 2, dtype=np.uint8)
    box((10, 10, 10), (12, 12, 12), 1, out=pred)
    mask, is_label = lesion_score_map(pred, lesion_label=2)
    assert is_label and mask.sum() == 27
    m = match_case("s", mask, box((2, 2, 2), (5, 5, 5), dtype=bool), np.eye(4), is_label_map=True)
    np.testing.assert_array_equal(m.candidates.score, [1.0])
    assert m.lesion_score[0] == 1.0
    mask_any, _ = lesion_score_map(pred, None)
    assert mask_any.sum() == 27 + 8


def test_prediction_conventions():
    prob = box((2, 2, 2), (4, 4, 4), 0.7)
    out, is_label = lesion_score_map(prob, 1)
    assert not is_label and out is prob
    labels_as_float = box((2, 2, 2), (4, 4, 4), 2.0)  # integral floats above 1: a label map
    out, is_label = lesion_score_map(labels_as_float, 2)
    assert is_label and out.sum() == 8
    two_class = np.stack([1 - prob, prob])
    out, is_label = lesion_score_map(two_class, 1)
    assert not is_label and out.max() == pytest.approx(0.7)
    out, _ = lesion_score_map(two_class, None)  # 1 - p(background)
    assert out.max() == pytest.approx(0.7)
    with pytest.raises(ValueError, match="no channel"):
        lesion_score_map(two_class, 2)
    with pytest.raises(ValueError, match="negative"):
        lesion_score_map(-prob, 1)
    with pytest.raises(ValueError, match="not integers"):
        lesion_score_map(prob * 3, 1)
    with pytest.raises(ValueError, match="non-integer"):
        lesion_mask_from_labels(prob, 1)
    gt = box((2, 2, 2), (4, 4, 4), 2, dtype=np.int16)
    assert lesion_mask_from_labels(gt, 1).sum() == 0 and lesion_mask_from_labels(gt, None).sum() == 8


def test_candidate_cap_keeps_highest_scores_and_warns():
    prob = np.zeros(S, np.float32)
    gt = np.zeros(S, bool)
    gt[10, 10, 10] = True
    for i, s in enumerate([0.2, 0.9, 0.5, 0.3]):
        prob[2 + 2 * i, 2, 2] = s  # isolated single-voxel candidates
    prob[10, 10, 10] = 0.4  # the lesion's candidate
    with pytest.warns(RuntimeWarning, match="5 candidates"):
        m = run(prob, gt, max_candidates=3)
    assert m.n_dropped == 2
    np.testing.assert_allclose(np.sort(m.candidates.score), [0.4, 0.5, 0.9], rtol=1e-6)
    assert m.lesion_score[0] == pytest.approx(0.4)
    np.testing.assert_allclose(np.sort(m.fp_scores), [0.5, 0.9], rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(prob, gt, max_candidates=5)


def test_many_components_are_handled_in_one_pass():
    rng = np.random.default_rng(0)
    prob = (rng.random((48, 48, 48)) > 0.97).astype(np.float32) * rng.random((48, 48, 48)).astype(np.float32)
    gt = np.zeros(prob.shape, bool)
    gt[20:30, 20:30, 20:30] = True
    m = match_case("noise", prob, gt, np.eye(4), extraction_threshold=0.01)
    assert len(m.candidates) > 1000
    n_fp = int(np.count_nonzero(m.candidate_outcome == FP))
    assert n_fp + int(np.count_nonzero(m.candidate_outcome != FP)) == len(m.candidates)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_equals_stable_argsort(seed):
    from pipeline.evaluation.lesions import top_k

    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 20, 500) / 19.0  # many ties, also at the cut
    for k in (1, 7, 100, 499, 500, 600):
        want = np.sort(np.argsort(-scores, kind="stable")[:k])
        np.testing.assert_array_equal(top_k(scores, k), want)
    scores[[3, 40]] = np.nan
    np.testing.assert_array_equal(top_k(scores, 50), np.sort(np.argsort(-scores, kind="stable")[:50]))


def test_geometry_is_an_affine_only():
    """One meaning for the geometry argument: a 4x4 affine; a bare spacing is refused with the fix."""
    from pipeline.evaluation.lesions import check_affine

    with pytest.raises(ValueError, match=r"4x4 voxel-to-world affine.*make_affine"):
        match_case("s", np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="non-singular"):
        check_affine(np.zeros((4, 4)))
    assert check_affine(np.diag([0.8, 0.8, 2.5, 1])).dtype == np.float64


def test_lesions_below_min_volume_are_excluded_and_candidates_touching_them_ignored():
    gt = box((1, 1, 1), (2, 2, 2), dtype=bool)  # lesion 1: one voxel (1 mm^3), lower id than the big one
    box((8, 8, 8), (12, 12, 12), out=gt)  # lesion 2: 64 voxels
    prob = box((1, 1, 1), (2, 3, 2), 0.9)  # a candidate on the one-voxel lesion (IoU 0.5)
    box((8, 8, 8), (12, 12, 12), 0.6, out=prob)  # the big lesion's candidate
    box((15, 15, 15), (17, 17, 17), 0.7, out=prob)  # a false positive far from both
    every = run(prob, gt)
    assert every.n_lesions == 2 and every.n_excluded == 0
    np.testing.assert_array_equal(every.candidate_outcome, [TP, TP, FP])

    m = run(prob, gt, min_lesion_mm3=2.0)
    assert m.n_lesions == 1 and m.n_excluded == 1
    assert m.lesions.voxels.tolist() == [64]
    np.testing.assert_allclose(m.lesion_score, [0.6], rtol=1e-6)
    np.testing.assert_array_equal(m.lesion_match, [2])  # candidate ids are unchanged
    np.testing.assert_array_equal(m.lesion_iou, [1.0])
    np.testing.assert_array_equal(m.candidate_outcome, [IGNORED, TP, FP])
    np.testing.assert_array_equal(m.pairs, [[2, 1]])  # lesion ids renumbered to the kept table
    assert m.records() == [(1, pytest.approx(0.6), 1.0), (0, pytest.approx(0.7), 0.0)]


def test_min_lesion_volume_is_in_mm3_and_touching_is_enough_to_be_ignored():
    gt = box((4, 4, 4), (5, 5, 5), dtype=bool)  # one voxel
    prob = box((4, 4, 4), (10, 10, 10), 0.8)  # IoU 1/216: no hit, but it touches the lesion
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 mm^3 per voxel
    kept = match_case("s", prob, gt, affine, min_lesion_mm3=8.0)  # inclusive: 8 mm^3 is kept
    assert kept.n_lesions == 1 and np.isnan(kept.lesion_score[0])
    np.testing.assert_array_equal(kept.candidate_outcome, [FP])
    dropped = match_case("s", prob, gt, affine, min_lesion_mm3=8.5)
    assert dropped.n_lesions == 0 and dropped.n_excluded == 1
    np.testing.assert_array_equal(dropped.candidate_outcome, [IGNORED])
    assert dropped.records() == []
