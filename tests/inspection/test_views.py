"""Tri-planar views, galleries and the FROC figure on volumes built in code with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.contour import ContourSet

from pipeline.inspection import views
from pipeline.io.volume import Volume, make_affine

SPACING = (1.0, 2.0, 3.0)  # mm, anisotropic on purpose
SHAPE = (40, 20, 12)  # voxels: 40 x 40 x 36 mm


def world(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def grids() -> dict[str, np.ndarray]:
    """The same voxel centres stored three ways: RAS, LPS with x/y swapped, and RAS with z first."""
    ras = make_affine(SPACING, (-20.0, -19.0, -16.5))
    nx, ny, _nz = SHAPE
    x0, y0, z0 = ras[:3, 3]
    # axis 0 -> posterior (-y, 2 mm), axis 1 -> left (-x, 1 mm), axis 2 -> superior (z, 3 mm)
    lps_swapped = make_affine((2.0, 1.0, 3.0), (x0 + nx - 1, y0 + 2.0 * (ny - 1), z0),
                              np.array([[0, -1, 0], [-1, 0, 0], [0, 0, 1]], float))
    # axis 0 -> z, axis 1 -> x, axis 2 -> y
    z_first = make_affine((3.0, 1.0, 2.0), (x0, y0, z0), np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], float))
    return {"ras": ras, "lps_swapped": lps_swapped, "z_first": z_first}


def shape_of(name: str) -> tuple[int, int, int]:
    nx, ny, nz = SHAPE
    return {"ras": (nx, ny, nz), "lps_swapped": (ny, nx, nz), "z_first": (nz, nx, ny)}[name]


def scene(affine, shape, lesion_mm=(0.0, 1.0, 1.5), radius_mm=4.0):
    """Image whose value encodes the world position, a spherical GT lesion, a probability bump on it
    and a prediction; plus a bright marker 12 mm to the patient's right and 10 mm anterior of the lesion."""
    xyz = world(shape, affine)
    d = np.linalg.norm(xyz - np.asarray(lesion_mm), axis=-1)
    image = (xyz[..., 0] + 100 * xyz[..., 1] + 10000 * xyz[..., 2]).astype(np.float32)
    label = (d <= radius_mm).astype(np.uint8) * 2
    prob = (0.9 * np.exp(-0.5 * (d / radius_mm) ** 2)).astype(np.float32)
    pred = (prob >= 0.5).astype(np.uint8) * 2
    return (Volume(image[None], affine), Volume(label[None], affine), Volume(prob[None], affine),
            Volume(pred[None], affine))


def test_windows():
    assert views.intensity_window("CT") == views.Window(-160.0, 240.0, "CT W400/L40 HU")
    data = np.r_[np.zeros(1000), np.linspace(10, 20, 1001)]
    w = views.intensity_window("FLAIR", data)
    assert w.lo == pytest.approx(10.1) and w.hi == pytest.approx(19.9)  # zeros (background) excluded
    with pytest.raises(ValueError, match="needs the image data"):
        views.intensity_window("T1")


@pytest.mark.parametrize("stored", ["lps_swapped", "z_first"])
def test_planes_do_not_depend_on_the_storage_orientation(stored):
    """The same world content stored differently must give the very same displayed planes."""
    centre = (0.0, 1.0, 1.5)
    ref_planes, ref_tilt = views.extract_planes(scene(grids()["ras"], shape_of("ras"))[0], centre,
                                                half_width_mm=12.0)
    image = scene(grids()[stored], shape_of(stored))[0]
    planes, tilt = views.extract_planes(image, centre, half_width_mm=12.0)
    assert ref_tilt == pytest.approx(0.0) and tilt == pytest.approx(0.0, abs=1e-6)
    for a, b in zip(ref_planes, planes):
        assert a.name == b.name and a.sides == b.sides
        np.testing.assert_allclose(a.image, b.image, atol=1e-2)
        np.testing.assert_allclose(a.xs, b.xs, atol=1e-9)
        np.testing.assert_allclose(a.ys, b.ys, atol=1e-9)
        assert a.position_mm == pytest.approx(b.position_mm)


def test_plane_axes_follow_ras():
    """Columns run toward R (axial, coronal) or A (sagittal), rows toward A (axial) or S; xs/ys in mm."""
    image, *_ = scene(grids()["ras"], shape_of("ras"))
    planes, _ = views.extract_planes(image, (0.0, 1.0, 1.5), half_width_mm=9.0)
    axial, coronal, sagittal = planes
    # image = x + 100 y + 10000 z: along columns / rows the value grows by the step of that axis
    assert np.all(np.diff(axial.image, axis=1) == pytest.approx(1.0, abs=0.01))  # x, 1 mm voxels
    assert np.all(np.diff(axial.image, axis=0) == pytest.approx(200.0, abs=0.01))  # y, 2 mm voxels
    assert np.all(np.diff(coronal.image, axis=0) == pytest.approx(30000.0, abs=1))  # z, 3 mm voxels
    assert np.all(np.diff(sagittal.image, axis=1) == pytest.approx(200.0, abs=0.01))  # y
    assert axial.sides == ("R", "L", "P", "A") and coronal.sides == ("R", "L", "I", "S")
    assert sagittal.sides == ("A", "P", "I", "S")
    assert axial.spacing == (1.0, 2.0) and coronal.spacing == (1.0, 3.0) and sagittal.spacing == (2.0, 3.0)
    assert axial.xs[0] >= -9.5 and axial.xs[-1] <= 9.5 and 0.0 in axial.xs  # centre on a voxel: offset 0
    assert axial.position_mm == pytest.approx(1.5)  # the slice through the centre (z = 1.5 mm)


def _axes(fig, name):
    return next(ax for ax in fig.axes if ax.get_label() == name)


def _contours(ax) -> list[ContourSet]:
    return [c for c in ax.collections if isinstance(c, ContourSet)]


def test_triplanar_has_three_labelled_views_with_contours_and_overlay():
    image, label, prob, pred = scene(grids()["lps_swapped"], shape_of("lps_swapped"))
    fig = views.triplanar(image, label, prob, (0.0, 1.0, 1.5), pred=pred, lesion_labels=(2,),
                          candidate_threshold=0.1, half_width_mm=15.0, title="scan x | lesion 1")
    names = [ax.get_label() for ax in fig.axes]
    assert names == ["axial", "coronal", "sagittal", "colorbar"]
    for name in ("axial", "coronal", "sagittal"):
        ax = _axes(fig, name)
        assert len(_contours(ax)) == 3  # candidate region, prediction, GT
        assert len(ax.images) == 2  # CT + probability overlay
        assert ax.get_title().startswith(name) and "mm" in ax.get_title()
        lo, hi = ax.get_xlim()
        assert lo == 15.0 and hi == -15.0  # radiological: + (R or A) on the left
        assert ax.get_ylim() == (-15.0, 15.0)
        letters = {t.get_text() for t in ax.texts}
        assert {"R", "L", "A", "P"} <= letters if name == "axial" else {"S", "I"} <= letters
    assert "scan x | lesion 1" in fig._suptitle.get_text() and "W400/L40" in fig._suptitle.get_text()


def test_gt_contour_follows_voxel_edges():
    """A 5 x 3 voxel GT square (1 x 2 mm voxels) centred on the view: its outline spans +-2.5 x +-3 mm."""
    affine = make_affine((1.0, 2.0, 3.0), (-10.0, -10.0, -9.0))
    shape = (21, 11, 7)
    label = np.zeros(shape, np.uint8)
    label[8:13, 4:7, 3] = 2  # x -2..2 mm, y -2..2 mm around (0, 0); one slice, z = 0
    image = Volume(np.zeros((1, *shape), np.float32), affine)
    fig = views.triplanar(image, Volume(label[None], affine), None, (0.0, 0.0, 0.0), half_width_mm=8.0)
    (cs,) = _contours(_axes(fig, "axial"))
    verts = np.concatenate([p.vertices for p in cs.get_paths()])
    np.testing.assert_allclose([verts[:, 0].min(), verts[:, 0].max()], [-2.5, 2.5], atol=0.2)
    np.testing.assert_allclose([verts[:, 1].min(), verts[:, 1].max()], [-3.0, 3.0], atol=0.3)
    assert len(fig.axes) == 3  # no probability: no colour bar
    (cs,) = _contours(_axes(fig, "coronal"))  # one 3 mm slice thick in z
    verts = np.concatenate([p.vertices for p in cs.get_paths()])
    np.testing.assert_allclose([verts[:, 1].min(), verts[:, 1].max()], [-1.5, 1.5], atol=0.3)


def test_rendered_marker_appears_on_the_patients_right_and_anterior():
    """Pixels, not just settings: a bright blob 10 mm right and 10 mm anterior of the centre lands in the
    upper-left quadrant of the rendered axial view."""
    affine = make_affine((1.0, 1.0, 2.0), (-20.0, -20.0, -10.0))
    shape = (41, 41, 11)
    xyz = world(shape, affine)
    image = np.full(shape, -1000.0, np.float32)
    image[np.linalg.norm(xyz - np.array([10.0, 10.0, 0.0]), axis=-1) < 4] = 1000.0
    fig = views.triplanar(Volume(image[None], affine), None, None, (0.0, 0.0, 0.0), half_width_mm=20.0)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    bbox = _axes(fig, "axial").get_window_extent()
    height = rgba.shape[0]
    x0, x1 = int(bbox.x0) + 3, int(bbox.x1) - 3
    y0, y1 = height - int(bbox.y1) + 3, height - int(bbox.y0) - 3  # buffer rows run top-down
    panel = rgba[y0:y1, x0:x1, :3].mean(axis=-1)
    h, w = panel.shape
    quads = {"upper-left": panel[: h // 2, : w // 2], "upper-right": panel[: h // 2, w // 2:],
             "lower-left": panel[h // 2:, : w // 2], "lower-right": panel[h // 2:, w // 2:]}
    bright = {k: int((v > 200).sum()) for k, v in quads.items()}
    assert max(bright, key=bright.get) == "upper-left", bright
    others = max(bright["upper-right"], bright["lower-left"], bright["lower-right"], 1)
    assert bright["upper-left"] > 10 * others


def test_oblique_scan_is_shown_on_its_nearest_planes_and_says_so():
    a = np.deg2rad(15.0)
    rot_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = make_affine(SPACING, (-20.0, -19.0, -16.5), rot_z)
    image, label, prob, pred = scene(affine, SHAPE)
    planes, tilt = views.extract_planes(image, (0.0, 1.0, 1.5), label=label, half_width_mm=10.0)
    assert tilt == pytest.approx(15.0, abs=0.01)
    assert planes[0].gt.any()  # the lesion is on the axial plane through its centre
    fig = views.triplanar(image, label, prob, (0.0, 1.0, 1.5), pred=pred)
    assert "oblique scan" in fig._suptitle.get_text() and "15 deg" in fig._suptitle.get_text()


def test_grid_mismatch_is_refused():
    image, label, *_ = scene(grids()["ras"], shape_of("ras"))
    bad = Volume(label.data[:, :-1], label.affine)
    with pytest.raises(ValueError, match="label grid"):
        views.triplanar(image, bad, None, (0.0, 0.0, 0.0))


def test_gallery_tiles_and_empty_gallery():
    image, label, prob, pred = scene(grids()["ras"], shape_of("ras"))
    window = views.intensity_window("CT")
    tiles = [views.axial_tile(image, label, prob, c, pred=pred, window=window, half_width_mm=10.0,
                              candidate_threshold=0.1, caption=f"tile {i}")
             for i, c in enumerate([(0.0, 1.0, 1.5), (5.0, 1.0, 1.5), (0.0, -5.0, 1.5)])]
    fig = views.gallery(tiles, title="Missed lesions", ncols=2)
    tile_axes = [ax for ax in fig.axes if ax.get_label().startswith("tile")]
    assert len(tile_axes) == 3
    assert [ax.get_title() for ax in tile_axes] == ["tile 0", "tile 1", "tile 2"]
    assert all(_contours(ax) for ax in tile_axes)
    assert "Missed lesions" in fig._suptitle.get_text() and "bar = 5 mm" in fig._suptitle.get_text()
    empty = views.gallery([], title="False positives", empty_text="no false positives")
    assert [t.get_text() for ax in empty.axes for t in ax.texts] == ["no false positives"]


def test_froc_figure_from_stage_outputs():
    froc = pd.DataFrame({"threshold": [np.inf, 0.9, 0.8, 0.4], "fps_per_scan": [0.0, 0.0, 0.5, 1.0],
                         "sensitivity": [0.0, 0.5, 0.5, 1.0]})
    rates = ["0.125", "0.25", "0.5", "1", "2", "4", "8"]
    op = {"target_fp_rate": 1.0, "fps_per_scan": 1.0, "sensitivity": 1.0, "threshold": 0.4}
    metrics = {
        "cpm": 0.714, "cpm_ci95": [0.5, 0.9], "lesions_total": 2, "scans_total": 2,
        "sensitivity_at_fp": dict(zip(rates, [0.5, 0.5, 0.5, 1, 1, 1, 1])),
        "sensitivity_at_fp_ci95": {r: [0.0, 1.0] for r in rates},
        "operating_points": [op],
        "operating_point": op,
    }
    fig = views.froc_figure(froc, metrics)
    (ax,) = fig.axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "FROC (CPM 0.714, 95% CI 0.500-0.900)"
    assert any("95% CI" in t for t in legend[1:]) and "operating points" in legend
    assert any(t.startswith("chosen: 1 FP/scan, t=0.4") for t in legend)
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == rates
    empty = views.froc_figure(froc.head(1), {**metrics, "lesions_total": 0})
    assert empty.axes[0].texts[0].get_text() == "no lesions in the labels"
