"""pipeline/data/sampling.py: lesion-aware patch sampling for rare lesions.

Frequencies are checked on many seeded draws against their expected value with a binomial tolerance of
4.5 standard deviations (a correct sampler fails such a check with probability < 1e-5; the seeds are fixed,
so the outcome is deterministic anyway).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.data.sampling import PatchSampler, crop_box, crop_patch, index_lesions, lesion_weights

SIGMAS = 4.5


def assert_binomial(count: int, n: int, p: float) -> None:
    """``count`` successes out of ``n`` draws agree with success probability ``p``."""
    sd = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= SIGMAS * sd + 1e-9, (
        f"{count}/{n} = {count / n:.4f}, expected {p:.4f} +- {SIGMAS} sd"
    )


def small_and_big_lesion(shape=(40, 40, 20)) -> np.ndarray:
    """Label map with a 5-voxel lesion (a plus-shaped cluster, label 2) and a 500-voxel one (a 10x10x5 box,
    label 2), plus an organ (label 1) that is not a lesion class."""
    label = np.zeros(shape, np.uint8)
    label[:, :, :3] = 1
    label[3, 3, 10] = label[2, 3, 10] = label[4, 3, 10] = label[3, 2, 10] = label[3, 4, 10] = 2  # 5 voxels
    label[20:30, 20:30, 10:15] = 2  # 500 voxels
    return label


def sampler_for(
    labels: list[np.ndarray], fraction: float = 1.0, weighting: str = "uniform", lesion_labels=(2,)
) -> PatchSampler:
    indices = [index_lesions(lab, lesion_labels) for lab in labels]
    return PatchSampler([lab.shape for lab in labels], indices, fraction, weighting)


# ------------------------------------------------------------------------------------- lesion index


def test_index_lesions_groups_voxels_by_26_connected_component():
    label = np.zeros((8, 8, 8), np.uint8)
    label[1, 1, 1] = label[2, 2, 2] = 2  # corner-touching: one 26-connected lesion
    label[6, 6, 6] = 3  # another lesion class
    label[4, 0, 0] = 1  # not a lesion class
    idx = index_lesions(label, [2, 3])
    assert idx.n_lesions == 2
    assert sorted(idx.sizes.tolist()) == [1, 2]
    assert idx.starts[0] == 0 and idx.starts[-1] == idx.voxels.size == 3
    for k in range(idx.n_lesions):  # each component's voxels are lesion voxels of one connected blob
        coords = np.array(np.unravel_index(idx.voxels[idx.starts[k] : idx.starts[k + 1]], label.shape)).T
        assert np.isin(label[tuple(coords.T)], [2, 3]).all()
        assert np.abs(coords - coords[0]).max() <= 1


def test_index_lesions_of_a_lesion_free_scan_is_empty_and_sampling_falls_back_to_random():
    label = np.zeros((6, 6, 6), np.uint8)
    label[1:3, 1:3, 1:3] = 1
    sampler = sampler_for([label], fraction=1.0)
    assert sampler.indices[0].n_lesions == 0
    batch = sampler.batch(np.random.default_rng(0), 4)
    assert [is_lesion for _, _, is_lesion in batch] == [False] * 4


def test_lesion_weights_rules():
    sizes = np.array([5, 500])
    np.testing.assert_allclose(lesion_weights(sizes, "uniform"), [0.5, 0.5])
    np.testing.assert_allclose(lesion_weights(sizes, "volume"), [5 / 505, 500 / 505])
    np.testing.assert_allclose(lesion_weights(sizes, "sqrt_volume"), [1 / 11, 10 / 11])  # sqrt(500/5) = 10
    with pytest.raises(ValueError, match="unknown lesion weighting 'area'"):
        lesion_weights(sizes, "area")


# ------------------------------------------------------------------------------- lesion share per batch


@pytest.mark.parametrize(
    ("fraction", "batch_size"), [(1 / 3, 2), (1 / 3, 3), (1 / 3, 5), (0.5, 2), (0.25, 7)]
)
def test_lesion_patch_share_matches_fraction(fraction, batch_size):
    sampler = sampler_for([small_and_big_lesion()], fraction=fraction)
    rng = np.random.default_rng(123)
    n_batches = 6000
    counts = np.array(
        [sum(is_lesion for _, _, is_lesion in sampler.batch(rng, batch_size)) for _ in range(n_batches)]
    )
    # per batch: floor(f * B) or one more (never nnU-Net's rounding of 1/3 * 2 up to 1 every time)
    floor = math.floor(fraction * batch_size)
    assert set(np.unique(counts)) <= {floor, floor + 1}
    assert_binomial(int(counts.sum()), n_batches * batch_size, fraction)
    # the extra patch is a Bernoulli(frac(f * B)) per batch
    assert_binomial(int((counts == floor + 1).sum()), n_batches, fraction * batch_size - floor)


@pytest.mark.parametrize(
    ("fraction", "batch_size", "expected"),
    [(1 / 3, 2, 1), (1 / 3, 4, 1), (1 / 3, 8, 3), (0.5, 2, 1), (0.67, 2, 1), (0.9, 2, 2), (1.0, 3, 3), (0.0, 4, 0)],
)
def test_fixed_count_is_nnunets_rounding_in_every_batch(fraction, batch_size, expected):
    # nnU-Net's _oversample_last_XX_percent: sample i is lesion-centred unless i < round(B (1 - f))
    assert batch_size - round(batch_size * (1 - fraction)) == expected
    indices = [index_lesions(small_and_big_lesion(), (2,))]
    sampler = PatchSampler([small_and_big_lesion().shape], indices, fraction, count="fixed")
    rng = np.random.default_rng(5)
    counts = {sum(flag for _, _, flag in sampler.batch(rng, batch_size)) for _ in range(300)}
    assert counts == {expected}


def test_fixed_count_with_batch_one_falls_back_to_the_expected_share():
    indices = [index_lesions(small_and_big_lesion(), (2,))]
    sampler = PatchSampler([small_and_big_lesion().shape], indices, 1 / 3, count="fixed")
    rng = np.random.default_rng(9)
    n = 3000
    hits = sum(flag for _ in range(n) for _, _, flag in sampler.batch(rng, 1))  # nnU-Net's rule would give 0
    assert_binomial(hits, n, 1 / 3)
    with pytest.raises(ValueError, match="count rule"):
        PatchSampler([small_and_big_lesion().shape], indices, 1 / 3, count="round")


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_lesion_share_extremes(fraction):
    sampler = sampler_for([small_and_big_lesion()], fraction=fraction)
    rng = np.random.default_rng(1)
    flags = [is_lesion for _ in range(200) for _, _, is_lesion in sampler.batch(rng, 2)]
    assert set(flags) == {bool(fraction)}


def test_lesion_patches_come_first_and_batch_has_the_requested_size():
    sampler = sampler_for([small_and_big_lesion()], fraction=0.5)
    rng = np.random.default_rng(5)
    for _ in range(100):
        flags = [is_lesion for _, _, is_lesion in sampler.batch(rng, 4)]
        assert len(flags) == 4 and flags == sorted(flags, reverse=True)


# ------------------------------------------------------------------------- which lesion is chosen


def chosen_small_lesion(sampler: PatchSampler, n: int, seed: int = 0) -> int:
    """How many of ``n`` lesion centres fall in the 5-voxel lesion (in the upper-left corner)."""
    rng = np.random.default_rng(seed)
    small = 0
    for _ in range(n):
        _, (x, y, _) = sampler.lesion_centre(rng)
        small += x < 10 and y < 10
    return small


@pytest.mark.parametrize(
    ("weighting", "p_small"), [("uniform", 0.5), ("volume", 5 / 505), ("sqrt_volume", 1 / 11)]
)
def test_lesion_choice_frequency_by_weighting(weighting, p_small):
    sampler = sampler_for([small_and_big_lesion()], weighting=weighting)
    n = 20000
    assert_binomial(chosen_small_lesion(sampler, n), n, p_small)


def test_uniform_weighting_is_over_lesions_of_the_whole_training_set_not_per_scan():
    # scan 0: the small and the big lesion; scan 1: one more big lesion -> each of the 3 lesions 1/3
    second = np.zeros((40, 40, 20), np.uint8)
    second[5:15, 5:15, 5:10] = 2
    sampler = sampler_for([small_and_big_lesion(), second], weighting="uniform")
    rng = np.random.default_rng(7)
    n = 15000
    cases = np.array([sampler.lesion_centre(rng)[0] for _ in range(n)])
    assert_binomial(int((cases == 1).sum()), n, 1 / 3)


def test_volume_weighting_is_about_100_to_1():
    sampler = sampler_for([small_and_big_lesion()], weighting="volume")
    n = 50000
    small = chosen_small_lesion(sampler, n, seed=3)
    assert 70 < (n - small) / small < 140  # expected 100; 4.5 sd of the small count is ~ +-32%


def test_voxel_inside_a_lesion_is_uniform_within_it():
    sampler = sampler_for([small_and_big_lesion()], weighting="uniform")
    rng = np.random.default_rng(11)
    hits = np.zeros(5, int)
    small_voxels = [(3, 3, 10), (2, 3, 10), (4, 3, 10), (3, 2, 10), (3, 4, 10)]
    for _ in range(10000):
        _, centre = sampler.lesion_centre(rng)
        if centre in small_voxels:
            hits[small_voxels.index(centre)] += 1
    for h in hits:
        assert_binomial(int(h), int(hits.sum()), 0.2)


@pytest.mark.parametrize("patch", [(16, 16, 8), (48, 48, 24), (8, 64, 4)])
def test_lesion_centre_is_in_a_lesion_and_inside_its_cropped_patch(patch):
    label = small_and_big_lesion()
    label[39, 39, 19] = label[0, 39, 0] = (
        2  # single-voxel lesions in corners: the patch must shift to hold them
    )
    sampler = sampler_for([label], weighting="uniform")
    rng = np.random.default_rng(2)
    for _ in range(2000):
        case, centre = sampler.lesion_centre(rng)
        assert case == 0 and label[centre] == 2
        start, stop = crop_box(label.shape, centre, patch)
        assert all(s <= c < e for s, c, e in zip(start, centre, stop, strict=True))
        assert [e - s for s, e in zip(start, stop, strict=True)] == list(patch)
        cropped = crop_patch(label[None], start, stop, 0)
        assert cropped.shape == (1, *patch)
        assert cropped[(0, *(c - s for c, s in zip(centre, start, strict=True)))] == 2


def test_random_centres_are_uniform_over_cases_and_voxels():
    shapes = [(10, 10, 10), (4, 4, 4)]
    labels = [np.zeros(s, np.uint8) for s in shapes]
    sampler = sampler_for(labels, fraction=0.0)
    rng = np.random.default_rng(9)
    draws = [sampler.random_centre(rng) for _ in range(8000)]
    cases = np.array([c for c, _ in draws])
    assert_binomial(int((cases == 1).sum()), len(draws), 0.5)  # by case, not by voxel count
    for case, centre in draws:
        assert all(0 <= v < n for v, n in zip(centre, shapes[case], strict=True))
    xs = np.array([centre[0] for case, centre in draws if case == 0])
    assert_binomial(int((xs < 5).sum()), xs.size, 0.5)


def test_sampler_is_pure_given_its_generator():
    sampler = sampler_for([small_and_big_lesion()], fraction=1 / 3, weighting="sqrt_volume")
    a = [sampler.batch(np.random.default_rng([4, 2]), 3) for _ in range(5)]
    b = [sampler.batch(np.random.default_rng([4, 2]), 3) for _ in range(5)]
    assert a == b


# --------------------------------------------------------------------------------------- cropping


def test_crop_box_centres_the_patch_and_shifts_it_inside_the_volume():
    assert crop_box((100, 100, 50), (50, 50, 25), (20, 20, 10)) == ([40, 40, 20], [60, 60, 30])
    assert crop_box((100, 100, 50), (2, 97, 49), (20, 20, 10)) == ([0, 80, 40], [20, 100, 50])
    assert crop_box((20, 20, 10), (0, 19, 9), (20, 20, 10)) == ([0, 0, 0], [20, 20, 10])  # patch == volume


def test_crop_box_and_patch_pad_when_the_volume_is_smaller_than_the_patch():
    array = np.arange(4 * 10 * 3, dtype=np.float32).reshape(1, 4, 10, 3) + 1  # no zeros inside
    # x: 4 < 8 -> centred with padding, start (4 - 8) // 2 = -2; y: 10 >= 8 -> inside; z: 3 < 7 -> start -2
    start, stop = crop_box(array.shape[1:], (1, 9, 0), (8, 8, 7))
    assert (start, stop) == ([-2, 2, -2], [6, 10, 5])
    patch = crop_patch(array, start, stop, pad_value=-5.0)
    assert patch.shape == (1, 8, 8, 7) and patch.dtype == np.float32
    np.testing.assert_array_equal(patch[0, 2:6, :, 2:5], array[0, :, 2:10, :])
    inside = np.zeros(patch.shape, bool)
    inside[0, 2:6, :, 2:5] = True
    assert (patch[~inside] == -5.0).all()
    assert int((patch == -5.0).sum()) == 8 * 8 * 7 - 4 * 8 * 3


def test_crop_patch_keeps_label_dtype_and_pads_labels_with_background():
    label = np.full((3, 3, 3), 2, np.uint8)
    start, stop = crop_box(label.shape, (1, 1, 1), (5, 5, 5))
    out = crop_patch(label[None], start, stop, 0)
    assert out.dtype == np.uint8 and out.shape == (1, 5, 5, 5)
    assert int((out == 2).sum()) == 27 and int((out == 0).sum()) == 125 - 27


def test_class_balance_gives_each_lesion_class_an_equal_share():
    """Two lesions of class 1 and one of class 3: with class balance each class gets 1/2, so the single
    class-3 lesion is drawn twice as often as each class-1 lesion; without it every lesion gets 1/3."""
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:4, 2:4, 2:4] = 1
    lab[10:12, 10:12, 10:12] = 1
    lab[15:18, 15:18, 15:18] = 3
    idx = index_lesions(lab, [1, 3])
    assert idx.classes.tolist() == [1, 1, 3]
    balanced = PatchSampler([lab.shape], [idx], 1.0, "uniform", class_balance=True)
    assert np.allclose(balanced.probs, [0.25, 0.25, 0.5])
    plain = PatchSampler([lab.shape], [idx], 1.0, "uniform", class_balance=False)
    assert np.allclose(plain.probs, [1 / 3, 1 / 3, 1 / 3])
    rng = np.random.default_rng(0)
    draws = [lab[balanced.lesion_centre(rng)[1]] for _ in range(4000)]
    share_class3 = np.mean(np.asarray(draws) == 3)
    assert abs(share_class3 - 0.5) < 4.5 * np.sqrt(0.25 / 4000)


def test_touching_lesions_of_two_classes_are_two_components():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[2:5, 2:5, 2:5] = 1
    lab[5:7, 2:5, 2:5] = 2
    idx = index_lesions(lab, [1, 2])
    assert sorted(idx.classes.tolist()) == [1, 2] and sorted(idx.sizes.tolist()) == [18, 27]
