"""Static PNG exports of the inspection views, written by the evaluate stage (``lesion_views/``).

For users who do not open the notebook::

    lesion_views/
      index.md                       # what is where, with the table of every exported lesion
      index.csv                      # file, kind, scan, id, diameter_mm, score, centroid (RAS mm)
      missed_gallery.png             # axial crops of the missed lesions (largest first)
      false_positives_gallery.png    # axial crops of the highest-scoring false positives
      missed/<scan>_lesion<id>.png   # tri-planar views, up to max_views
      false_positives/<rank>_<scan>_candidate<id>.png

The folder is always written, also with nothing to show (the galleries then say so), and it is written
as a whole (:func:`pipeline.io.atomic.atomic_dir`): a failure leaves the previous folder untouched.
Each scan is read once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.inspection import table as T
from pipeline.inspection.scans import ScanLoader, lesion_tile, lesion_view
from pipeline.inspection.views import Tile, gallery
from pipeline.io.atomic import atomic_dir

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pipeline.config import Config
    from pipeline.io.dataset import Dataset

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["file", "kind", "scan", "id", "diameter_mm", "volume_mm3", "score", "at_operating_point",
                 "centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]
GALLERY_MAX_TILES = 48


def _save(fig: Figure, path: Path, dpi: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)


def _index_md(cases: Sequence[str], metrics: dict[str, Any], entries: pd.DataFrame, n_missed: int, n_fp: int,
              note: str) -> str:
    counts = (f"Test scans: {len(cases)}; GT lesions: {metrics.get('lesions_total', '?')}; "
              f"missed: {n_missed}; false-positive candidates: {n_fp}.")
    lines = ["# Lesion views", "", counts, ""]
    if note:
        lines += [note, ""]
    lines += [
        "* [missed_gallery.png](missed_gallery.png): axial crops of the missed lesions, largest first.",
        "* [false_positives_gallery.png](false_positives_gallery.png): the highest-scoring false positives.",
        ("* Tri-planar views (axial / coronal / sagittal, radiological orientation): GT contour green, "
         "predicted label map red, candidate extent (probability >= extraction threshold) dashed orange, "
         "lesion probability as colour overlay."),
        "",
    ]
    if entries.empty:
        lines.append("No tri-planar views: nothing was missed and there are no false positives.")
    else:
        lines += ["| view | kind | scan | id | diameter (mm) | score |", "| --- " * 6 + "|"]
        for r in entries.itertuples(index=False):
            score = "" if pd.isna(r.score) else f"{r.score:.3f}"
            lines.append(f"| [{r.file}]({r.file}) | {r.kind} | {r.scan} | {r.id} | {r.diameter_mm:.1f} "
                         f"| {score} |")
    return "\n".join(lines) + "\n"


def export_lesion_views(cfg: Config, ds: Dataset, test_ids: Sequence[str], eval_dir: str | Path,
                        out_dir: str | Path, max_views: int = 20) -> Path:
    """Write the PNG views of the missed lesions and top false positives of an evaluated run.

    Args:
        cfg: the config (``paths.predictions``, ``data.lesion_labels``, ``data.label_remap``).
        ds: the data set (images, GT labels).
        test_ids: the evaluated scans (rows of other scans are ignored).
        eval_dir: folder with the evaluate stage's ``lesions.csv`` and ``metrics.json``.
        out_dir: the folder to (re)write, e.g. ``<eval_dir>/lesion_views``.
        max_views: tri-planar views per kind (missed lesions, false positives).

    Returns:
        The path of ``index.md``.
    """
    eval_dir, out_dir = Path(eval_dir), Path(out_dir)
    metrics_path, lesions_path = eval_dir / "metrics.json", eval_dir / "lesions.csv"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    note = ""
    if lesions_path.is_file():
        df = T.read_lesion_table(lesions_path, metrics)
    else:
        note = f"{lesions_path} not found: nothing to show."
        df = T.lesion_table(pd.DataFrame())
    df = df[df["scan"].isin(list(test_ids))]
    missed, fps = T.missed(df), T.false_positives(df)
    thr = metrics.get("settings", {}).get("extraction_threshold", cfg.evaluation.extraction_threshold)
    lesion_labels = tuple(cfg.data.lesion_labels)
    views = [(r, f"missed/{r['scan']}_lesion{int(r['id'])}.png")
             for r in missed.head(max_views).to_dict("records")]
    views += [(r, f"false_positives/{i + 1:02d}_{r['scan']}_candidate{int(r['id'])}.png")
              for i, r in enumerate(fps.head(max_views).to_dict("records"))]
    tile_rows = {"missed": missed.head(GALLERY_MAX_TILES).to_dict("records"),
                 "false_positives": fps.head(GALLERY_MAX_TILES).to_dict("records")}
    tiles: dict[str, dict[int, Tile]] = {k: {} for k in tile_rows}
    entries = []
    scans = sorted({str(r["scan"]) for r, _ in views}
                   | {str(r["scan"]) for rows in tile_rows.values() for r in rows})
    kw = {"lesion_labels": lesion_labels, "candidate_threshold": thr}
    loader = ScanLoader(ds, cfg.paths.predictions, cfg.data.label_remap, cache_size=1)
    with atomic_dir(out_dir) as tmp:
        for scan in scans:  # scan by scan: each is read once and released before the next
            data = loader(scan)
            for kind, rows in tile_rows.items():
                for i, row in enumerate(rows):
                    if str(row["scan"]) == scan:
                        tiles[kind][i] = lesion_tile(data, row, **kw)
            for row, name in views:
                if str(row["scan"]) == scan:
                    _save(lesion_view(data, row, **kw), tmp / name)
                    entries.append({"file": name, **{c: row[c] for c in INDEX_COLUMNS[1:]}})
        n = len(test_ids)
        missed_tiles = [tiles["missed"][i] for i in sorted(tiles["missed"])]
        fp_tiles = [tiles["false_positives"][i] for i in sorted(tiles["false_positives"])]
        _save(gallery(missed_tiles, title=f"Missed lesions ({len(missed_tiles)} of {len(missed)}, "
                                          "largest first)",
                      empty_text=f"no missed lesions in {n} test scan(s)"), tmp / "missed_gallery.png")
        _save(gallery(fp_tiles, title=f"Highest-scoring false positives ({len(fp_tiles)} of {len(fps)})",
                      empty_text=f"no false-positive candidates in {n} test scan(s)"),
              tmp / "false_positives_gallery.png")
        index = pd.DataFrame(entries, columns=INDEX_COLUMNS)
        if not index.empty:
            index["kind"] = index["kind"].astype(str)
            index = index.sort_values(["file"], kind="stable")
        index.to_csv(tmp / "index.csv", index=False, float_format="%.6g")
        (tmp / "index.md").write_text(_index_md(test_ids, metrics, index, len(missed), len(fps), note))
    log.info("lesion views: %d tri-planar PNGs and 2 galleries in %s", len(entries), out_dir)
    return out_dir / "index.md"
