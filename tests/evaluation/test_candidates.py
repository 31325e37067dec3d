"""Peak-relative candidates: hand-built cases with stated answers, and voxel-for-voxel agreement with
PI-CAI's ``extract_lesion_candidates(..., threshold="dynamic")`` (report_guided_annotation, pinned in the
``test`` extra) on synthetic and real-derived probability maps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.evaluation.candidates import DynamicExtraction, dynamic_candidates
from pipeline.evaluation.lesions import extract_candidates


def _ball(shape, centre, radius, peak, dtype=np.float32):
    """Gaussian blob ``peak * exp(-(d / radius)^2)`` (d in voxels)."""
    g = np.meshgrid(*[np.arange(n) - c for n, c in zip(shape, centre)], indexing="ij")
    return (peak * np.exp(-sum(x * x for x in g) / radius**2)).astype(dtype)


# --------------------------------------------------------------------------------------------------
# stated answers


def test_two_blocks_in_peak_order_with_their_peaks_as_scores():
    p = np.zeros((20, 20, 20), np.float32)
    p[10:14, 10:14, 10:14] = 0.5
    p[2:6, 2:6, 2:6] = 0.9
    labels, scores = dynamic_candidates(p)
    assert scores.tolist() == [float(np.float32(0.9)), 0.5]
    assert (labels == 1).sum() == 64 and (labels[2:6, 2:6, 2:6] == 1).all()
    assert (labels == 2).sum() == 64 and (labels[10:14, 10:14, 10:14] == 2).all()


def test_a_halo_below_peak_over_factor_is_not_part_of_the_candidate():
    """Core 0.9 (3^3) inside a 0.2 halo (7^3): static at 0.1 takes 343 voxels, dynamic (0.9 / 2.5 = 0.36)
    the 27 of the core; the halo is then a ring touching the stored core, so it is skipped."""
    p = np.zeros((16, 16, 16), np.float32)
    p[4:11, 4:11, 4:11] = 0.2
    p[6:9, 6:9, 6:9] = 0.9
    labels, scores = dynamic_candidates(p, DynamicExtraction(min_voxels=0, max_lesions=10))
    assert scores.tolist() == [float(np.float32(0.9))]
    assert (labels == 1).sum() == 27
    static_labels, static = extract_candidates(p, 0.1, np.eye(4))
    assert len(static) == 1 and static.voxels[0] == 343


def test_equal_peaks_first_voxel_in_c_order_comes_first():
    p = np.zeros((12, 12, 12), np.float32)
    p[7:10, 1:4, 1:4] = 0.7  # first voxel (7, 1, 1)
    p[1:4, 7:10, 7:10] = 0.7  # first voxel (1, 7, 7): earlier in C order
    labels, scores = dynamic_candidates(p, DynamicExtraction(min_voxels=0))
    assert scores.tolist() == [float(np.float32(0.7))] * 2
    assert labels[1, 7, 7] == 1 and labels[7, 1, 1] == 2


def test_min_voxels_drops_components_of_that_size_or_fewer():
    p = np.zeros((20, 20, 20), np.float32)
    p[2, 2, 2:12] = 0.9  # 10 voxels: dropped by min_voxels=10 (the reference drops <= min_voxels)
    p[10, 10, 2:13] = 0.8  # 11 voxels: kept
    labels, scores = dynamic_candidates(p, DynamicExtraction(min_voxels=10))
    assert scores.tolist() == [float(np.float32(0.8))]
    assert (labels == 1).sum() == 11 and labels[2, 2, 2] == 0


def test_all_components_too_small_gives_the_reference_whole_volume_candidate_which_evaluation_drops():
    p = np.zeros((10, 10, 10), np.float32)
    p[2, 2, 2] = p[7, 7, 7] = 0.9
    labels, scores = dynamic_candidates(p)
    assert scores.tolist() == [0.0] and (labels == 1).all()
    cand_labels, table = extract_candidates(p, 0.1, np.eye(4), dynamic=DynamicExtraction())
    assert len(table) == 0 and not cand_labels.any()


def test_empty_and_sub_failsafe_maps_have_no_candidates():
    for value in (0.0, 0.009):
        labels, scores = dynamic_candidates(np.full((8, 8, 8), value, np.float32))
        assert scores.size == 0 and not labels.any()


def test_max_lesions_caps_stored_candidates_and_rounding_applies_to_scores():
    p = np.zeros((30, 10, 10), np.float32)
    for i, v in enumerate((0.91234, 0.81234, 0.71234, 0.61234)):
        p[1 + 7 * i:5 + 7 * i, 2:6, 2:6] = v
    labels, scores = dynamic_candidates(p, DynamicExtraction(max_lesions=3, round_decimals=2))
    assert scores.tolist() == [float(np.float32(x)) for x in (0.91, 0.81, 0.71)]
    assert labels.max() == 3 and labels[23, 3, 3] == 0


def test_extract_candidates_dynamic_table_scores_and_peaks():
    p = _ball((24, 24, 24), (8, 8, 8), 3.0, 0.8) + _ball((24, 24, 24), (17, 17, 17), 2.5, 0.6)
    labels, table = extract_candidates(p, 0.1, np.diag([2.0, 1.0, 1.0, 1.0]), dynamic=DynamicExtraction())
    ref_labels, ref_scores = dynamic_candidates(p)
    assert np.array_equal(labels, ref_labels) and np.array_equal(table.score, ref_scores)
    assert table.peak_vox[:2].tolist() == [[8, 8, 8], [17, 17, 17]]
    assert table.volume_mm3[:2].tolist() == [2.0 * (labels == 1).sum(), 2.0 * (labels == 2).sum()]
    # the reference's "onion": once the shell touching a stored core is skipped and zeroed, the next
    # shell out no longer touches anything stored and becomes a (low-scoring) candidate of its own
    assert len(table) == 4 and np.all(table.score[2:] < 0.32)


# --------------------------------------------------------------------------------------------------
# agreement with the reference


def _reference(prob, params):
    ref = pytest.importorskip("report_guided_annotation")
    _, conf, indexed = ref.extract_lesion_candidates(
        prob, threshold="dynamic", min_voxels_detection=params.min_voxels,
        num_lesions_to_extract=params.max_lesions, dynamic_threshold_factor=params.threshold_factor,
        max_prob_round_decimals=params.round_decimals)
    return indexed, np.asarray([c for _, c in conf], np.float64)


def _assert_agrees(prob, params):
    ref_labels, ref_scores = _reference(prob, params)
    labels, scores = dynamic_candidates(prob, params)
    assert np.array_equal(scores, ref_scores), (scores, ref_scores)
    assert np.array_equal(labels, ref_labels), f"{np.count_nonzero(labels != ref_labels)} voxels differ"


PARAMS = [DynamicExtraction(), DynamicExtraction(min_voxels=0, max_lesions=40),
          DynamicExtraction(max_lesions=20, round_decimals=2), DynamicExtraction(threshold_factor=1.5, min_voxels=3,
                                                                                 max_lesions=60)]


def _synthetic(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (32, 32, 24)
    p = np.zeros(shape, np.float32)
    for _ in range(rng.integers(2, 8)):
        p = np.maximum(p, _ball(shape, rng.integers(0, 32, 3), rng.uniform(1, 5), rng.uniform(0.1, 1)))
    if kind == "noisy":
        p = np.clip(p + rng.normal(0, 0.05, shape).astype(np.float32), 0, 1)
    elif kind == "quantised":  # many exact ties
        p = np.round(p, 1).astype(np.float32)
    elif kind == "noise-only":
        p = (rng.uniform(0, 1, shape) ** 6).astype(np.float32)
    elif kind == "float64":
        p = p.astype(np.float64)
    return p


@pytest.mark.parametrize("kind", ["blobs", "noisy", "quantised", "noise-only", "float64"])
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"f{p.threshold_factor}-v{p.min_voxels}-n{p.max_lesions}"
                                                           f"-r{p.round_decimals}")
def test_agrees_with_picai_on_synthetic_maps(kind, params):
    for seed in range(2):
        _assert_agrees(_synthetic(kind, seed), params)


@pytest.mark.parametrize("params", PARAMS[:3])
def test_agrees_with_picai_on_touching_lesions(params):
    """Two lesions joined by a ridge at 0.4 (above 0.9 / 2.5): the first candidate swallows both at
    0.36; two lesions joined at 0.3: separate candidates whose lower one touches the first and is skipped;
    and an identical twin pair (a tie on the peak)."""
    shape = (40, 24, 24)
    for ridge in (0.4, 0.3):
        p = np.maximum(_ball(shape, (12, 12, 12), 3.0, 0.9), _ball(shape, (24, 12, 12), 3.0, 0.7))
        p[12:25, 11:14, 11:14] = np.maximum(p[12:25, 11:14, 11:14], ridge)
        _assert_agrees(p, params)
    twins = np.maximum(_ball(shape, (10, 12, 12), 3.0, 0.8), _ball(shape, (20, 12, 12), 3.0, 0.8))
    _assert_agrees(twins, params)


def test_agrees_with_picai_on_empty_and_constant_maps():
    for p in (np.zeros((16, 16, 16), np.float32), np.full((16, 16, 16), 0.5, np.float32)):
        for params in PARAMS:
            _assert_agrees(p, params)


def _real_masks(real):
    nib = pytest.importorskip("nibabel")
    paths = sorted((real / "ms_lesion_change_lit_longitudinal").glob("*/lesion_change_mask.nii.gz"))
    paths += [real / "qin_headneck_pet_multilesion" / "lesion_instances.nii.gz"]
    paths = [p for p in paths if p.exists()]
    if not paths:
        pytest.skip(f"real masks not found under {real}")
    for path in paths:
        mask = np.asarray(nib.load(path).dataobj) > 0
        if not mask.any():
            continue
        # the reference is slow (minutes on a whole noisy scan): a 64 x 64 x 24 window around the
        # densest lesion area keeps this test to seconds per map
        size = np.minimum((64, 64, 24), mask.shape)
        density = ndimage.uniform_filter(mask.astype(np.float32), size)
        centre = np.unravel_index(int(np.argmax(density)), mask.shape)
        lo = [int(np.clip(c - n // 2, 0, s - n)) for c, n, s in zip(centre, size, mask.shape)]
        yield path.parent.name, np.ascontiguousarray(mask[tuple(slice(a, a + n) for a, n in zip(lo, size))])


@pytest.mark.realdata
@pytest.mark.slow
def test_agrees_with_picai_on_probability_maps_made_from_the_real_masks(real_data_dir):
    """Each shared real lesion mask as a probability map: binary, blurred (sigma 1 and 2 voxels) and
    blurred with multiplicative and additive noise."""
    rng = np.random.default_rng(0)
    for _, mask in _real_masks(real_data_dir):
        m = mask.astype(np.float32)
        blur = ndimage.gaussian_filter(m, 1.0)
        maps = [m, blur, ndimage.gaussian_filter(m, 2.0),
                np.clip(blur * rng.uniform(0.5, 1, m.shape).astype(np.float32)
                        + rng.normal(0, 0.03, m.shape).astype(np.float32), 0, 1)]
        for p in maps:
            for params in (DynamicExtraction(max_lesions=100), DynamicExtraction(min_voxels=0, max_lesions=30,
                                                                                  round_decimals=3)):
                _assert_agrees(p, params)


# --------------------------------------------------------------------------------------------------
# the running maximum (candidates._LiveMaxima) against full passes


class _FullPasses:
    """What _LiveMaxima replaces: a pass over the whole array per step."""

    def __init__(self, values: np.ndarray, k: int = 0):
        self.values = values

    def max(self):
        return self.values.max() if self.values.size else self.values.dtype.type(0)

    def ties(self, m) -> np.ndarray:
        return np.flatnonzero(self.values == m)


def test_live_maxima_equal_full_passes_while_values_are_zeroed():
    from pipeline.evaluation.candidates import _LiveMaxima

    rng = np.random.default_rng(7)
    values = np.round(rng.random(5000), 2).astype(np.float32)  # many ties
    values[rng.random(5000) < 0.1] = 0
    fast, slow = _LiveMaxima(values, k=16), _FullPasses(values)  # k=16: the list runs out and is rebuilt
    while True:
        m = fast.max()
        assert m == slow.max() and type(m) is type(slow.max())
        if m == 0:
            break
        np.testing.assert_array_equal(fast.ties(m), slow.ties(m))
        values[fast.ties(m)[:1]] = 0  # remove one of them, as a chosen component is zeroed
        values[rng.integers(0, values.size, 3)] = 0  # and a few others anywhere


@pytest.mark.parametrize("k", [4, 4096])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_candidates_with_the_running_maximum_equal_full_passes(monkeypatch, k, seed):
    """Noise with ~100 candidates (tied values included) and blobs: the same labels and scores as with a
    pass over the whole array per step."""
    import pipeline.evaluation.candidates as C

    rng = np.random.default_rng(seed)
    p = rng.random((40, 36, 24), dtype=np.float32) ** 30
    p[rng.random(p.shape) < 0.01] = np.float32(0.75)  # a tie group
    p = np.maximum(p, _ball(p.shape, (10, 12, 8), 3.0, 0.95))
    params = DynamicExtraction(min_voxels=0, max_lesions=100)
    real = C._LiveMaxima
    monkeypatch.setattr(C, "_LiveMaxima", lambda values: _FullPasses(values))
    slow = dynamic_candidates(p, params)
    monkeypatch.setattr(C, "_LiveMaxima", lambda values: real(values, k))
    fast = dynamic_candidates(p, params)
    assert slow[1].size == 100
    np.testing.assert_array_equal(fast[0], slow[0])
    np.testing.assert_array_equal(fast[1], slow[1])
