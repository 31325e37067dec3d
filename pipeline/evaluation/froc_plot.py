"""The FROC figure, drawn one way for the evaluate stage's ``froc.png`` and the notebook.

Inputs are what the stage writes (the curve's vertices and the metrics dict of ``metrics.json``), so the
notebook redraws exactly the stage's picture from its files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _rate_items(d: Mapping[str, Any] | None) -> list[tuple[float, Any]]:
    """``{"0.125": v, ...}`` (FP-rate keys as written in metrics.json) sorted by rate."""
    return sorted(((float(k), v) for k, v in (d or {}).items()), key=lambda kv: kv[0])


def style_froc_axes(ax, rates, lo_x: float, hi_x: float, title: str) -> None:
    """Log2 FP axis ticked at the CPM rates, sensitivity 0..1."""
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo_x, hi_x)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(rates)
    ax.set_xticklabels([f"{r:g}" for r in rates])
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)


def froc_figure(fps_per_scan: Sequence[float], sensitivity: Sequence[float], metrics: Mapping[str, Any],
                band: tuple[Sequence[float], Sequence[float], Sequence[float]] | None = None,
                figsize: tuple[float, float] = (6.4, 4.6), dpi: int = 110) -> Figure:
    """FROC curve (log FP axis) with a 95% band, the CPM points and the operating points.

    Args:
        fps_per_scan, sensitivity: the curve's vertices (as in ``froc.csv``), drawn as the polyline the CPM
            interpolates, extended flat beyond its end.
        metrics: the ``metrics.json`` dict: ``cpm``, ``cpm_ci95``, ``lesions_total``, ``scans_total``,
            ``sensitivity_at_fp`` (``{rate: s}``), ``operating_points`` / ``operating_point`` (dicts with
            ``target_fp_rate``, ``fps_per_scan``, ``sensitivity``, ``threshold``; threshold may be None).
        band: ``(fps, low, high)`` of the 95% band (the bootstrap grid, or the per-rate intervals of
            ``sensitivity_at_fp_ci95`` when only the JSON is at hand); None: no band.

    Returns:
        A matplotlib Figure (Agg canvas, no pyplot state); its one axes is labelled ``"froc"``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(label="froc")
    sens_items = _rate_items(metrics.get("sensitivity_at_fp"))
    rates = np.array([r for r, _ in sens_items] or metrics.get("settings", {}).get("fp_rates", [0.125, 8.0]), float)
    lo_x, hi_x = rates[0] / 2, rates[-1] * 2
    n_les = int(metrics.get("lesions_total") or 0)
    fps = np.asarray(fps_per_scan, dtype=float)
    sens = np.asarray(sensitivity, dtype=float)
    if n_les and fps.size:
        x = np.r_[fps, max(hi_x, float(fps[-1]))]
        y = np.r_[sens, sens[-1]]
        cpm, ci = metrics.get("cpm"), metrics.get("cpm_ci95")
        label = f"FROC (CPM {cpm:.3f}" + (f", 95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ")")
        ax.plot(np.maximum(x, lo_x), y, color="C0", lw=1.8, label=label)
        if band is not None and len(band[0]) and np.isfinite(np.asarray(band[1:], dtype=float)).any():
            ax.fill_between(band[0], band[1], band[2], color="C0", alpha=0.2, lw=0, label="95% CI (bootstrap)")
        ax.plot(rates, [v for _, v in sens_items], "o", color="C0", ms=4)
        ops = metrics.get("operating_points") or []
        ax.plot([max(o["fps_per_scan"], lo_x) for o in ops], [o["sensitivity"] for o in ops], "s", mfc="none",
                color="C3", ms=6, label="operating points")
        op = metrics.get("operating_point")
        if op:
            thr = op.get("threshold")
            thr_text = f"t={thr:.3g}" if thr is not None else "no threshold reaches it"
            ax.plot([max(op["fps_per_scan"], lo_x)], [op["sensitivity"]], "*", color="C3", ms=11,
                    label=f"chosen: {op['target_fp_rate']:g} FP/scan, {thr_text}")
    else:
        ax.text(0.5, 0.5, "no lesions in the labels", ha="center", va="center", transform=ax.transAxes)
    style_froc_axes(ax, rates, lo_x, hi_x, f"{n_les} lesions, {metrics.get('scans_total', '?')} scans")
    fig.tight_layout()
    return fig


def rate_band(metrics: Mapping[str, Any]) -> tuple[list[float], list[float], list[float]] | None:
    """The band from ``metrics.json``'s per-rate intervals ``sensitivity_at_fp_ci95`` (None when absent)."""
    items = _rate_items(metrics.get("sensitivity_at_fp_ci95"))
    if not items or any(v is None for _, v in items):
        return None
    return [r for r, _ in items], [v[0] for _, v in items], [v[1] for _, v in items]
