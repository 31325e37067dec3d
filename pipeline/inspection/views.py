"""Pictures of lesions: tri-planar views, galleries of axial crops and the FROC curve (pure; no file I/O).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global state, no
display backend needed); save it with ``fig.savefig(path)`` or let Jupyter show it.

Display conventions (radiological, as in clinical viewers):

* Volumes are shown on their voxel grid turned to the nearest RAS orientation (nibabel's
  ``io_orientation``): no resampling, so every drawn pixel is a voxel. For an oblique scan the three
  planes are the voxel planes nearest to axial / coronal / sagittal and the title says by how much
  the grid is tilted.
* Axial: patient right on the image left, anterior at the top. Coronal: right on the left, superior at
  the top. Sagittal: anterior on the left, superior at the top. The letters are written at the edges.
* Axes are millimetres from the centre (the lesion), so anisotropic voxels keep their true shape.
* Overlays: GT lesion contour (green), predicted lesion contour from the label map (red), the extent of
  the candidate, ``probability >= candidate threshold`` (orange, dashed), the lesion probability as a
  translucent colour map (transparent below 0.05), a crosshair with a gap on the centre.
* Intensity window: W 400 / L 40 HU for CT channels, the 1st-99th percentile of the scan otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.evaluation.froc_plot import froc_figure as draw_froc
from pipeline.evaluation.froc_plot import rate_band
from pipeline.io.volume import Volume

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CT_WINDOW_HU = (400.0, 40.0)  # (width, level): soft-tissue / liver window
PROB_FLOOR = 0.05  # probabilities below this are not drawn
GT_COLOR, PRED_COLOR, CAND_COLOR, CROSS_COLOR = "#33ff33", "#ff2020", "#ffa500", "#00e5ff"
PROB_CMAP = "plasma"
SCALE_BAR_MM = 5.0  # gallery tiles
_UPSAMPLE = 4  # contours are traced on a nearest-upsampled mask so they follow voxel edges

# per plane: (fixed RAS axis, horizontal axis, vertical axis, side letters (left, right, bottom, top))
_PLANES = {
    "axial": (2, 0, 1, ("R", "L", "P", "A")),
    "coronal": (1, 0, 2, ("R", "L", "I", "S")),
    "sagittal": (0, 1, 2, ("A", "P", "I", "S")),
}
_AXIS_NAME = ("x (R)", "y (A)", "z (S)")


@dataclass(frozen=True)
class Window:
    """Display intensity range ``[lo, hi]`` (image units, e.g. HU) and how it was chosen."""

    lo: float
    hi: float
    label: str


def is_ct(channel_name: str) -> bool:
    """True for channel names such as ``CT``, ``ct``, ``CT_venous`` (decides the HU window).

    >>> is_ct("CT"), is_ct("ct_arterial"), is_ct("FLAIR")
    (True, True, False)
    """
    name = channel_name.strip().upper()
    return name == "CT" or name.startswith(("CT_", "CT-", "CT "))


def intensity_window(channel_name: str, data: np.ndarray | None = None,
                     percentiles: tuple[float, float] = (1.0, 99.0)) -> Window:
    """W 400 / L 40 HU for CT; otherwise the percentiles of the nonzero voxels of ``data`` (any shape).

    >>> intensity_window("CT")
    Window(lo=-160.0, hi=240.0, label='CT W400/L40 HU')
    """
    if is_ct(channel_name):
        width, level = CT_WINDOW_HU
        return Window(level - width / 2, level + width / 2, f"{channel_name} W{width:g}/L{level:g} HU")
    if data is None:
        raise ValueError(f"channel {channel_name!r} is not CT: a percentile window needs the image data")
    flat = np.asarray(data).ravel()
    step = max(1, flat.size // 2_000_000)  # a subsample is enough for percentiles
    sample = flat[::step].astype(np.float64)
    sample = sample[np.isfinite(sample) & (sample != 0)]
    if sample.size == 0:
        return Window(0.0, 1.0, f"{channel_name} (empty)")
    lo, hi = np.percentile(sample, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return Window(float(lo), float(hi), f"{channel_name} p{percentiles[0]:g}-p{percentiles[1]:g}")


# ------------------------------------------------------------------------------------------------ planes


@dataclass(frozen=True)
class Plane:
    """One displayed slice, cut around a centre; arrays are ``(rows, cols)`` = (vertical, horizontal).

    Attributes:
        name: ``axial``, ``coronal`` or ``sagittal``.
        image: intensities (float32).
        gt, pred: lesion masks (bool) or None.
        prob: lesion probability (float32) or None.
        xs, ys: voxel-centre coordinates of the columns / rows, mm from the centre (increasing).
        sides: anatomical letters at the (left, right, bottom, top) edges as displayed.
        position_mm: world (RAS) coordinate of the slice along its normal axis, mm.
        index, n_slices: slice index in the RAS-ordered grid and the number of slices.
        spacing: (horizontal, vertical) voxel size in mm.
    """

    name: str
    image: np.ndarray
    gt: np.ndarray | None
    pred: np.ndarray | None
    prob: np.ndarray | None
    xs: np.ndarray
    ys: np.ndarray
    sides: tuple[str, str, str, str]
    position_mm: float
    normal: str
    index: int
    n_slices: int
    spacing: tuple[float, float]


def ras_orientation(affine: np.ndarray) -> tuple[np.ndarray, float]:
    """(nibabel orientation array to the nearest RAS grid, tilt of the grid from RAS in degrees)."""
    from nibabel.orientations import io_orientation

    ornt = io_orientation(affine)
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    cosines = [abs(direction[int(ax), i]) for i, ax in enumerate(ornt[:, 0])]
    tilt = float(np.degrees(np.arccos(np.clip(min(cosines), -1.0, 1.0))))
    return ornt, tilt


def _reorient(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` array -> RAS-ordered view (flips and a transpose; no copy)."""
    from nibabel.orientations import apply_orientation

    return apply_orientation(arr, ornt)


def _as3d(vol: Volume | None, shape: tuple[int, int, int], what: str, channel: int = 0) -> np.ndarray | None:
    if vol is None:
        return None
    if vol.shape != shape:
        raise ValueError(f"{what} grid {vol.shape} differs from the image grid {shape}")
    return vol.data[channel]


def extract_planes(image: Volume, centre_mm: Sequence[float], *, label: Volume | None = None,
                   prob: Volume | None = None, pred: Volume | None = None,
                   lesion_labels: Sequence[int] = (2,), channel: int = 0, half_width_mm: float = 30.0,
                   planes: Sequence[str] = ("axial", "coronal", "sagittal")) -> tuple[list[Plane], float]:
    """Cut the requested planes through ``centre_mm`` (world RAS, mm), ``half_width_mm`` around it.

    Args:
        image: ``(C, X, Y, Z)`` scan; ``label`` / ``prob`` / ``pred`` must share its grid.
        centre_mm: ``(3,)`` world RAS point (a lesion centroid of ``lesions.csv``).
        label: GT label map ``(1, X, Y, Z)``; lesion = any of ``lesion_labels``.
        prob: lesion probability ``(1, X, Y, Z)`` in [0, 1].
        pred: predicted label map ``(1, X, Y, Z)``; lesion = any of ``lesion_labels``.

    Returns:
        (planes, tilt of the voxel grid from RAS in degrees).
    """
    shape = image.shape
    ornt, tilt = ras_orientation(image.affine)
    from nibabel.orientations import inv_ornt_aff

    affine_ras = image.affine @ inv_ornt_aff(ornt, shape)
    spacing = np.linalg.norm(affine_ras[:3, :3], axis=0)
    arrays = {
        "image": _reorient(image.data[channel], ornt),
        "gt": _reorient(a, ornt) if (a := _as3d(label, shape, "label")) is not None else None,
        "prob": _reorient(a, ornt) if (a := _as3d(prob, shape, "probability")) is not None else None,
        "pred": _reorient(a, ornt) if (a := _as3d(pred, shape, "prediction")) is not None else None,
    }
    shape_ras = arrays["image"].shape
    centre_vox = (np.linalg.inv(affine_ras) @ np.r_[np.asarray(centre_mm, float), 1.0])[:3]
    idx = np.clip(np.rint(centre_vox).astype(int), 0, np.asarray(shape_ras) - 1)
    out = []
    for name in planes:
        fixed, h, v, sides = _PLANES[name]
        lo_h = max(0, math.floor(centre_vox[h] - half_width_mm / spacing[h]))
        hi_h = min(shape_ras[h], math.ceil(centre_vox[h] + half_width_mm / spacing[h]) + 1)
        lo_v = max(0, math.floor(centre_vox[v] - half_width_mm / spacing[v]))
        hi_v = min(shape_ras[v], math.ceil(centre_vox[v] + half_width_mm / spacing[v]) + 1)
        sel: list[Any] = [slice(None)] * 3
        sel[fixed] = int(idx[fixed])
        sel[h] = slice(lo_h, max(hi_h, lo_h + 1))
        sel[v] = slice(lo_v, max(hi_v, lo_v + 1))

        def cut(a: np.ndarray | None, sel: tuple = tuple(sel)) -> np.ndarray | None:
            # after fixing one axis the 2D array is (first remaining axis, second); h < v always here
            return None if a is None else np.ascontiguousarray(a[sel].T)

        gt = cut(arrays["gt"])
        pred_cut = cut(arrays["pred"])
        prob_cut = cut(arrays["prob"])
        plane_pos = affine_ras @ np.r_[idx.astype(float), 1.0]
        out.append(Plane(
            name=name,
            image=cut(arrays["image"]).astype(np.float32),  # type: ignore[union-attr]
            gt=np.isin(gt, lesion_labels) if gt is not None else None,
            pred=np.isin(pred_cut, lesion_labels) if pred_cut is not None else None,
            prob=prob_cut.astype(np.float32) if prob_cut is not None else None,
            xs=(np.arange(sel[h].start, sel[h].stop) - centre_vox[h]) * spacing[h],
            ys=(np.arange(sel[v].start, sel[v].stop) - centre_vox[v]) * spacing[v],
            sides=sides,
            position_mm=float(plane_pos[fixed]),
            normal=_AXIS_NAME[fixed],
            index=int(idx[fixed]),
            n_slices=int(shape_ras[fixed]),
            spacing=(float(spacing[h]), float(spacing[v])),
        ))
    return out, tilt


# ------------------------------------------------------------------------------------------------ drawing


def _edges(c: np.ndarray, step: float) -> tuple[float, float]:
    return float(c[0] - step / 2), float(c[-1] + step / 2)


def _contour(ax: Axes, mask: np.ndarray | None, plane: Plane, color: str, lw: float,
             style: str = "solid") -> bool:
    """Outline ``mask`` along voxel edges; False when there is nothing to draw."""
    if mask is None or not mask.any() or mask.all():
        return False
    f = _UPSAMPLE
    up = np.kron(mask.astype(np.float32), np.ones((f, f), np.float32))
    up = np.pad(up, 1)  # a mask touching the crop border is still closed
    sx, sy = plane.spacing
    x0, _ = _edges(plane.xs, sx)
    y0, _ = _edges(plane.ys, sy)
    xs = x0 + (np.arange(up.shape[1]) - 0.5) * sx / f
    ys = y0 + (np.arange(up.shape[0]) - 0.5) * sy / f
    ax.contour(xs, ys, up, levels=[0.5], colors=[color], linewidths=lw, linestyles=style)
    return True


def _prob_rgba(prob: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    p = np.clip(np.nan_to_num(prob), 0.0, 1.0)
    rgba = colormaps[PROB_CMAP](p)
    rgba[..., 3] = np.where(p >= PROB_FLOOR, 0.25 + 0.4 * p, 0.0)
    return rgba


def _draw_plane(ax: Axes, plane: Plane, window: Window, half_width_mm: float, *,
                candidate_threshold: float | None, gap_mm: float, letters: bool = True,
                letter_size: float = 9) -> None:
    sx, sy = plane.spacing
    extent = (*_edges(plane.xs, sx), *_edges(plane.ys, sy))
    ax.set_facecolor("black")
    ax.imshow(plane.image, cmap="gray", vmin=window.lo, vmax=window.hi, origin="lower", extent=extent,
              interpolation="nearest")
    if plane.prob is not None:
        ax.imshow(_prob_rgba(plane.prob), origin="lower", extent=extent, interpolation="nearest")
        if candidate_threshold is not None:
            _contour(ax, plane.prob >= candidate_threshold, plane, CAND_COLOR, 1.0, "dashed")
    _contour(ax, plane.pred, plane, PRED_COLOR, 1.3)
    _contour(ax, plane.gt, plane, GT_COLOR, 1.3)
    h = half_width_mm
    gap = max(gap_mm, 2.0)
    for seg in (((-h, -gap), (0, 0)), ((gap, h), (0, 0)), ((0, 0), (-h, -gap)), ((0, 0), (gap, h))):
        ax.plot(*seg, color=CROSS_COLOR, lw=0.8, alpha=0.8)
    ax.set_xlim(h, -h)  # inverted: radiological convention (see the module docstring)
    ax.set_ylim(-h, h)
    ax.set_aspect("equal")
    if letters:
        kw = {"color": "yellow", "fontsize": letter_size, "fontweight": "bold", "transform": ax.transAxes}
        left, right, bottom, top = plane.sides
        ax.text(0.02, 0.5, left, ha="left", va="center", **kw)
        ax.text(0.98, 0.5, right, ha="right", va="center", **kw)
        ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **kw)
        ax.text(0.5, 0.98, top, ha="center", va="top", **kw)


def _legend_handles(has_prob: bool, candidate_threshold: float | None) -> list:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=GT_COLOR, lw=1.5, label="GT lesion"),
               Line2D([], [], color=PRED_COLOR, lw=1.5, label="predicted lesion (label map)")]
    if has_prob and candidate_threshold is not None:
        handles.append(Line2D([], [], color=CAND_COLOR, lw=1.2, ls="--",
                              label=f"candidate: probability >= {candidate_threshold:g}"))
    handles.append(Line2D([], [], color=CROSS_COLOR, lw=1, label="centre"))
    return handles


def _new_figure(figsize: tuple[float, float], dpi: int = 100) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def triplanar(image: Volume, label: Volume | None, prob: Volume | None, centre_mm: Sequence[float], *,
              pred: Volume | None = None, lesion_labels: Sequence[int] = (2,), channel: int = 0,
              channel_name: str = "CT", window: Window | None = None, half_width_mm: float = 30.0,
              candidate_threshold: float | None = None, gap_mm: float = 4.0, title: str = "") -> Figure:
    """Axial, coronal and sagittal views centred on ``centre_mm`` with contours and the probability map.

    Args:
        image: ``(C, X, Y, Z)`` scan (e.g. HU); ``channel`` is shown.
        label: GT label map ``(1, X, Y, Z)`` on the same grid (None: no GT contour).
        prob: lesion probability ``(1, X, Y, Z)`` in [0, 1] (None: no overlay).
        centre_mm: ``(3,)`` world RAS point, mm (a centroid from ``lesions.csv``).
        pred: predicted label map ``(1, X, Y, Z)`` (None: no red contour).
        lesion_labels: label values that are lesion in ``label`` and ``pred``.
        channel_name: decides the window when ``window`` is None (CT: W400/L40 HU, else percentiles).
        half_width_mm: field of view, +- mm around the centre.
        candidate_threshold: draw ``prob >= threshold`` (the candidate extraction threshold), dashed.
        gap_mm: radius of the crosshair's gap around the centre (e.g. the lesion radius).
        title: figure title (e.g. scan, lesion id, outcome, size, score).

    Returns:
        A Figure whose axes labelled ``axial``, ``coronal`` and ``sagittal`` hold the views (plus a
        colour-bar axes for the probability when ``prob`` is given).
    """
    window = window or intensity_window(channel_name, image.data[channel])
    planes, tilt = extract_planes(image, centre_mm, label=label, prob=prob, pred=pred,
                                  lesion_labels=lesion_labels, channel=channel, half_width_mm=half_width_mm)
    fig = _new_figure((12.5, 5.0))
    widths = [1, 1, 1, 0.05] if prob is not None else [1, 1, 1]
    grid = fig.add_gridspec(1, len(widths), width_ratios=widths, left=0.05, right=0.95, top=0.80,
                            bottom=0.17, wspace=0.3)
    for i, plane in enumerate(planes):
        ax = fig.add_subplot(grid[0, i], label=plane.name)
        _draw_plane(ax, plane, window, half_width_mm, candidate_threshold=candidate_threshold, gap_mm=gap_mm)
        axis = plane.normal.split(" ")[0]
        ax.set_title(f"{plane.name}  {axis} = {plane.position_mm:.1f} mm  (slice {plane.index + 1}/"
                     f"{plane.n_slices})", fontsize=9)
        left, _, _, top = plane.sides
        voxel = f"{plane.spacing[0]:.2g} x {plane.spacing[1]:.2g} mm"
        ax.set_xlabel(f"mm from centre, + toward {left}  (voxel {voxel})", fontsize=8)
        ax.set_ylabel(f"mm, + toward {top}", fontsize=8)
        ax.tick_params(labelsize=7)
    if prob is not None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        cax = fig.add_subplot(grid[0, 3], label="colorbar")
        cb = fig.colorbar(ScalarMappable(Normalize(0, 1), PROB_CMAP), cax=cax)
        cb.set_label(f"lesion probability (shown >= {PROB_FLOOR:g})", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    note = f"window {window.label}"
    if tilt > 1.0:
        note += f"; oblique scan: voxel planes nearest to each view, tilted {tilt:.0f} deg"
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=10)
    fig.legend(handles=_legend_handles(prob is not None, candidate_threshold), loc="lower center",
               ncol=4, fontsize=8, frameon=False)
    return fig


# ------------------------------------------------------------------------------------------------ gallery


@dataclass(frozen=True)
class Tile:
    """One gallery entry: an axial :class:`Plane`, its window, caption and settings."""

    plane: Plane
    window: Window
    caption: str
    half_width_mm: float
    candidate_threshold: float | None = None
    gap_mm: float = 3.0


def axial_tile(image: Volume, label: Volume | None, prob: Volume | None, centre_mm: Sequence[float], *,
               pred: Volume | None = None, lesion_labels: Sequence[int] = (2,), channel: int = 0,
               window: Window, half_width_mm: float = 15.0, candidate_threshold: float | None = None,
               gap_mm: float = 3.0, caption: str = "") -> Tile:
    """Cut the axial crop of one lesion now (so a scan can be released before the gallery is drawn)."""
    (plane,), _ = extract_planes(image, centre_mm, label=label, prob=prob, pred=pred,
                                 lesion_labels=lesion_labels, channel=channel, half_width_mm=half_width_mm,
                                 planes=("axial",))
    return Tile(plane, window, caption, half_width_mm, candidate_threshold, gap_mm)


def gallery(tiles: Sequence[Tile], *, title: str = "", ncols: int = 6,
            empty_text: str = "nothing to show") -> Figure:
    """A grid of axial crops (one per lesion), each with a caption and a 5 mm scale bar.

    An empty ``tiles`` gives a small figure saying ``empty_text`` (so an export always has its file).
    """
    if not tiles:
        fig = _new_figure((6, 1.6))
        ax = fig.add_subplot(label="empty")  # an axes, so that Jupyter renders the figure at all
        ax.set_axis_off()
        ax.text(0.5, 0.4, empty_text, ha="center", va="center", fontsize=11, transform=ax.transAxes)
        if title:
            fig.suptitle(title, fontsize=11)
        return fig
    ncols = max(1, min(ncols, len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    has_prob = any(t.plane.prob is not None for t in tiles)
    thr = next((t.candidate_threshold for t in tiles if t.candidate_threshold is not None), None)
    top_in, bottom_in = 0.95, 0.45
    height = 2.55 * nrows + top_in + bottom_in
    fig = _new_figure((max(2.3 * ncols, 6.5), height))
    grid = fig.add_gridspec(nrows, ncols, left=0.01, right=0.99, top=1 - top_in / height,
                            bottom=bottom_in / height, wspace=0.05, hspace=0.3)
    for i, tile in enumerate(tiles):
        ax = fig.add_subplot(grid[i // ncols, i % ncols], label=f"tile{i}")
        _draw_plane(ax, tile.plane, tile.window, tile.half_width_mm,
                    candidate_threshold=tile.candidate_threshold, gap_mm=tile.gap_mm, letter_size=7)
        h = tile.half_width_mm
        ax.plot([h * 0.92, h * 0.92 - SCALE_BAR_MM], [-h * 0.88] * 2, color="white", lw=2)  # from the left
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(tile.caption, fontsize=7)
    windows = sorted({t.window.label for t in tiles})
    widths = sorted({t.half_width_mm for t in tiles})
    fov = f"+-{widths[0]:.0f}" + ("" if widths[-1] - widths[0] < 0.5 else f" to {widths[-1]:.0f}")
    info = (f"axial crops {fov} mm (wider for larger lesions); bar = {SCALE_BAR_MM:g} mm; "
            f"window {', '.join(windows)}")
    fig.suptitle(f"{title}\n{info}" if title else info, fontsize=10)
    fig.legend(handles=_legend_handles(has_prob, thr), loc="lower center", ncol=4, fontsize=8, frameon=False)
    return fig


# ------------------------------------------------------------------------------------------------ FROC


def froc_figure(froc: pd.DataFrame, metrics: Mapping[str, Any]) -> Figure:
    """The stage's FROC picture (:func:`pipeline.evaluation.froc_plot.froc_figure`) redrawn from its files:
    ``froc`` is ``froc.csv`` (``fps_per_scan``, ``sensitivity``), ``metrics`` ``metrics.json``; the band
    joins the per-rate bootstrap intervals ``sensitivity_at_fp_ci95`` (all the JSON keeps)."""
    return draw_froc(froc["fps_per_scan"].to_numpy(float), froc["sensitivity"].to_numpy(float), metrics,
                     rate_band(metrics))
