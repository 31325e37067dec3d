"""The registered model: an MLflow ``pyfunc`` that takes a whole scan and returns its lesion maps.

It wraps the pipeline's own inference (:func:`pipeline.inference.loaded_model.load_model` +
:func:`~pipeline.inference.predict.predict_volume`): the checkpoint's plan reorients, crops, normalises
and resamples the scan, the sliding window predicts, and the inverse mapping puts the probability and
label maps back on the **input's grid** (same shape, same affine). No traced or exported graph is
involved, so any scan size works (a traced network fails with ``Guard failed`` on a size it was not
traced with).

Input: a table with one row per scan (``dataframe_records`` over REST), either

- ``path``: a scan file or DICOM folder readable on the serving machine (NIfTI, NRRD, MHA/MHD, DICOM), or
- ``image`` ``(C, X, Y, Z)`` nested lists of numbers (channel first, even for one channel) **and**
  ``affine``: the 4x4 voxel-to-world matrix (RAS+, mm; nibabel's ``img.affine``);

plus optionally ``output_dir``: write ``<output_dir>/{probabilities,labels}/<name>.nii.gz`` and return
their paths instead of the arrays (for large scans: a 512x512x300 map is ~80 M numbers of JSON).

Output: one row per scan with ``probability`` ``(X, Y, Z)`` float (any lesion class), ``labels``
``(X, Y, Z)`` int (post-processed at the validation operating point), ``affine`` (the input's), and
``probability_path`` / ``labels_path`` (when ``output_dir`` was given).

Example (REST, after ``mlflow models serve -m models:/rare-lesion-unet@champion --env-manager local``)::

    curl -d '{"dataframe_records": [{"path": "/data/case_007.nii.gz"}]}' \\
         -H 'Content-Type: application/json' http://127.0.0.1:5000/invocations

This module imports mlflow at import time (the model class must subclass ``PythonModel``); only
:mod:`pipeline.tracking.model_logging` (which logs it) imports it, lazily.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Array

log = logging.getLogger(__name__)

DEVICE_ENV = "RARE_LESION_DEVICE"  # overrides the serving device ("cpu", "cuda", "cuda:1"; default auto)
DIST_NAME = "rare-lesion-pipeline"
_FALLBACK_REQUIREMENTS = ["torch", "monai", "numpy", "scipy", "scikit-image", "SimpleITK", "nibabel",
                          "connected-components-3d", "pydantic", "PyYAML", "tqdm", "pandas", "mlflow"]
# the serving side needs neither the pipeline orchestration nor plotting
_NOT_NEEDED = {"dvc", "matplotlib"}


def _nested(depth: int, dtype: str) -> Any:
    t: Any = dtype
    for _ in range(depth):
        t = Array(t)
    return t


def scan_signature() -> ModelSignature:
    """The signature: what :class:`ScanSegmenter` accepts and returns (see the module docstring)."""
    inputs = Schema([
        ColSpec("string", "path", required=False),
        ColSpec(_nested(4, "double"), "image", required=False),
        ColSpec(_nested(2, "double"), "affine", required=False),
        ColSpec("string", "output_dir", required=False),
    ])
    outputs = Schema([
        ColSpec(_nested(3, "float"), "probability", required=False),
        ColSpec(_nested(3, "long"), "labels", required=False),
        ColSpec(_nested(2, "double"), "affine"),
        ColSpec("string", "probability_path", required=False),
        ColSpec("string", "labels_path", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _bad_input(message: str) -> MlflowException:
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # HTTP 400 from the scoring server


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):  # a missing cell of a DataFrame
        return False
    return not (isinstance(value, str) and not value.strip())


def scan_from_row(row: dict[str, Any], index: int) -> tuple[str, Any]:
    """``(name, Volume)`` for one input row: read ``path``, or build the Volume from ``image`` + ``affine``.

    Raises:
        MlflowException: (HTTP 400) neither or both forms given, wrong shapes, unreadable path.
    """
    from pipeline.io.dataset import Case, read_case_image
    from pipeline.io.formats import strip_suffix
    from pipeline.io.volume import Volume

    has_path, has_image = _present(row.get("path")), _present(row.get("image"))
    if has_path == has_image:
        raise _bad_input(f"row {index}: give either 'path' or 'image' + 'affine' (got "
                         f"{'both' if has_path else 'neither'})")
    if has_path:
        path = Path(str(row["path"]))
        if not path.exists():
            raise _bad_input(f"row {index}: path {path} does not exist on the serving machine")
        try:
            return strip_suffix(path), read_case_image(Case(strip_suffix(path), (path,)))
        except ValueError as exc:
            raise _bad_input(f"row {index}: cannot read {path}: {exc}") from None
    if not _present(row.get("affine")):
        raise _bad_input(f"row {index}: 'image' needs its 'affine' (4x4 voxel-to-RAS matrix in mm)")
    image = np.asarray(row["image"], dtype=np.float32)
    affine = np.asarray(row["affine"], dtype=np.float64)
    if image.ndim != 4:
        raise _bad_input(f"row {index}: 'image' must be (C, X, Y, Z) (channel first), got shape {image.shape}")
    if affine.shape != (4, 4):
        raise _bad_input(f"row {index}: 'affine' must be 4x4, got shape {affine.shape}")
    return f"scan_{index:03d}", Volume(np.ascontiguousarray(image), affine)


def _rows(model_input: Any) -> list[dict[str, Any]]:
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [dict(model_input)]
    if isinstance(model_input, list):
        return [dict(r) for r in model_input]
    raise _bad_input(f"expected a table of scans, got {type(model_input).__name__}")


class ScanSegmenter(mlflow.pyfunc.PythonModel):
    """Lesion segmentation of whole scans (artifact ``checkpoint``: the training run's ``best.pt``)."""

    def load_context(self, context: Any) -> None:
        from pipeline.inference.loaded_model import load_model

        self._loaded = load_model(context.artifacts["checkpoint"], os.environ.get(DEVICE_ENV, "auto"))

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate by them
        """``model_input``: a DataFrame (or a dict / list of dicts) of scans; returns one row per scan."""
        from pipeline.inference.predict import predict_volume
        from pipeline.io.formats import write_volume

        loaded = self._loaded
        out = []
        for i, row in enumerate(_rows(model_input)):
            name, image = scan_from_row(row, i)
            try:
                pred = predict_volume(loaded, image, loaded.cfg.inference)
            except ValueError as exc:  # e.g. the wrong number of channels
                raise _bad_input(f"row {i}: {exc}") from None
            result: dict[str, Any] = {"affine": image.affine.tolist()}
            if _present(row.get("output_dir")):
                folder = Path(str(row["output_dir"]))
                result["probability_path"] = str(write_volume(folder / "probabilities" / f"{name}.nii.gz",
                                                              pred.lesion_probability))
                result["labels_path"] = str(write_volume(folder / "labels" / f"{name}.nii.gz", pred.labels))
            else:
                result["probability"] = pred.lesion_probability.data[0]
                result["labels"] = pred.labels.data[0].astype(np.int64)
            out.append(result)
        return pd.DataFrame(out)


def pip_requirements() -> list[str]:
    """This package's runtime dependencies pinned to the installed versions (local labels dropped)."""
    try:
        names = [r.split(";")[0] for r in metadata.requires(DIST_NAME) or [] if "extra ==" not in r]
        names = [n.split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip() for n in names]
    except metadata.PackageNotFoundError:
        names = list(_FALLBACK_REQUIREMENTS)
    reqs = []
    for name in names:
        if name.lower() in _NOT_NEEDED:
            continue
        try:
            reqs.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def example_input(n_channels: int, shape: tuple[int, int, int] = (12, 10, 6)) -> pd.DataFrame:
    """A tiny input row (zeros, 1 mm isotropic) stored with the model as MLflow's input example."""
    image = np.zeros((n_channels, *shape), dtype=np.float64)
    return pd.DataFrame([{"image": image.tolist(), "affine": np.eye(4).tolist()}])
