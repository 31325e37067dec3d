"""Logging a model into the active run: the whole-scan pyfunc (the registered model) or a bare PyTorch net.

The pipeline registers the whole-scan pyfunc of :mod:`pipeline.tracking.pyfunc_model`
(:func:`log_scan_model`, from the training run's ``best.pt``); :func:`log_torch_model` logs a network
alone with MLflow's PyTorch flavour (patch in, logits out). Both return the same summary
(:func:`model_summary`), which the tracker also writes as the run's ``model.*`` tags; tagging versions and
moving the alias are :mod:`pipeline.tracking.registry`'s.

Both log into MLflow's *fluent* active run (``mlflow.<flavour>.log_model`` has no run-id argument) of the
store whose URIs the tracker set, so call them inside
:meth:`MlflowTracker.start <pipeline.tracking.mlflow_tracker.MlflowTracker.start>`.
"""

from __future__ import annotations

import copy
import logging
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def model_summary(info: Any, registered_model_name: str | None, **extra: Any) -> dict[str, Any]:
    """``{"model_uri", "model_id", "registered_model_name", "registered_model_version", **extra}`` of MLflow's
    ``ModelInfo``; the version is an int (MLflow gives an int from SQLite, a str over REST)."""
    version = getattr(info, "registered_model_version", None)
    return {
        "model_uri": info.model_uri,
        "model_id": getattr(info, "model_id", None),
        "registered_model_name": registered_model_name,
        "registered_model_version": int(version) if version is not None else None,
        **extra,
    }


def log_scan_model(
    run_id: str,
    checkpoint: str | Path,
    n_channels: int,
    registered_model_name: str | None = None,
    *,
    name: str = "model",
) -> dict[str, Any]:
    """Log the whole-scan pyfunc model (:mod:`pipeline.tracking.pyfunc_model`) into ``run_id``; register it.

    The model is logged "from code" (:mod:`pipeline.tracking.pyfunc_entry`) with the ``pipeline`` package
    bundled, so loading it needs only the pinned requirements and unpickles nothing of ours.

    Args:
        run_id: the active fluent run (the tracker's).
        checkpoint: the ``best.pt`` to serve (it carries its config and plan).
        n_channels: input channels (for the stored input example).
        registered_model_name: registry name (``cfg.tracking.registered_model``); None: log only.
        name: the model's name within the run.

    Returns:
        :func:`model_summary` with ``"flavor": "pyfunc"``.

    Raises:
        RuntimeError: ``run_id`` is not the active fluent run.
    """
    from mlflow import pyfunc

    import pipeline
    from pipeline.tracking.pyfunc_model import example_input, pip_requirements, scan_signature

    _require_active(run_id)
    info = pyfunc.log_model(
        name=name,
        # "models from code": MLflow runs this reviewed file to load the model instead of unpickling one
        python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
        artifacts={"checkpoint": str(checkpoint)},
        # the package is not pip-installed where the model is served: bundle it
        code_paths=[str(Path(pipeline.__file__).parent)],
        signature=scan_signature(),
        input_example=example_input(n_channels),
        pip_requirements=pip_requirements(),
        registered_model_name=registered_model_name,
    )
    return model_summary(info, registered_model_name, flavor="pyfunc")


def log_torch_model(
    run_id: str,
    model: torch.nn.Module,
    input_example: np.ndarray,
    registered_model_name: str | None = None,
    *,
    name: str = "model",
    serialization: str = "auto",
) -> dict[str, Any]:
    """Log ``model`` with MLflow's PyTorch flavour, a signature and an input example; register it.

    A CPU, eval-mode copy is logged (DDP/``torch.compile`` wrappers removed); the caller's model is not
    touched. The signature is inferred by running the copy on the example, then its batch and spatial
    dimensions are made free (``-1``): a fully convolutional 3D U-Net accepts other patch sizes.

    ``serialization``: ``"pt2"`` (``torch.export``; loads with torch alone, no pickle, dynamic batch and
    spatial dims), ``"pickle"`` (the module itself; loading needs the model's packages, and this
    package's code is bundled when the model class comes from it), or ``"auto"``: pt2, else pickle with
    a warning if the export fails.

    Args:
        run_id: the active fluent run (the tracker's).
        model: a module mapping ``(N, C, X, Y, Z)`` float32 to ``(N, K, X, Y, Z)`` logits.
        input_example: a small float32 array ``(N, C, X, Y, Z)``, e.g. ``(1, 1, 16, 16, 16)`` (stored as
            JSON in the model: keep it tiny). A batch of 1 is repeated to 2 so that pt2 keeps the batch
            dimension dynamic.
        registered_model_name: registry name (``cfg.tracking.registered_model``); None: log only.
        name: the model's name within the run.

    Returns:
        :func:`model_summary` with ``"serialization_format"``.

    Raises:
        RuntimeError: ``run_id`` is not the active fluent run.
    """
    import torch
    from mlflow import pytorch as mlflow_pytorch

    _require_active(run_id)
    cpu_model = copy.deepcopy(_unwrap(model)).to("cpu", dtype=torch.float32).eval()
    x = np.ascontiguousarray(input_example, dtype=np.float32)
    if x.ndim >= 1 and x.shape[0] == 1:
        x = np.concatenate([x, x], axis=0)
    with torch.no_grad():
        y = cpu_model(torch.from_numpy(x))
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"the model must return one tensor for logging, got {type(y).__name__}")
    signature = _free_dims_signature(x, y.float().numpy())
    formats = ["pt2", "pickle"] if serialization == "auto" else [serialization]
    info = None
    for fmt in formats:
        try:
            info = mlflow_pytorch.log_model(
                cpu_model,
                name=name,
                input_example=x,
                signature=signature,
                registered_model_name=registered_model_name,
                serialization_format=fmt,
                pip_requirements=_pip_requirements(cpu_model, fmt),
                code_paths=_code_paths(cpu_model) if fmt == "pickle" else None,
            )
            break
        except Exception as exc:
            if fmt == formats[-1]:
                raise
            log.warning("MLflow: torch.export of the model failed (%s); logging it pickled instead", exc)
    assert info is not None
    return model_summary(info, registered_model_name, serialization_format=fmt)


def _require_active(run_id: str) -> None:
    # mlflow.<flavour>.log_model logs into the fluent active run, whatever the tracker thinks is active
    import mlflow

    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise RuntimeError(f"MLflow run {run_id} is not the active fluent run; log inside tracker.start()")


def _unwrap(model: Any) -> Any:
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def _free_dims_signature(x: np.ndarray, y: np.ndarray) -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(a: np.ndarray) -> Any:
        # keep channels fixed; batch and spatial dims free (-1)
        if a.ndim >= 3:
            shape = tuple(-1 if i != 1 else s for i, s in enumerate(a.shape))
        else:
            shape = (-1, *a.shape[1:])
        return TensorSpec(a.dtype, shape)

    return ModelSignature(inputs=Schema([spec(x)]), outputs=Schema([spec(y)]))


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _pip_requirements(model: Any, fmt: str) -> list[str]:
    """Explicit requirements (MLflow's inference runs the model in a subprocess: ~4 s more per log)."""
    reqs: dict[str, str] = {}
    names = ["torch", "numpy"]
    if fmt == "pickle":
        names.append("cloudpickle")
        dists = metadata.packages_distributions()
        for module in model.modules():
            top = type(module).__module__.split(".")[0]
            names.extend(d for d in dists.get(top, []) if d.lower() != "torch")
    for dist in names:
        version = _dist_version(dist)
        if version is not None and dist.lower() not in reqs:
            reqs[dist.lower()] = f"{dist}=={version.split('+')[0]}"  # drop local labels such as +cpu
    return list(reqs.values())


def _code_paths(model: Any) -> list[str] | None:
    """Bundle this package with a pickled model whose classes come from it (it is not pip-installed)."""
    if any(type(m).__module__.split(".")[0] == "pipeline" for m in model.modules()):
        import pipeline

        return [str(Path(pipeline.__file__).parent)]
    return None
