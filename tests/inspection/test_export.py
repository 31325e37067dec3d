"""The evaluate stage's static PNG exports (``lesion_views/``) on the hand-made workspace."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.image import imread

from pipeline.config import Config
from pipeline.evaluation.report import LESION_COLUMNS
from pipeline.inspection import export as E
from pipeline.io.dataset import load_dataset


def setup(workspace) -> tuple[Config, object, Path]:
    root = workspace.root
    cfg = Config()
    paths = cfg.paths.model_copy(update={k: str(root / v) for k, v in cfg.paths.model_dump().items()})
    cfg = cfg.model_copy(update={"paths": paths})
    return cfg, load_dataset(cfg.data, cfg.paths.raw), Path(cfg.paths.evaluation)


def png_ok(path: Path) -> bool:
    img = imread(path)
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300 and float(img[..., :3].std()) > 0.01


def test_export_writes_views_galleries_and_index(workspace, tmp_path, monkeypatch):
    from pipeline.inspection import scans

    cfg, ds, eval_dir = setup(workspace)
    reads: list[str] = []
    real = scans.ScanLoader.__call__

    def counting(self, scan):  # count actual reads (cache misses)
        if scan not in self._cache:
            reads.append(scan)
        return real(self, scan)

    monkeypatch.setattr(scans.ScanLoader, "__call__", counting)
    out = tmp_path / "lesion_views"
    index_md = E.export_lesion_views(cfg, ds, workspace.test_ids, eval_dir, out)
    assert index_md == out / "index.md"
    assert sorted(reads) == ["scan_a", "scan_b", "scan_c"]  # each scan read once

    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["false_positives/01_scan_b_candidate2.png", "false_positives/02_scan_a_candidate1.png",
                     "false_positives/03_scan_c_candidate1.png", "false_positives_gallery.png", "index.csv",
                     "index.md", "missed/scan_a_lesion1.png", "missed_gallery.png"]
    assert all(png_ok(out / f) for f in files if f.endswith(".png"))
    index = pd.read_csv(out / "index.csv")
    assert list(index.columns) == E.INDEX_COLUMNS
    assert index["kind"].tolist() == ["FP", "FP", "FP", "missed"]
    assert index["score"].iloc[:3].is_monotonic_decreasing
    text = index_md.read_text()
    for f in index["file"]:
        assert f"[{f}]({f})" in text
    assert "missed: 1; false-positive candidates: 3" in text
    assert not list(tmp_path.glob(".lesion_views*"))  # no temporary folder left behind


def test_export_limits_views_but_not_galleries(workspace, tmp_path):
    cfg, ds, eval_dir = setup(workspace)
    out = tmp_path / "views"
    E.export_lesion_views(cfg, ds, workspace.test_ids, eval_dir, out, max_views=1)
    assert pd.read_csv(out / "index.csv")["file"].tolist() == ["false_positives/01_scan_b_candidate2.png",
                                                             "missed/scan_a_lesion1.png"]
    # only the test scans count: rows of scans outside test_ids are ignored
    E.export_lesion_views(cfg, ds, ["scan_c"], eval_dir, out)
    assert pd.read_csv(out / "index.csv")["file"].tolist() == ["false_positives/01_scan_c_candidate1.png"]


def test_export_with_nothing_to_show(workspace, tmp_path):
    """No missed lesion and no false positive (or no lesions.csv at all): the folder still exists."""
    cfg, ds, eval_dir = setup(workspace)
    ev = tmp_path / "evaluation"
    ev.mkdir()
    shutil.copy(eval_dir / "metrics.json", ev)
    pd.DataFrame(columns=LESION_COLUMNS).to_csv(ev / "lesions.csv", index=False)
    out = ev / "lesion_views"
    E.export_lesion_views(cfg, ds, workspace.test_ids, ev, out)
    assert sorted(p.name for p in out.iterdir()) == ["false_positives_gallery.png", "index.csv", "index.md",
                                                     "missed_gallery.png"]
    assert pd.read_csv(out / "index.csv").empty
    assert "No tri-planar views" in (out / "index.md").read_text()
    assert png_ok(out / "missed_gallery.png") or imread(out / "missed_gallery.png").shape[0] > 50
    (ev / "lesions.csv").unlink()
    E.export_lesion_views(cfg, ds, workspace.test_ids, ev, out)
    assert "lesions.csv not found" in (out / "index.md").read_text()


def test_a_failed_export_leaves_the_previous_folder_untouched(workspace, tmp_path, monkeypatch):
    cfg, ds, eval_dir = setup(workspace)
    out = tmp_path / "lesion_views"
    E.export_lesion_views(cfg, ds, workspace.test_ids, eval_dir, out, max_views=1)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(*args, **kwargs)

    original = E.lesion_view
    monkeypatch.setattr(E, "lesion_view", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        E.export_lesion_views(cfg, ds, workspace.test_ids, eval_dir, out)
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lesion_views"]  # no half-written sibling
