"""The registered pyfunc model: a whole scan in (path, or array + affine), maps in the input's geometry out.

The model is logged once per module (through :meth:`MlflowTracker.log_scan_model`, as the train stage does)
into a SQLite store and loaded back with ``mlflow.pyfunc.load_model``, so what is tested is what serving
runs. The network is untrained: the contract is about shapes, geometry and formats.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

from pipeline.config import TrackingConfig
from pipeline.inference.loaded_model import load_model
from pipeline.inference.predict import predict_volume
from pipeline.io import Volume, make_affine, read_volume, write_volume
from pipeline.tracking import create_tracker

ODD_SHAPE = (67, 53, 21)  # no multiple of 16 (nor of the plan's patch): a traced model failed here


def _oblique_scan(shape=ODD_SHAPE, spacing=(0.7, 0.9, 2.7)) -> Volume:
    rng = np.random.default_rng(5)
    direction = Rotation.from_euler("xyz", [10, -6, 25], degrees=True).as_matrix()
    data = rng.normal(40, 30, size=(1, *shape)).astype(np.float32)
    return Volume(data, make_affine(spacing, (-20.5, 14.25, -70.0), direction))


@pytest.fixture(scope="module")
def logged(tmp_path_factory, scan_checkpoint, _template_db):
    """``(tracking uri, run id, logging result)`` of the scan model logged and registered as ``scan-model``."""
    import os

    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    root = tmp_path_factory.mktemp("pyfunc_store")
    shutil.copy(_template_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = create_tracker(TrackingConfig(tracking_uri=uri, experiment="pyfunc"))
    with tracker.start("train") as run:
        info = run.log_scan_model(scan_checkpoint, 1, "scan-model",
                                  version_tags={"git.commit": "abc123", "data.hash": "d41d8c"})
        run_id = run.run_id
    return uri, run_id, info


@pytest.fixture(scope="module")
def pyfunc(logged):
    import mlflow

    uri, _, _ = logged
    mlflow.set_registry_uri(uri)
    return mlflow.pyfunc.load_model("models:/scan-model/1")


def test_logged_model_is_registered_and_tagged(logged):
    import mlflow

    uri, run_id, info = logged
    assert info["registered_model_version"] == 1 and info["flavor"] == "pyfunc"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("scan-model", "1")
    assert version.tags["git.commit"] == "abc123"
    assert version.tags["data.hash"] == "d41d8c"
    assert version.tags["train_run_id"] == run_id
    assert client.get_run(run_id).data.tags["model.registered_model_version"] == "1"


@pytest.mark.filterwarnings("ignore:.*validate_serving_input.*:FutureWarning")  # what the scoring server calls
def test_signature_accepts_an_odd_shape_and_maps_come_back_on_the_input_grid(pyfunc, scan_checkpoint):
    """(67, 53, 21) oblique scan sent as REST JSON -> probability and labels of shape (67, 53, 21), the
    input's affine, and the same numbers as calling predict_volume directly."""
    from mlflow.models import convert_input_example_to_serving_input, validate_serving_input

    scan = _oblique_scan()
    row = {"image": scan.data.astype(np.float64).tolist(), "affine": scan.affine.tolist()}
    # the JSON body a REST client sends, parsed and enforced against the signature as the scoring server does
    serving = convert_input_example_to_serving_input(pd.DataFrame([row]))
    assert json.loads(serving)["dataframe_split"]["columns"] == ["image", "affine"]
    out = validate_serving_input("models:/scan-model/1", serving)

    prob, labels = np.asarray(out["probability"][0]), np.asarray(out["labels"][0])
    assert prob.shape == ODD_SHAPE and labels.shape == ODD_SHAPE
    assert np.allclose(np.asarray(out["affine"][0]), scan.affine)
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    assert np.issubdtype(labels.dtype, np.integer)

    loaded = load_model(scan_checkpoint, "cpu")
    direct = predict_volume(loaded, scan, loaded.cfg.inference)
    np.testing.assert_allclose(prob, direct.lesion_probability.data[0], atol=1e-6)
    np.testing.assert_array_equal(labels, direct.labels.data[0])


def test_a_path_input_writes_maps_with_the_input_geometry(pyfunc, tmp_path):
    scan = _oblique_scan(shape=(30, 27, 9))
    src = write_volume(tmp_path / "case_7.nii.gz", scan)
    out = pyfunc.predict(pd.DataFrame([{"path": str(src), "output_dir": str(tmp_path / "out")}]))
    assert out["probability_path"][0] == str(tmp_path / "out" / "probabilities" / "case_7.nii.gz")
    for column in ("probability_path", "labels_path"):
        written = read_volume(out[column][0])
        assert written.shape == (30, 27, 9)
        np.testing.assert_allclose(written.affine, read_volume(src).affine, atol=1e-5)


@pytest.mark.parametrize(("row", "message"), [
    ({"output_dir": "/tmp/x"}, "either 'path' or 'image'"),
    # a 3D array is refused by the signature itself (it declares 4 nested levels: channel first)
    ({"image": np.zeros((8, 8, 4)).tolist(), "affine": np.eye(4).tolist()}, "Array\\(Array\\(Array\\(Array"),
    ({"path": "/nonexistent/scan.nii.gz"}, "does not exist"),
    ({"image": np.zeros((2, 8, 8, 4)).tolist(), "affine": np.eye(4).tolist()}, "channel"),
])
def test_bad_input_is_a_clear_client_error(pyfunc, row, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=message) as err:
        pyfunc.predict(pd.DataFrame([row]))
    assert err.value.get_http_status_code() == 400
