"""Training augmentation at nnU-Net v2 strength: one spatial transform read straight from the scan, then
per-channel intensity transforms and mirroring.

The transforms and their defaults are those of nnU-Net v2's ``nnUNetTrainer.get_training_transforms``
(batchgeneratorsv2), in the same order; the table is in docs/augmentation.md. Two things differ on purpose:

* **Spatial transform read from the scan, not from a crop.** nnU-Net crops a fixed enlarged patch (its
  ``initial_patch_size``, computed for a scaling range of 0.85-1.25 while it samples 0.7-1.4) around the
  centre, pads it, and rotates/scales that crop: where the transformed patch reaches past the crop, zeros
  appear although the scan continues. Here rotation, scaling and the optional elastic field are composed
  into one map from patch voxels to scan voxels and the scan itself is interpolated once at those points
  (``torch.nn.functional.grid_sample``; trilinear for images, nearest for labels). The region read is thus
  exactly the transformed patch's footprint, however large: padding (0, the normalised foreground mean, and
  background for labels) appears only where a point falls outside the scan, and no enlarged crop is copied.
* **Determinism.** Every random draw comes from the ``numpy.random.Generator`` passed in (torch's noise from
  a generator seeded by it), so a batch depends only on that generator's seed.

Conventions: scans are ``(C, X, Y, Z)`` float32 and labels ``(X, Y, Z)`` integer, voxel axes in array order;
``anisotropic_axis`` is the plan's thick-slice axis (``None`` for isotropic plans). With it, as nnU-Net's
"dummy 2D" augmentation does, rotation (up to +-180 deg) and scaling act only in the plane of the two other
axes, elastic displacements stay in-plane, and simulated low resolution leaves the thick axis alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d

from pipeline.config import AugmentConfig
from pipeline.data.sampling import crop_box, crop_patch

EPS = 1e-7  # guards divisions by a channel's range or std (a constant patch)


# ------------------------------------------------------------------------------------------ spatial


@dataclass(frozen=True)
class SpatialSample:
    """One draw of the spatial transform.

    A patch voxel at offset ``p`` (voxels, from the patch centre) samples the scan at
    ``centre + matrix @ (p + displacement[:, p])``: deform first, then rotate and scale, as batchgeneratorsv2.
    """

    matrix: np.ndarray  # (3, 3) rotation x scaling; scale > 1 zooms out
    displacement: np.ndarray | None  # (3, X, Y, Z) float32 elastic offsets in voxels, or None


def rotation_matrix(angles_rad) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles about axes 0, 1, 2 (batchgeneratorsv2's ``create_affine_matrix_3d``)."""
    a, b, c = (float(t) for t in angles_rad)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def elastic_field(rng: np.random.Generator, patch_size, spacing_frac: float, magnitude_vox: float,
                  axes) -> np.ndarray:
    """Smooth random displacements ``(3, *patch_size)`` float32 in voxels: standard-normal values on a
    control grid ``spacing_frac`` x patch edge apart, trilinearly interpolated to the patch, each component
    scaled so that its largest absolute value is ``magnitude_vox``. Components not in ``axes`` are 0."""
    patch = tuple(int(p) for p in patch_size)
    n = [max(2, int(np.ceil(1 / max(spacing_frac, 1e-3))) + 1) for _ in patch]
    coarse = rng.standard_normal((3, *n)).astype(np.float32)
    field = F.interpolate(torch.from_numpy(coarse)[None], size=patch, mode="trilinear", align_corners=True)[0]
    out = np.zeros((3, *patch), np.float32)
    for a in axes:
        peak = float(field[a].abs().max())
        out[a] = field[a].numpy() * (magnitude_vox / max(peak, EPS))
    return out


def sample_spatial(rng: np.random.Generator, cfg: AugmentConfig, patch_size,
                   anisotropic_axis: int | None = None) -> SpatialSample | None:
    """Draw rotation (``rotate_prob``), scaling (``scale_prob``, one factor for all moving axes) and the
    elastic field (``elastic_prob``); ``None`` when none is drawn (the patch is then a plain crop)."""
    do_rotate = rng.random() < cfg.rotate_prob
    do_scale = rng.random() < cfg.scale_prob
    do_elastic = rng.random() < cfg.elastic_prob
    if not (do_rotate or do_scale or do_elastic):
        return None
    moving = [a for a in range(3) if a != anisotropic_axis]
    angles = np.zeros(3)
    if do_rotate:
        if anisotropic_axis is None:
            limit = np.deg2rad(cfg.rotate_deg)
            angles = rng.uniform(-limit, limit, 3)
        else:  # in-plane only: about the thick axis
            limit = np.deg2rad(cfg.rotate_deg_anisotropic)
            angles[anisotropic_axis] = rng.uniform(-limit, limit)
    scales = np.ones(3)
    if do_scale:
        scales[moving] = rng.uniform(*cfg.scale_range)
    displacement = None
    if do_elastic:
        displacement = elastic_field(rng, patch_size, rng.uniform(*cfg.elastic_scale),
                                     rng.uniform(*cfg.elastic_magnitude_vox), moving)
    return SpatialSample(rotation_matrix(angles) @ np.diag(scales), displacement)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor view of a float32 scan (torch warns on read-only memory maps; nothing writes to it)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def spatial_transform(image: np.ndarray, label: np.ndarray, centre, patch_size,
                      spatial: SpatialSample) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the scan on the transformed patch grid.

    Args:
        image: ``(C, X, Y, Z)`` float32 scan (array or memory map; read, never copied whole).
        label: ``(X, Y, Z)`` integer scan.
        centre: patch centre in scan voxel coordinates (floats: ``start + (P - 1) / 2``).
        patch_size: ``(PX, PY, PZ)``.
        spatial: the draw from :func:`sample_spatial`.

    Returns:
        ``(C, PX, PY, PZ)`` float32 image (trilinear, 0 outside the scan) and ``(PX, PY, PZ)`` label of the
        label's dtype (nearest, 0 outside the scan).
    """
    patch = [int(p) for p in patch_size]
    shape = np.asarray(label.shape, dtype=np.float64)
    # source voxel coordinate k of patch voxel (i, j, l): centre_k + sum_m M_km offset_m. Without an elastic
    # field this is a sum of three per-axis vectors, built by broadcasting (one pass per component; cheaper
    # than affine_grid's batched matmul)
    offsets = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in patch]
    disp = None if spatial.displacement is None else torch.from_numpy(spatial.displacement)
    to_norm = 2.0 / np.maximum(shape - 1, 1)  # voxel -> grid_sample's [-1, 1] (align_corners=True)
    grid = torch.empty((*patch, 3), dtype=torch.float32)  # grid_sample order: (axis 2, axis 1, axis 0)
    flat = torch.zeros(patch, dtype=torch.int32)  # nearest voxel's flat index in the label scan
    inside = torch.ones(patch, dtype=torch.bool)
    strides = (label.shape[1] * label.shape[2], label.shape[2], 1)
    for k in range(3):
        m = spatial.matrix[k]
        ax = (float(centre[k]) + m[0] * offsets[0]).float()
        ay, az = (m[1] * offsets[1]).float(), (m[2] * offsets[2]).float()
        vox = (ax[:, None] + ay[None, :])[..., None] + az  # (X, Y, Z) source coordinate k, voxels
        if disp is not None:  # deform first, then rotate / scale: + sum_m M_km d_m
            vox += float(m[0]) * disp[0] + float(m[1]) * disp[1] + float(m[2]) * disp[2]
        torch.mul(vox, float(to_norm[k]), out=grid[..., 2 - k]).sub_(1.0)
        inside &= (vox >= -0.5) & (vox < shape[k] - 0.5)
        flat += vox.round_().clamp_(0, shape[k] - 1).to(torch.int32) * strides[k]
    img = F.grid_sample(_as_tensor(image)[None], grid[None], mode="bilinear", padding_mode="zeros",
                        align_corners=True)[0]
    # labels: nearest voxel, background outside the scan (index arithmetic on the scan, no float copy of it)
    lab = torch.from_numpy(np.asarray(label).reshape(-1)[flat.numpy()])
    lab[~inside] = 0
    return img, lab


# ---------------------------------------------------------------------------------------- intensity


def bg_factor(rng: np.random.Generator, low: float, high: float) -> float:
    """batchgeneratorsv2's ``BGContrast``: half the draws from ``[low, 1)``, half from ``[1, high)``, so that
    shrinking and stretching are equally likely whatever the asymmetry of the range."""
    below = rng.random() < 0.5
    if high <= 1 or (below and low < 1):
        return float(rng.uniform(low, min(high, 1.0)))
    return float(rng.uniform(max(low, 1.0), high))


def gaussian_noise_(image: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Add N(0, std^2) noise, an independent field per channel, in place."""
    image.add_(torch.empty_like(image).normal_(0.0, std, generator=generator))
    return image


def gaussian_blur_(channel: torch.Tensor, sigmas_vox) -> torch.Tensor:
    """Separable Gaussian blur of one contiguous ``(X, Y, Z)`` channel in place, ``sigmas_vox`` per axis
    (kernel radius 3 sigma as batchgeneratorsv2's 6-sigma-wide kernel, edges reflected). scipy's line-buffered
    1-D filters work in place and ran 3x faster than torch's conv3d here (one core)."""
    x = channel.numpy()
    for axis, sigma in enumerate(sigmas_vox):
        gaussian_filter1d(x, float(sigma), axis=axis, output=x, mode="reflect", truncate=3.0)
    return channel


def contrast_(channel: torch.Tensor, factor: float) -> torch.Tensor:
    """``(x - mean) * factor + mean``, clipped to the channel's former range (nnU-Net's preserve_range)."""
    mean = channel.mean()
    lo, hi = torch.aminmax(channel)
    return channel.sub_(mean).mul_(factor).add_(mean).clamp_(lo, hi)


def simulate_low_resolution_(channel: torch.Tensor, scale: float, keep_axis: int | None = None) -> torch.Tensor:
    """Down-sample ``(X, Y, Z)`` by ``scale`` (nearest), back up trilinearly, in place; ``keep_axis``
    (the thick-slice axis) keeps its resolution."""
    size = list(channel.shape)
    small = [n if a == keep_axis else max(1, round(n * scale)) for a, n in enumerate(size)]
    if small == size:
        return channel
    down = F.interpolate(channel[None, None], size=small, mode="nearest-exact")
    channel.copy_(F.interpolate(down, size=size, mode="trilinear", align_corners=False)[0, 0])
    return channel


def gamma_(channel: torch.Tensor, gamma: float, invert: bool = False) -> torch.Tensor:
    """nnU-Net's gamma with retained statistics, in place: (optionally negate,) rescale to [0, 1], raise to
    ``gamma``, map back to the range, restore the former mean and std (, negate back)."""
    if invert:
        channel.neg_()
    mean, std = channel.mean(), channel.std()
    lo, hi = torch.aminmax(channel)
    span = hi - lo
    channel.sub_(lo).div_(span.clamp(min=EPS)).pow_(gamma).mul_(span).add_(lo)
    channel.sub_(channel.mean()).mul_(std / channel.std().clamp(min=EPS)).add_(mean)
    if invert:
        channel.neg_()
    return channel


def augment_intensity(image: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig,
                      anisotropic_axis: int | None = None) -> torch.Tensor:
    """nnU-Net v2's intensity chain on a ``(C, X, Y, Z)`` patch, in place and in its order: noise, blur,
    brightness, contrast, low resolution, inverted gamma, gamma. Each transform is switched on per patch
    with its ``*_prob``; its parameters are drawn per channel (independent channels), except the noise std,
    which nnU-Net shares between channels (the noise fields themselves are independent).

    With ``cfg.synchronize_channels`` (batchgeneratorsv2's ``synchronize_channels``) every channel gets the
    same draw -- the per-channel switch of blur and low resolution included -- so the channels' relation is
    kept: two visits of one modality stay comparable, and no change between them is faked."""
    n_channels = image.shape[0]
    sync = cfg.synchronize_channels

    def per_channel(draw):
        """One draw per channel, or one shared by all channels."""
        if sync:
            value = draw()
            return [value] * n_channels
        return [draw() for _ in range(n_channels)]

    def switched(prob, draw):
        """A channel's switch, then its parameters when on (None when off): nnU-Net's order of draws."""
        return lambda: draw() if rng.random() < prob else None

    if rng.random() < cfg.noise_prob:
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        gaussian_noise_(image, float(rng.uniform(*cfg.noise_std)), generator)
    if rng.random() < cfg.blur_prob:
        sigmas = per_channel(switched(cfg.blur_channel_prob, lambda: rng.uniform(*cfg.blur_sigma_vox, 3)))
        for c in range(n_channels):
            if sigmas[c] is not None:
                gaussian_blur_(image[c], sigmas[c])
    if rng.random() < cfg.brightness_prob:
        for c, factor in enumerate(per_channel(lambda: bg_factor(rng, *cfg.brightness_range))):
            image[c].mul_(factor)
    if rng.random() < cfg.contrast_prob:
        for c, factor in enumerate(per_channel(lambda: bg_factor(rng, *cfg.contrast_range))):
            contrast_(image[c], factor)
    if rng.random() < cfg.lowres_prob:
        scales = per_channel(switched(cfg.lowres_channel_prob, lambda: float(rng.uniform(*cfg.lowres_scale))))
        for c in range(n_channels):
            if scales[c] is not None:
                simulate_low_resolution_(image[c], scales[c], anisotropic_axis)
    for invert, prob in ((True, cfg.gamma_inverted_prob), (False, cfg.gamma_prob)):  # inverted gamma first
        if rng.random() < prob:
            for c, gamma in enumerate(per_channel(lambda: bg_factor(rng, *cfg.gamma_range))):
                gamma_(image[c], gamma, invert=invert)
    return image


def mirror(image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator,
           prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip image ``(C, X, Y, Z)`` and label ``(X, Y, Z)`` along each spatial axis with probability ``prob``."""
    axes = [a for a in range(3) if rng.random() < prob]
    if not axes:
        return image, label
    return torch.flip(image, [a + 1 for a in axes]), torch.flip(label, axes)


# ------------------------------------------------------------------------------------------- patch


def augment_patch(image: np.ndarray, label: np.ndarray, centre, patch_size, rng: np.random.Generator,
                  cfg: AugmentConfig, anisotropic_axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented training patch around ``centre`` (a voxel from ``PatchSampler``).

    The patch box is :func:`crop_box`'s (centred on ``centre``, shifted inside the scan where the scan is
    larger); the spatial transform turns about that box's centre. With no spatial draw the patch is the plain
    crop (bit-exact), so all probabilities 0 give exactly ``crop_patch``.

    Returns:
        ``(C, *patch_size)`` float32 image and ``(*patch_size)`` label (the label's dtype).
    """
    patch = tuple(int(p) for p in patch_size)
    start, stop = crop_box(label.shape, centre, patch)
    spatial = sample_spatial(rng, cfg, patch, anisotropic_axis)
    if spatial is None:
        img = torch.from_numpy(crop_patch(image, start, stop, 0.0).astype(np.float32, copy=False))
        lab = torch.from_numpy(crop_patch(label, start, stop, 0))
    else:
        box_centre = [s + (p - 1) / 2 for s, p in zip(start, patch, strict=True)]
        img, lab = spatial_transform(image, label, box_centre, patch, spatial)
    img = augment_intensity(img, rng, cfg, anisotropic_axis)
    return mirror(img, lab, rng, cfg.mirror_prob)
