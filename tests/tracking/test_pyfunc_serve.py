"""The registered model behind ``mlflow models serve``, called through its REST endpoint on loopback.

``mlflow models serve -m models:/scan-model@champion --env-manager local --workers 1 -p <free port>`` runs
in its own process group, which is stopped as a whole; every wait is bounded. The request is the JSON a
user would send (``dataframe_records``), with a scan of an odd size and an oblique affine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pipeline.config import TrackingConfig
from pipeline.io import make_affine
from pipeline.tracking import create_tracker
from tests.tracking.mlflow_process import mlflow_process

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 120


@contextlib.contextmanager
def model_server(model_uri: str, store_uri: str, root: Path) -> Iterator[str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": store_uri,
           "MLFLOW_REGISTRY_URI": store_uri, "RARE_LESION_DEVICE": "cpu",
           # mlflow execs `uvicorn` by name: the venv's bin must be on PATH even when it is not activated
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with mlflow_process(lambda port: ["models", "serve", "-m", model_uri, "--env-manager", "local",
                                      "--workers", "1", "--host", "127.0.0.1", "-p", str(port)],
                        "/ping", root, env, START_TIMEOUT_S, log_name="serve.log") as url:
        yield url


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_served_model_returns_maps_in_the_input_geometry(tmp_path, scan_checkpoint, _template_db):
    shutil.copy(_template_db, tmp_path / "mlflow.db")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = create_tracker(TrackingConfig(tracking_uri=store, experiment="serve"))
    with tracker.start("train") as run:
        info = run.log_scan_model(scan_checkpoint, 1, "scan-model")
        run.promote("scan-model", info["registered_model_version"], 0.5, "champion")

    shape = (67, 53, 21)
    rng = np.random.default_rng(1)
    image = rng.normal(40, 30, size=(1, *shape)).round(2)
    affine = make_affine((0.7, 0.9, 2.7), (-20.5, 14.25, -70.0),
                         Rotation.from_euler("xyz", [10, -6, 25], degrees=True).as_matrix())
    with model_server("models:/scan-model@champion", store, tmp_path) as url:
        status, body = _post(url, {"dataframe_records": [{"image": image.tolist(), "affine": affine.tolist()}]})
        assert status == 200, body
        (pred,) = body["predictions"]
        assert np.asarray(pred["probability"]).shape == shape
        assert np.asarray(pred["labels"]).shape == shape
        np.testing.assert_allclose(np.asarray(pred["affine"]), affine)
        prob = np.asarray(pred["probability"])
        assert 0.0 <= prob.min() and prob.max() <= 1.0

        status, body = _post(url, {"dataframe_records": [{"path": str(tmp_path / "missing.nii.gz")}]})
        assert status == 400 and "does not exist" in body["message"]
