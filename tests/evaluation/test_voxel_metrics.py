"""Dice, HD95 (mm) and surface Dice: hand-computed cases and agreement with monai.metrics."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.voxel_metrics import VoxelScores, dice, summarize_class, voxel_scores

S = (16, 16, 16)


def cube(lo, hi):
    a = np.zeros(S, bool)
    a[tuple(slice(x, y) for x, y in zip(lo, hi))] = True
    return a


def test_identical_masks():
    a = cube((3, 3, 3), (8, 9, 10))
    s = voxel_scores(a, a, (0.8, 0.8, 2.5), tolerance_mm=1.0)
    assert (s.dice, s.hd95_mm, s.surface_dice) == (1.0, 0.0, 1.0)


def test_dice_by_hand():
    a, b = cube((2, 2, 2), (6, 6, 6)), cube((4, 2, 2), (8, 6, 6))  # 64 each, overlap 32
    assert dice(a, b) == 0.5
    s = voxel_scores(a, b, (1, 1, 1))
    assert (s.tp, s.fp, s.fn) == (32, 32, 32)


def test_shift_along_z_in_mm():
    # a slab shifted by one slice of 2.5 mm: every surface voxel is 0 or 2.5 mm from the other surface
    a, b = cube((2, 2, 2), (14, 14, 5)), cube((2, 2, 3), (14, 14, 6))
    s = voxel_scores(a, b, (0.5, 0.5, 2.5), tolerance_mm=2.0)
    assert s.hd95_mm == pytest.approx(2.5)
    s_tol = voxel_scores(a, b, (0.5, 0.5, 2.5), tolerance_mm=2.5)
    assert s_tol.surface_dice == 1.0 and s.surface_dice < 1.0


def test_empty_cases():
    e, a = np.zeros(S, bool), cube((2, 2, 2), (4, 4, 4))
    both = voxel_scores(e, e, (1, 1, 1))
    assert np.isnan(both.dice) and np.isnan(both.hd95_mm) and np.isnan(both.surface_dice)
    one = voxel_scores(e, a, (1, 1, 1))
    assert one.dice == 0.0 and one.surface_dice == 0.0 and np.isnan(one.hd95_mm) and one.fn == 8


def test_mask_touching_border_has_border_surface():
    a = cube((0, 0, 0), (3, 16, 16))  # a slab covering a whole face
    b = cube((0, 0, 0), (2, 16, 16))
    s = voxel_scores(a, b, (1, 1, 1))
    # border voxels are surface voxels (outside = background), as in MONAI
    assert s.hd95_mm == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_monai(seed):
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(seed)
    zz = np.stack(np.meshgrid(*[np.arange(n) for n in S], indexing="ij"), -1)
    spacing = (0.7, 1.1, 2.5)
    c1, c2 = rng.uniform(5, 11, 3), rng.uniform(5, 11, 3)
    a = (np.linalg.norm((zz - c1) * spacing, axis=-1) < rng.uniform(4, 8))
    b = (np.linalg.norm((zz - c2) * spacing, axis=-1) < rng.uniform(4, 8))
    a[0, :3, :3] = True  # a stray island on the border
    ours = voxel_scores(a, b, spacing, tolerance_mm=1.5)
    ta = torch.from_numpy(np.stack([~a, a]))[None].float()
    tb = torch.from_numpy(np.stack([~b, b]))[None].float()
    hd = compute_hausdorff_distance(ta, tb, include_background=False, percentile=95, spacing=spacing)
    nsd = compute_surface_dice(ta, tb, class_thresholds=[1.5], include_background=False, spacing=spacing)
    assert ours.hd95_mm == pytest.approx(float(hd[0, 0]), rel=1e-5)
    assert ours.surface_dice == pytest.approx(float(nsd[0, 0]), rel=1e-5)


def test_summarize_class_excludes_not_applicable_scans():
    scores = [VoxelScores(1.0, 0.0, 1.0, 10, 0, 0), VoxelScores(0.0, float("nan"), 0.0, 0, 5, 0),
              VoxelScores(float("nan"), float("nan"), float("nan"), 0, 0, 0)]
    out = summarize_class(scores)
    assert out["dice"] == 0.5 and out["hd95_mm"] == 0.0 and out["surface_dice"] == 0.5
    assert out["dice_global"] == pytest.approx(20 / 25)
    assert (out["scans"], out["scans_evaluated"], out["scans_hd95_undefined"]) == (3, 2, 1)


def test_sparse_surface_equals_scipy_erosion():
    from scipy.ndimage import binary_erosion

    from pipeline.evaluation.voxel_metrics import surface_voxels

    rng = np.random.default_rng(0)
    m = rng.random(S) > 0.4
    m[0] = True  # a full border face
    np.testing.assert_array_equal(surface_voxels(m), m & ~binary_erosion(m))


def _from_full_distances(a, b, spacing, tol, pct):
    """HD / surface Dice from every surface distance (the plain KD-tree query of each point)."""
    from pipeline.evaluation.voxel_metrics import surface_distances

    d_ab, d_ba = surface_distances(a, b, spacing)
    hd = max(float(np.percentile(d_ab, pct)), float(np.percentile(d_ba, pct)))
    return hd, (int(np.sum(d_ab <= tol)) + int(np.sum(d_ba <= tol))) / (d_ab.size + d_ba.size)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_noisy_mask_percentile_equals_full_distances(seed):
    """> 4096 isolated surface voxels take the bounded path: results equal to the last bit."""
    from pipeline.evaluation import voxel_metrics as vm

    rng = np.random.default_rng(seed)
    shape = (40, 44, 36)
    noise = rng.random(shape) < 0.12  # ~7,600 voxels, nearly all on the surface
    lesions = np.zeros(shape, bool)
    for _ in range(seed + 1):
        c = rng.integers(4, 32, 3)
        lesions[tuple(slice(x - 3, x + int(rng.integers(1, 5))) for x in c)] = True
    assert vm.surface_coords(noise).shape[0] >= vm._BOUNDED_MIN_QUERIES
    spacing = (0.8, 0.8, 1.5) if seed % 2 else (1.0, 0.7, 3.0)
    for a, b in ((noise, lesions), (lesions, noise)):
        for tol, pct in ((1.0, 95.0), (2.5, 95.0), (0.0, 50.0), (1.0, 100.0), (1.5, 99.0)):
            s = voxel_scores(a, b, spacing, tolerance_mm=tol, percentile=pct)
            assert (s.hd95_mm, s.surface_dice) == _from_full_distances(a, b, spacing, tol, pct)


@pytest.mark.parametrize("fraction", [0.0, 1.0])  # the shifted-views way, then the gathering way
def test_both_surface_ways_equal_scipy_erosion(fraction, monkeypatch):
    from scipy.ndimage import binary_erosion

    from pipeline.evaluation import voxel_metrics as vm

    monkeypatch.setattr(vm, "_DENSE_FRACTION", fraction)
    rng = np.random.default_rng(1)
    for shape in [(1, 5, 7), (6, 1, 1), (9, 8, 7), S]:
        for p in (0.05, 0.5, 0.95):
            m = rng.random(shape) < p
            np.testing.assert_array_equal(vm.surface_coords(m), np.argwhere(m & ~binary_erosion(m)))
