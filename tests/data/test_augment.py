"""pipeline/data/augment.py: nnU-Net-strength augmentation, one spatial transform read from the scan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.config import AugmentConfig
from pipeline.data import augment as A
from pipeline.data.sampling import crop_box, crop_patch

OFF = dict(rotate_prob=0.0, scale_prob=0.0, elastic_prob=0.0, noise_prob=0.0, blur_prob=0.0, brightness_prob=0.0,
           contrast_prob=0.0, lowres_prob=0.0, gamma_inverted_prob=0.0, gamma_prob=0.0, mirror_prob=0.0)


def only(**on) -> AugmentConfig:
    """All transforms off but ``on``."""
    return AugmentConfig(**{**OFF, **on})


def scan(shape=(40, 36, 32), channels=2, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth positive two-channel scan (values 1..3) and a label with values {0, 1, 2}."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    base = 1 + grids[0] + np.sin(3 * grids[1]) * grids[2]
    image = np.stack([base * (1 + 0.1 * c) + 0.05 * rng.random(shape) for c in range(channels)]).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[10:20, 8:18, 5:15] = 1
    label[22:26, 20:24, 18:22] = 2
    return image, label


def test_all_probabilities_zero_is_the_plain_crop_exactly():
    image, label = scan()
    for centre, patch in [((20, 18, 16), (16, 12, 8)), ((0, 35, 31), (16, 12, 8)), ((5, 5, 5), (48, 40, 36))]:
        img, lab = A.augment_patch(image, label, centre, patch, np.random.default_rng(0), only())
        start, stop = crop_box(label.shape, centre, patch)
        assert torch.equal(img, torch.from_numpy(crop_patch(image, start, stop, 0.0)))
        assert torch.equal(lab, torch.from_numpy(crop_patch(label, start, stop, 0)))


def test_label_stays_integer_with_the_same_values_through_rotation_and_scaling():
    image, label = scan()
    cfg = only(rotate_prob=1.0, scale_prob=1.0)
    for seed in range(5):
        img, lab = A.augment_patch(image, label, (20, 18, 16), (24, 24, 24), np.random.default_rng(seed), cfg)
        assert lab.dtype == torch.uint8 and img.dtype == torch.float32
        assert set(lab.unique().tolist()) <= {0, 1, 2}
        assert {1, 2} <= set(lab.unique().tolist())  # both structures still in the central patch


def test_rotation_by_90_degrees_about_axis_2_is_rot90():
    """Patch voxel offset p samples the scan at R p: Rz(90) maps (p0, p1) to (-p1, p0), i.e. out[i, j] =
    crop[n - 1 - j, i], which is ``np.rot90(crop, 1, axes=(1, 0))``."""
    image, label = scan(shape=(30, 30, 20))
    patch = (16, 16, 8)
    start, stop = crop_box(label.shape, (15, 15, 10), patch)
    crop_img, crop_lab = crop_patch(image, start, stop, 0.0), crop_patch(label, start, stop, 0)
    centre = [s + (p - 1) / 2 for s, p in zip(start, patch, strict=True)]
    spatial = A.SpatialSample(A.rotation_matrix([0, 0, np.pi / 2]), None)
    img, lab = A.spatial_transform(image, label, centre, patch, spatial)
    np.testing.assert_allclose(img.numpy(), np.rot90(crop_img, 1, axes=(2, 1)), atol=1e-4)
    np.testing.assert_array_equal(lab.numpy(), np.rot90(crop_lab, 1, axes=(1, 0)))


def test_no_padding_inside_the_patch_where_the_scan_continues():
    """A 45-degree rotation zoomed out by 1.4 reaches about 2x the patch's half-width from its centre: all
    read from the scan (values >= 1), none of it padding (0), although a crop of the patch size would not
    cover it. Near the scan's edge, 0 appears only where the label says the point is outside the scan."""
    image, label = scan(shape=(64, 64, 64))
    label[:] = 1
    spatial = A.SpatialSample(A.rotation_matrix([np.pi / 4, np.pi / 4, np.pi / 4]) * 1.4, None)
    img, lab = A.spatial_transform(image, label, (31.5, 31.5, 31.5), (20, 20, 20), spatial)
    assert img.min() >= 1.0 and (lab == 1).all()
    img, lab = A.spatial_transform(image, label, (5.5, 31.5, 31.5), (20, 20, 20), spatial)
    assert (lab == 0).any() and (lab == 1).any()
    assert img[:, lab == 0].abs().max() < 1.0  # outside (within a voxel of the edge: interpolated with 0)
    assert img[:, lab == 1].min() > 0.4  # inside: at most half a voxel of padding mixed in


def test_intensity_parameters_are_drawn_per_channel():
    image, label = scan(channels=2)
    image[1] = image[0]  # identical channels come out different: each has its own factor
    for cfg in (only(brightness_prob=1.0), only(contrast_prob=1.0), only(gamma_prob=1.0)):
        img, _ = A.augment_patch(image, label, (20, 18, 16), (16, 16, 16), np.random.default_rng(3), cfg)
        assert not torch.allclose(img[0], img[1]), cfg
    img, _ = A.augment_patch(image, label, (20, 18, 16), (16, 16, 16), np.random.default_rng(3),
                             only(brightness_prob=1.0))
    start, stop = crop_box(label.shape, (20, 18, 16), (16, 16, 16))
    crop = torch.from_numpy(crop_patch(image, start, stop))
    ratios = [float((img[c] / crop[c]).mean()) for c in range(2)]
    for c in range(2):  # a pure multiplier per channel, within nnU-Net's range
        torch.testing.assert_close(img[c], crop[c] * ratios[c], rtol=1e-5, atol=1e-5)
        assert 0.75 <= ratios[c] <= 1.25


@pytest.mark.parametrize("seed", range(6))
def test_synchronized_channels_get_one_draw_for_all_channels(seed):
    """Two visits of one modality: identical channels stay identical through every intensity transform (the
    per-channel switches of blur and low resolution included); with independent draws they part."""
    image, label = scan(channels=3)
    image[1] = image[0]
    image[2] = 2 * image[0]  # a scaled copy: multipliers keep the ratio when synchronised
    on = dict(blur_prob=1.0, brightness_prob=1.0, contrast_prob=1.0, lowres_prob=1.0, gamma_inverted_prob=1.0,
              gamma_prob=1.0)
    sync, independent = only(**on, synchronize_channels=True), only(**on)
    img, _ = A.augment_patch(image, label, (20, 18, 16), (16, 16, 16), np.random.default_rng(seed), sync)
    assert torch.equal(img[0], img[1])
    assert not torch.allclose(img[0], torch.from_numpy(crop_patch(image, *crop_box(label.shape, (20, 18, 16),
                                                                                    (16, 16, 16)))[0]))
    img, _ = A.augment_patch(image, label, (20, 18, 16), (16, 16, 16), np.random.default_rng(seed),
                             only(brightness_prob=1.0, synchronize_channels=True))
    torch.testing.assert_close(img[2], 2 * img[0])
    img, _ = A.augment_patch(image, label, (20, 18, 16), (16, 16, 16), np.random.default_rng(seed), independent)
    assert not torch.allclose(img[0], img[1])


def nnunet_order_intensity(image, rng, cfg):
    """The intensity chain drawn channel by channel in nnU-Net's order (a channel's switch, then its
    parameters): the reference that independent draws must reproduce draw for draw."""
    if rng.random() < cfg.noise_prob:
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        A.gaussian_noise_(image, float(rng.uniform(*cfg.noise_std)), generator)
    if rng.random() < cfg.blur_prob:
        for c in range(image.shape[0]):
            if rng.random() < cfg.blur_channel_prob:
                A.gaussian_blur_(image[c], rng.uniform(*cfg.blur_sigma_vox, 3))
    if rng.random() < cfg.brightness_prob:
        for c in range(image.shape[0]):
            image[c].mul_(A.bg_factor(rng, *cfg.brightness_range))
    if rng.random() < cfg.contrast_prob:
        for c in range(image.shape[0]):
            A.contrast_(image[c], A.bg_factor(rng, *cfg.contrast_range))
    if rng.random() < cfg.lowres_prob:
        for c in range(image.shape[0]):
            if rng.random() < cfg.lowres_channel_prob:
                A.simulate_low_resolution_(image[c], float(rng.uniform(*cfg.lowres_scale)))
    for invert, prob in ((True, cfg.gamma_inverted_prob), (False, cfg.gamma_prob)):
        if rng.random() < prob:
            for c in range(image.shape[0]):
                A.gamma_(image[c], A.bg_factor(rng, *cfg.gamma_range), invert=invert)
    return image


@pytest.mark.parametrize("seed", range(4))
def test_independent_channels_keep_nnunets_order_of_draws(seed):
    """Adding synchronised draws must not change the independent default draw for draw (runs stay
    comparable with earlier ones): same patch and same generator state afterwards as the reference."""
    cfg = AugmentConfig(noise_prob=1.0, blur_prob=1.0, brightness_prob=1.0, contrast_prob=1.0, lowres_prob=1.0,
                        gamma_inverted_prob=1.0, gamma_prob=1.0)
    image = torch.from_numpy(np.random.default_rng(seed).normal(size=(3, 16, 16, 8)).astype(np.float32))
    rng_ours, rng_ref = np.random.default_rng(seed), np.random.default_rng(seed)
    ours = A.augment_intensity(image.clone(), rng_ours, cfg)
    ref = nnunet_order_intensity(image.clone(), rng_ref, cfg)
    assert torch.equal(ours, ref)
    assert rng_ours.random() == rng_ref.random()


def test_synchronized_switches_are_shared_and_fire_at_the_channel_rate():
    """blur / low resolution with ``*_channel_prob`` 0.5: synchronised, all channels are changed or none, in
    about half of the patches."""
    image, label = scan(channels=2)
    image[1] = image[0]
    start, stop = crop_box(label.shape, (20, 18, 16), (16, 16, 16))
    crop = torch.from_numpy(crop_patch(image, start, stop))
    for cfg in (only(blur_prob=1.0, synchronize_channels=True), only(lowres_prob=1.0, synchronize_channels=True)):
        changed = []
        for seed in range(40):
            img, _ = A.augment_patch(image, label, (20, 18, 16), (16, 16, 16), np.random.default_rng(seed), cfg)
            assert torch.equal(img[0], img[1])
            changed.append(not torch.equal(img[0], crop[0]))
        assert 10 <= sum(changed) <= 30, cfg


def test_same_seed_same_patch_other_seed_other_patch():
    image, label = scan()
    cfg = AugmentConfig(**{k: 1.0 for k in OFF}, blur_channel_prob=1.0, lowres_channel_prob=1.0)

    def run(seed):
        return A.augment_patch(image, label, (20, 18, 16), (16, 16, 16), np.random.default_rng(seed), cfg)

    (a_img, a_lab), (b_img, b_lab), (c_img, _) = run(7), run(7), run(8)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert not torch.equal(a_img, c_img)


def test_mirror_flips_image_and_label_along_every_axis():
    image, label = scan()
    start, stop = crop_box(label.shape, (20, 18, 16), (16, 12, 8))
    crop_img, crop_lab = crop_patch(image, start, stop), crop_patch(label, start, stop)
    img, lab = A.augment_patch(image, label, (20, 18, 16), (16, 12, 8), np.random.default_rng(0),
                               only(mirror_prob=1.0))
    np.testing.assert_array_equal(img.numpy(), crop_img[:, ::-1, ::-1, ::-1])
    np.testing.assert_array_equal(lab.numpy(), crop_lab[::-1, ::-1, ::-1])
    # with p = 0.5 each axis is flipped in about half of the draws, independently
    rng = np.random.default_rng(1)
    flips = np.array([[rng.random() < 0.5 for _ in range(3)] for _ in range(2000)])
    assert np.all(np.abs(flips.mean(0) - 0.5) < 0.05)


@pytest.mark.parametrize("invert", [False, True])
def test_gamma_keeps_mean_and_std(invert):
    x = torch.from_numpy(scan()[0][0].copy())
    mean, std = x.mean(), x.std()
    before = x.clone()
    A.gamma_(x, 1.4, invert=invert)
    assert float((x - before).abs().max()) > 1e-2  # it did change the intensities
    torch.testing.assert_close(x.mean(), mean, rtol=0, atol=1e-4)
    torch.testing.assert_close(x.std(), std, rtol=1e-4, atol=0)


def test_contrast_keeps_the_range_and_low_resolution_keeps_the_shape():
    x = torch.from_numpy(scan()[0][0].copy())
    lo, hi = x.min(), x.max()
    A.contrast_(x, 1.25)
    assert x.min() >= lo and x.max() <= hi
    y = torch.from_numpy(scan()[0][0].copy())
    A.simulate_low_resolution_(y, 0.5, keep_axis=2)
    assert y.shape == (40, 36, 32)
    # the kept (thick) axis is untouched by the down-sampling: pairs of voxels along it still differ
    assert not torch.allclose(y[:, :, 0::2], y[:, :, 1::2])


def test_anisotropic_plan_rotates_and_scales_in_plane_only():
    cfg = only(rotate_prob=1.0, scale_prob=1.0, elastic_prob=1.0)
    rng = np.random.default_rng(0)
    angles = []
    for _ in range(200):
        s = A.sample_spatial(rng, cfg, (16, 16, 8), anisotropic_axis=2)
        np.testing.assert_allclose(s.matrix[2], [0, 0, 1], atol=1e-12)  # the thick axis maps to itself
        np.testing.assert_allclose(s.matrix[:, 2], [0, 0, 1], atol=1e-12)
        assert not s.displacement[2].any()  # elastic offsets stay in-plane
        angles.append(np.degrees(np.arctan2(s.matrix[1, 0], s.matrix[0, 0])))
    assert max(np.abs(angles)) > 150  # +-180 deg in-plane (nnU-Net's rule), not +-30
    s = A.sample_spatial(np.random.default_rng(1), only(rotate_prob=1.0), (16, 16, 16), anisotropic_axis=None)
    assert not np.allclose(s.matrix[2], [0, 0, 1])  # isotropic: rotations about all three axes


def test_bg_factor_draws_half_below_one():
    rng = np.random.default_rng(0)
    draws = np.array([A.bg_factor(rng, 0.7, 1.5) for _ in range(4000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.5
    assert abs((draws < 1).mean() - 0.5) < 0.04


def test_ranges_are_validated():
    with pytest.raises(ValidationError, match="gamma_range must be"):
        AugmentConfig(gamma_range=(1.5, 0.7))
    with pytest.raises(ValidationError, match="lowres_scale must be <= 1"):
        AugmentConfig(lowres_scale=(0.5, 2.0))
