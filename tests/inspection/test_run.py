"""Locating and loading a run: workspace outputs and MLflow runs (a local SQLite store in a temp dir)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from inspection_workspace import EXPECTED
from matplotlib.contour import ContourSet

from pipeline.inspection import load_run
from pipeline.inspection.views import GT_COLOR


def test_workspace_run(workspace):
    run = load_run(workspace.root)  # configs/params.yaml there, relative paths resolved against the workdir
    assert run.source == "workspace" and run.run_id is None and run.warnings == []
    assert run.test_ids == ["scan_a", "scan_b", "scan_c"]
    counts = run.lesions["kind"].astype(str).value_counts().to_dict()
    assert counts == {k: EXPECTED[k] for k in ("TP", "missed", "FP")}
    assert run.candidate_threshold == 0.1 and run.lesion_labels == (2,)
    summary = run.summary()["value"]
    assert summary["lesions"] == EXPECTED["lesions"]
    assert summary["false-positive candidates"] == EXPECTED["FP"]
    assert summary["CPM 95% CI"].count("-") == 1
    assert list(run.froc.columns) == ["threshold", "fps_per_scan", "sensitivity"]


def test_views_of_table_rows_are_centred_on_the_lesion(workspace):
    """For each kind, the tri-planar view of a row has its GT (or candidate) outline around the centre."""
    run = load_run(workspace.root)
    for kind in ("missed", "TP"):
        row = run.lesions[run.lesions["kind"] == kind].iloc[0]
        fig = run.view(row)
        ax = next(a for a in fig.axes if a.get_label() == "axial")
        gt = [c for c in ax.collections if isinstance(c, ContourSet)
              and np.allclose(c.get_edgecolor()[0][:3], _rgb(GT_COLOR))]
        # ContourSet paths hold every outline of the level; split them into closed loops
        loops = [poly for c in gt for p in c.get_paths() for poly in p.to_polygons()]
        around = [v for v in loops if v[:, 0].min() < 0 < v[:, 0].max() and v[:, 1].min() < 0 < v[:, 1].max()]
        assert len(around) == 1, kind  # exactly one outline surrounds the centre: this lesion's
        v = around[0]
        # and it is centred on it: within one voxel (0.9 mm) of symmetric, on this 0.9 mm grid
        assert abs(v[:, 0].min() + v[:, 0].max()) < 1.0, kind
        assert abs(v[:, 1].min() + v[:, 1].max()) < 1.0, kind
        assert v[:, 0].max() > 1.0  # it has a size
    fp = run.lesions[run.lesions["kind"] == "FP"].index[0]
    fig = run.view(fp)  # by index
    assert "false positive" in fig._suptitle.get_text()
    assert [a.get_label() for a in run.missed_gallery().axes if a.get_label().startswith("tile")] == ["tile0"]
    assert len([a for a in run.false_positive_gallery(top=2).axes if a.get_label().startswith("tile")]) == 2
    assert run.froc_figure().axes[0].get_label() == "froc"


def _rgb(color: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(color)


def test_missing_outputs_and_predictions(workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match="run the evaluate stage"):
        load_run(tmp_path)
    copy = tmp_path / "ws"
    shutil.copytree(workspace.root, copy)
    (copy / "results" / "predictions" / "probabilities" / "scan_b.nii.gz").unlink()
    (copy / "results" / "predictions" / "labels" / "scan_b.nii.gz").unlink()
    run = load_run(copy)
    assert len(run.warnings) == 1 and "scan_b" in run.warnings[0]
    row = run.lesions[run.lesions["scan"] == "scan_b"].iloc[0]
    fig = run.view(row)  # still drawn: image and GT, no prediction
    ax = next(a for a in fig.axes if a.get_label() == "axial")
    assert len(ax.images) == 1


@pytest.fixture
def tracked_workspace(workspace, tmp_path, monkeypatch):
    """The workspace plus a local MLflow store (``<workdir>/mlflow.db``) with a train and an evaluate run
    whose ``evaluation/`` artifacts differ from the workspace's (one lesion row dropped)."""
    from pipeline.config import TrackingConfig
    from pipeline.tracking import create_tracker

    root = tmp_path / "ws"
    # the tracker's mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI: setenv first so that the
    # variable is restored (removed) after the test, then removed for load_run to find <workdir>/mlflow.db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    shutil.copytree(workspace.root, root)
    logged = tmp_path / "logged"
    shutil.copytree(root / "results" / "evaluation", logged)
    lines = (logged / "lesions.csv").read_text().splitlines()
    (logged / "lesions.csv").write_text("\n".join(lines[:-1]) + "\n")
    tracker = create_tracker(TrackingConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}"))
    with tracker.start("train") as run:
        run.log_params({"train.epochs": 1})
        train_id = run.run_id
    with tracker.start("evaluate", tags={"train_run_id": train_id}) as run:
        for name in ("metrics.json", "froc.csv", "lesions.csv"):
            run.log_artifact(logged / name, "evaluation")
        eval_id = run.run_id
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    return root, train_id, eval_id


def test_mlflow_runs(tracked_workspace):
    root, train_id, eval_id = tracked_workspace
    latest = load_run(root, run_id="latest")
    assert latest.source == f"mlflow run {eval_id}" and latest.run_id == eval_id
    assert len(latest.lesions) == len(load_run(root).lesions) - 1  # the logged table, not the workspace's
    assert latest.evaluation_dir != Path(latest.cfg.paths.evaluation)
    assert latest.warnings == []  # no models/mlflow_run.json in the workspace: nothing to compare
    by_train_id = load_run(root, run_id=train_id)  # a training run id leads to its evaluate run
    assert by_train_id.run_id == eval_id
    # a workspace model from another training run: the tables may not match the pictures
    (root / "models").mkdir()
    (root / "models" / "mlflow_run.json").write_text(json.dumps({"run_id": "0" * 32}))
    assert "workspace model" in load_run(root, run_id=eval_id).warnings[0]

    from pipeline.tracking import RunNotFound

    with pytest.raises(RunNotFound, match="not found"):
        load_run(root, run_id="f" * 32)
    with pytest.raises(RunNotFound, match="does not exist"):
        load_run(root.parent / "nothing_here", run_id="latest")
