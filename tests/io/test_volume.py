"""pipeline/io/volume.py: the (C, X, Y, Z) array + RAS affine carrier and its geometry helpers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.io.volume import Volume, grid_mismatch, make_affine

ROT_Z_90 = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # x axis -> +y, y axis -> -x


def test_make_affine_places_spacing_on_the_direction_columns():
    affine = make_affine((0.5, 2.0, 3.0), (10.0, -20.0, 5.0), ROT_Z_90)
    expected = np.array([[0.0, -2.0, 0.0, 10.0], [0.5, 0.0, 0.0, -20.0], [0.0, 0.0, 3.0, 5.0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(affine, expected)


def test_geometry_properties_of_an_oblique_anisotropic_volume(oblique_affine):
    vol = Volume(np.zeros((2, 4, 5, 6), np.float32), oblique_affine)
    assert vol.shape == (4, 5, 6)
    assert vol.n_channels == 2
    np.testing.assert_allclose(vol.spacing, (0.8, 1.1, 2.5), atol=1e-12)
    np.testing.assert_array_equal(vol.origin, [-101.37, 57.123456789, 33.3])
    np.testing.assert_allclose(vol.direction.T @ vol.direction, np.eye(3), atol=1e-12)  # orthonormal columns
    assert vol.affine.dtype == np.float64


def test_voxel_to_world_and_back(oblique_affine):
    vol = Volume(np.zeros((1, 4, 5, 6)), oblique_affine)
    # voxel (1, 0, 0) is one x-spacing (0.8 mm) along the first direction column from the origin
    np.testing.assert_allclose(
        vol.voxel_to_world([1, 0, 0]), vol.origin + 0.8 * vol.direction[:, 0], atol=1e-12
    )
    ijk = np.array([[0, 0, 0], [3, 4, 5], [1.5, 2.25, 0.5]])
    np.testing.assert_allclose(vol.world_to_voxel(vol.voxel_to_world(ijk)), ijk, atol=1e-9)


def test_voxel_to_world_known_answer():
    vol = Volume(np.zeros((1, 3, 3, 3)), make_affine((0.5, 2.0, 3.0), (10.0, -20.0, 5.0), ROT_Z_90))
    # i=2 -> +1.0 mm along y; j=1 -> -2.0 mm along x; k=1 -> +3.0 mm along z
    np.testing.assert_allclose(vol.voxel_to_world([2, 1, 1]), [8.0, -19.0, 8.0])


@pytest.mark.parametrize("shape", [(4, 5, 6), (1, 2, 4, 5, 6)])
def test_data_must_be_channel_first_4d(shape):
    with pytest.raises(ValueError, match=r"must be \(C, X, Y, Z\)"):
        Volume(np.zeros(shape), np.eye(4))


def test_affine_must_be_4x4():
    with pytest.raises(ValueError, match="affine must be 4x4"):
        Volume(np.zeros((1, 2, 2, 2)), np.eye(3))


def test_with_data_keeps_geometry_and_adds_the_channel_axis(oblique_affine):
    vol = Volume(np.zeros((1, 4, 5, 6), np.float32), oblique_affine)
    new = vol.with_data(np.ones((4, 5, 6), np.uint8))
    assert new.data.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(new.affine, vol.affine)
    with pytest.raises(ValueError, match="spatial shape"):
        vol.with_data(np.ones((4, 5, 7)))


def test_grid_mismatch_lists_each_difference(oblique_affine):
    a = Volume(np.zeros((1, 4, 5, 6)), oblique_affine)
    assert grid_mismatch(a, a) == []
    assert a.same_grid(Volume(np.zeros((3, 4, 5, 6)), oblique_affine))  # channels do not matter

    shifted = oblique_affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 0.01]  # 0.01 mm > 1e-3 mm tolerance
    assert grid_mismatch(a, Volume(np.zeros((1, 4, 5, 6)), shifted)) == [
        "origin [-101.37, 57.123, 33.3] != [-101.37, 57.123, 33.31] mm"
    ]
    tiny = oblique_affine.copy()
    tiny[:3, 3] += 1e-5  # below tolerance
    assert a.same_grid(Volume(np.zeros((1, 4, 5, 6)), tiny))

    other = make_affine((0.8, 1.1, 3.0), oblique_affine[:3, 3], np.eye(3))
    problems = grid_mismatch(a, Volume(np.zeros((1, 4, 5, 7)), other))
    assert problems == [
        "shape (4, 5, 6) != (4, 5, 7)",
        "spacing [0.8, 1.1, 2.5] != [0.8, 1.1, 3.0] mm",
        "direction differs",
    ]
