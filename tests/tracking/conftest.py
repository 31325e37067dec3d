"""Shared fixtures: an isolated MLflow environment and a cheap per-test SQLite store."""

from __future__ import annotations

import shutil
import socket
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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def scan_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny model's ``best.pt`` with a real plan (1 channel; plan patch about 40 x 32 x 12).

    The weights do not matter for the serving contract (geometry, shapes, formats).
    """
    import torch

    from pipeline.config import config_from_dict
    from pipeline.data.synthetic import write_synthetic_dataset
    from pipeline.io.dataset import load_dataset
    from pipeline.model.factory import build_model
    from pipeline.preprocessing.fingerprint import compute_fingerprint
    from pipeline.preprocessing.plan import make_plan
    from pipeline.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("scan_model")
    cfg = config_from_dict({
        "data": {"synthetic": {"n_cases": 4, "shape": [40, 36, 12], "lesion_free_fraction": 0.0}},
        "train": {"model": {"base_filters": 4, "max_filters": 16}},
        "tracking": {"enabled": False},
        "inference": {"overlap": 0.25, "device": "cpu"},
        "paths": {"raw": str(root / "raw")},
    })
    write_synthetic_dataset(root / "raw", cfg.data.synthetic, progress=False)
    ds = load_dataset(cfg.data, cfg.paths.raw)
    plan = make_plan(compute_fingerprint(ds, [c.case_id for c in ds.training], cfg.data, 1), ds, cfg)
    torch.manual_seed(0)
    model = build_model(cfg.train.model, plan, 1, int(plan["n_classes"]))
    path = root / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "plan": plan,
                           "operating_point": {"threshold": 0.5}})
    return path
