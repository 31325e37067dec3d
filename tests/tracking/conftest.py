"""Shared fixtures: an isolated MLflow environment and a cheap per-test SQLite store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

_ENV_TO_CLEAR = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
    "RANK",
    "DVC_EXP_NAME",
    "DVC_EXP_BASELINE_REV",
    "DVC_STAGE",
    "DVC_ROOT",
)


@pytest.fixture(autouse=True)
def mlflow_env(monkeypatch, tmp_path):
    """No telemetry, no inherited tracking URI or rank; work in tmp_path so nothing lands in the repo."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for var in _ENV_TO_CLEAR:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    yield
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:  # a test that left a fluent run open must not leak it into the next one
        while mlflow.active_run() is not None:
            mlflow.end_run("KILLED")


@pytest.fixture(scope="session")
def _template_db(tmp_path_factory) -> Path:
    # creating MLflow's tables takes ~2 s: do it once and copy the file for each test
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store_uri(_template_db, tmp_path) -> str:
    """``sqlite:///<tmp_path>/store/mlflow.db``, already initialised."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(_template_db, db)
    return f"sqlite:///{db}"


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening (connections are refused at once)."""
    from tests.tracking.mlflow_process import free_port

    return free_port()


@pytest.fixture
def new_tracker(store_uri):
    """Build an :class:`MlflowTracker` on the test's store (each call: a new one, as a new stage process)."""
    from pipeline.config import TrackingConfig
    from pipeline.tracking import MlflowTracker, create_tracker

    def make(**cfg):
        tracker = create_tracker(TrackingConfig(tracking_uri=store_uri, **cfg))
        assert isinstance(tracker, MlflowTracker)
        return tracker

    return make


@pytest.fixture
def client(store_uri):
    """An ``MlflowClient`` of the test's store (runs and registry), to read back what a tracker logged."""
    import mlflow

    # without registry_uri the client would take the process-wide one, which an earlier test may have set
    return mlflow.MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)


@pytest.fixture(scope="session")
def scan_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny model's ``best.pt`` with a real plan (1 channel; plan patch about 40 x 32 x 12).

    The weights do not matter for the serving contract (geometry, shapes, formats).
    """
    from pipeline.config import config_from_dict
    from tests.inference.tiny_model import random_checkpoint, tiny_plan

    root = tmp_path_factory.mktemp("scan_model")
    cfg = config_from_dict({
        "data": {"synthetic": {"n_cases": 4, "shape": [40, 36, 12], "lesion_free_fraction": 0.0}},
        "train": {"model": {"base_filters": 4, "max_filters": 16}},
        "tracking": {"enabled": False},
        "inference": {"overlap": 0.25, "device": "cpu"},
        "paths": {"raw": str(root / "raw")},
    })
    return random_checkpoint(root / "best.pt", cfg, tiny_plan(cfg))
