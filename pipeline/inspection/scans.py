"""Reading a test scan with its GT and predictions, and turning table rows into figures.

:class:`ScanLoader` reads the image, GT label map, lesion probability and predicted label map of one
scan (original geometry, as the evaluate stage wrote them) and keeps the last few in memory, so drawing
several lesions of a scan reads it once. :func:`lesion_view` and :func:`lesion_gallery` draw rows of the
table of :mod:`pipeline.inspection.table` with :mod:`pipeline.inspection.views`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.inspection import views
from pipeline.inspection.table import centre_mm, describe
from pipeline.io.volume import Volume

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from pipeline.io.dataset import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanData:
    """One scan as the views need it; every volume on the image grid.

    Attributes:
        image: ``(C, X, Y, Z)`` scan.
        label: GT label map ``(1, X, Y, Z)`` (after the data set's label remap), or None.
        prob: lesion probability ``(1, X, Y, Z)`` float32, or None when not predicted.
        pred: predicted label map ``(1, X, Y, Z)``, or None when not predicted.
        window: display window of the shown channel.
    """

    scan: str
    image: Volume
    label: Volume | None
    prob: Volume | None
    pred: Volume | None
    window: views.Window


class ScanLoader:
    """``loader(scan) -> ScanData``, reading each scan once while it stays among the ``cache_size`` last.

    Args:
        ds: the data set (images and GT labels).
        predictions_dir: the evaluate stage's ``paths.predictions`` (``probabilities/`` and ``labels/``).
        label_remap: ``data.label_remap``.
        channel: image channel to show; its name (``ds.channel_names``) chooses the window.
    """

    def __init__(self, ds: Dataset, predictions_dir: str | Path, label_remap: Mapping[int, int] | None = None,
                 channel: int = 0, cache_size: int = 2) -> None:
        self.ds = ds
        self.predictions_dir = Path(predictions_dir)
        self.label_remap = dict(label_remap or {})
        self.channel = channel
        names = tuple(ds.channel_names)
        self.channel_name = names[channel] if channel < len(names) else "unknown"
        self._cache: OrderedDict[str, ScanData] = OrderedDict()
        self._size = max(1, cache_size)

    def _prediction(self, folder: str, scan: str, image: Volume) -> Volume | None:
        from pipeline.io.formats import read_volume
        from pipeline.io.volume import grid_mismatch

        path = self.predictions_dir / folder / f"{scan}.nii.gz"
        if not path.exists():
            log.warning("%s: no prediction file; the view shows no %s", path, folder)
            return None
        vol = read_volume(path)
        diff = grid_mismatch(vol, image)
        if diff:
            raise ValueError(f"{path}: grid differs from the scan's ({'; '.join(diff)}); "
                             "predictions must be in the original geometry")
        return vol

    def __call__(self, scan: str) -> ScanData:
        if scan in self._cache:
            self._cache.move_to_end(scan)
            return self._cache[scan]
        from pipeline.io.dataset import read_case_image, read_case_label

        case = self.ds.case(scan)
        image = read_case_image(case)
        label = read_case_label(case, self.label_remap) if case.label is not None else None
        data = ScanData(scan, image, label, self._prediction("probabilities", scan, image),
                        self._prediction("labels", scan, image),
                        views.intensity_window(self.channel_name, image.data[self.channel]))
        self._cache[scan] = data
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return data


def view_half_width_mm(diameter_mm: float) -> float:
    """Tri-planar field of view (+- mm): lesion and surroundings, at least 25 mm."""
    return max(25.0, 2.0 * float(diameter_mm))


def tile_half_width_mm(diameter_mm: float) -> float:
    """Gallery crop (+- mm): at least 12 mm."""
    return max(12.0, 1.2 * float(diameter_mm))


def lesion_view(scan: ScanData, row: Mapping[str, Any] | pd.Series, *, lesion_labels: Sequence[int],
                candidate_threshold: float | None = None, channel: int = 0,
                half_width_mm: float | None = None) -> Figure:
    """Tri-planar view of one table row (a lesion or a candidate), centred on its centroid."""
    diameter = float(row["diameter_mm"])
    return views.triplanar(scan.image, scan.label, scan.prob, centre_mm(row), pred=scan.pred,
                           lesion_labels=lesion_labels, channel=channel, window=scan.window,
                           half_width_mm=half_width_mm or view_half_width_mm(diameter),
                           candidate_threshold=candidate_threshold, gap_mm=diameter / 2 + 2.0,
                           title=describe(row))


def lesion_tile(scan: ScanData, row: Mapping[str, Any] | pd.Series, *, lesion_labels: Sequence[int],
                candidate_threshold: float | None = None, channel: int = 0) -> views.Tile:
    """The gallery crop (axial) of one table row."""
    d = float(row["diameter_mm"])
    return views.axial_tile(scan.image, scan.label, scan.prob, centre_mm(row), pred=scan.pred,
                            lesion_labels=lesion_labels, channel=channel, window=scan.window,
                            half_width_mm=tile_half_width_mm(d), candidate_threshold=candidate_threshold,
                            gap_mm=d / 2 + 1.5, caption=describe(row, short=True))


def lesion_tiles(rows: pd.DataFrame, loader: ScanLoader, *, lesion_labels: Sequence[int],
                 candidate_threshold: float | None = None) -> list[views.Tile]:
    """Axial crops of ``rows`` in their order; rows are visited scan by scan so each scan is read once."""
    records = rows.to_dict("records")
    order = sorted(range(len(records)), key=lambda i: str(records[i]["scan"]))
    tiles = {i: lesion_tile(loader(str(records[i]["scan"])), records[i], lesion_labels=lesion_labels,
                            candidate_threshold=candidate_threshold, channel=loader.channel) for i in order}
    return [tiles[i] for i in range(len(records))]


def lesion_gallery(rows: pd.DataFrame, loader: ScanLoader, *, lesion_labels: Sequence[int], title: str,
                   candidate_threshold: float | None = None, empty_text: str = "nothing to show",
                   ncols: int = 6) -> Figure:
    """A gallery of axial crops of ``rows`` (see :func:`pipeline.inspection.views.gallery`)."""
    tiles = lesion_tiles(rows, loader, lesion_labels=lesion_labels, candidate_threshold=candidate_threshold)
    return views.gallery(tiles, title=title, ncols=ncols, empty_text=empty_text)
