"""pipeline/evaluation/froc_plot.py: one FROC drawing for the stage's PNG and the notebook."""

from __future__ import annotations

import numpy as np

from pipeline.evaluation.froc_plot import froc_figure, rate_band

RATES = ["0.125", "0.25", "0.5", "1", "2", "4", "8"]


def _metrics(threshold):
    op = {"target_fp_rate": 1.0, "fps_per_scan": 0.5, "sensitivity": 0.5, "threshold": threshold}
    return {"cpm": 0.5, "cpm_ci95": [0.25, 0.75], "lesions_total": 2, "scans_total": 2,
            "sensitivity_at_fp": dict.fromkeys(RATES, 0.5),
            "sensitivity_at_fp_ci95": {r: [0.0, 1.0] for r in RATES},
            "operating_points": [op], "operating_point": op}


def test_legend_axes_and_band():
    fig = froc_figure([0.0, 0.5, 1.0], [0.0, 0.5, 0.5], _metrics(0.25), rate_band(_metrics(0.25)))
    (ax,) = fig.axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["FROC (CPM 0.500, 95% CI 0.250-0.750)", "95% CI (bootstrap)", "operating points",
                      "chosen: 1 FP/scan, t=0.25"]
    assert ax.get_label() == "froc" and ax.get_xscale() == "log"
    assert ax.get_title() == "2 lesions, 2 scans"


def test_an_operating_point_without_threshold_is_labelled_not_crashed():
    fig = froc_figure([0.0, 0.5], [0.0, 0.5], _metrics(None))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[-1] == "chosen: 1 FP/scan, no threshold reaches it" and "95% CI (bootstrap)" not in legend


def test_no_lesions_says_so():
    fig = froc_figure([0.0], [np.nan], {**_metrics(0.5), "lesions_total": 0})
    assert fig.axes[0].texts[0].get_text() == "no lesions in the labels"


def test_rate_band_reads_the_per_rate_intervals_in_rate_order():
    rates, low, high = rate_band({"sensitivity_at_fp_ci95": {"8": [0.5, 1.0], "0.125": [0.0, 0.25]}})
    assert rates == [0.125, 8.0] and low == [0.0, 0.5] and high == [0.25, 1.0]
    assert rate_band({"sensitivity_at_fp_ci95": None}) is None
