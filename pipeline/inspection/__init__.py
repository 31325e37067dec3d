"""Inspecting an evaluated run lesion by lesion: tables, tri-planar views, galleries, the FROC curve.

* :mod:`~pipeline.inspection.run` -- :func:`load_run` finds a run (workspace outputs or an MLflow run)
  and returns :class:`RunOutputs` (config, data set, metrics, lesion table, FROC table, scan loader).
* :mod:`~pipeline.inspection.table` -- the per-lesion table (TP / missed / FP) and its filters.
* :mod:`~pipeline.inspection.views` -- pure plotting: :func:`triplanar`, :func:`gallery`, :func:`froc_figure`.
* :mod:`~pipeline.inspection.scans` -- reading a scan once and drawing table rows.
* :mod:`~pipeline.inspection.export` -- the evaluate stage's static PNGs (``lesion_views/``).

The notebook ``notebooks/inspect_predictions.ipynb`` only calls these.
"""

from pipeline.inspection.run import RunOutputs, load_run
from pipeline.inspection.table import (
    detected,
    false_positives,
    filter_lesions,
    lesion_table,
    missed,
    read_lesion_table,
)

__all__ = [
    "RunOutputs",
    "detected",
    "false_positives",
    "filter_lesions",
    "lesion_table",
    "load_run",
    "missed",
    "read_lesion_table",
]
