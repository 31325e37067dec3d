"""Fixtures for the training tests; the data set itself is built by :mod:`tests.training.tiny_data`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .tiny_data import TinyTrainData, write_tiny_preprocessed

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def tiny_train_data(tmp_path: Path) -> TinyTrainData:
    """3 training scans, 1 validation scan, patch 16 x 16 x 8, batch 2; 2 epochs of 3 steps, no workers."""
    return write_tiny_preprocessed(tmp_path / "data")


@pytest.fixture(autouse=True)
def _no_inherited_dist_env(monkeypatch):
    """In-process training must not think it runs under torchrun."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
