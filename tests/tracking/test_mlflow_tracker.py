"""The stage's tracker: what create_tracker returns (no-op, MLflow, fallback) and the active-run rule."""

from __future__ import annotations

import logging
import time

import mlflow
import numpy as np
import pytest

from pipeline.config import TrackingConfig
from pipeline.tracking import Tracker, TrackingUnavailable, create_tracker


def test_disabled_or_nonzero_rank_is_a_noop(tmp_path, monkeypatch, closed_port):
    # an unreachable URI proves that nothing is even checked
    cfg = TrackingConfig(enabled=False, tracking_uri=f"http://127.0.0.1:{closed_port}")
    trackers = [create_tracker(cfg)]
    monkeypatch.setenv("RANK", "1")
    trackers.append(create_tracker(TrackingConfig(tracking_uri=f"http://127.0.0.1:{closed_port}")))
    for tracker in trackers:
        assert type(tracker) is Tracker and not tracker.enabled
        assert tracker.parent_run("k") is None
        with tracker.start("train", parent_run_id=None) as run:
            run.log_params({"a": 1})
            run.log_metrics({"m": 1.0}, step=0)
            run.log_artifact("does-not-matter")
            assert run.log_torch_model(None, np.zeros((1, 1, 2, 2, 2), np.float32), "x") is None
            assert run.run_id is None
        with pytest.raises(ValueError):  # exceptions still propagate
            with tracker.start("train"):
                raise ValueError
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, closed_port):
    uri = f"http://127.0.0.1:{closed_port}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable) as info:
        create_tracker(TrackingConfig(tracking_uri=uri))
    assert time.monotonic() - t0 < 10
    assert uri in str(info.value)
    assert "on_unreachable=fallback" in str(info.value)
    assert not (tmp_path / "mlflow.db").exists()  # nothing was recorded anywhere


def test_unreachable_server_env_uri_also_checked(monkeypatch, closed_port):
    uri = f"http://127.0.0.1:{closed_port}/"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingUnavailable, match=str(closed_port)):
        create_tracker(TrackingConfig())


def test_fallback_records_to_the_local_store(tmp_path, closed_port, caplog, _template_db):
    import shutil

    shutil.copy(_template_db, tmp_path / "mlflow.db")  # the local default store, in the cwd (tmp_path)
    uri = f"http://127.0.0.1:{closed_port}"
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        tracker = create_tracker(TrackingConfig(tracking_uri=uri, on_unreachable="fallback"))
    assert tracker.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracker.fallback_from == uri
    assert any(uri in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    with tracker.start("train") as run:
        run.log_metrics({"loss": 1.0}, step=0)
        run_id = run.run_id
    run = mlflow.MlflowClient(tracking_uri=tracker.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tracking.fallback_from"] == uri
    assert str(tmp_path / "mlartifacts") in run.info.artifact_uri


def test_logging_outside_a_run_is_an_error(new_tracker):
    tracker = new_tracker()
    with pytest.raises(RuntimeError, match="tracker.start"):
        tracker.log_metrics({"x": 1.0})
