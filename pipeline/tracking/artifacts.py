"""Reading runs back from MLflow: find an ``evaluate`` run and download its artifacts (for inspection).

The inspection notebook and :mod:`pipeline.inspection.run` use these so that they never import mlflow
themselves. The store is resolved as the stages resolve it
(:func:`~pipeline.tracking.store.resolve_tracking_uri`), with the local store and relative SQLite paths
taken relative to ``workdir`` (the folder the stages ran in), not to the caller's working directory -- a
notebook runs in ``notebooks/``.

Example::

    info = latest_run(cfg.tracking, "evaluate", workdir=repo)      # None when there is none
    folder = download_run_artifacts(info["run_id"], tmp, cfg.tracking, "evaluation", workdir=repo)
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tracking.store import import_mlflow, redact_uri, resolve_tracking_uri, sqlite_path

if TYPE_CHECKING:
    from pipeline.config import TrackingConfig


class RunNotFound(LookupError):
    """No run matches (unknown id, or no finished run of that name); the message names the store."""


def _client(cfg: TrackingConfig, workdir: str | Path | None) -> tuple[Any, str]:
    uri = resolve_tracking_uri(cfg, workdir)
    db = sqlite_path(uri)
    if db is not None and not db.exists():  # MLflow would silently create an empty store
        raise RunNotFound(f"MLflow store {uri}: the database file does not exist (has a tracked stage run?)")
    with warnings.catch_warnings():
        # mlflow imports tqdm.auto, which warns in a notebook kernel without ipywidgets
        warnings.filterwarnings("ignore", message="IProgress not found")
        mlflow = import_mlflow()
    return mlflow.MlflowClient(tracking_uri=uri), uri


def _info(run: Any) -> dict[str, Any]:
    return {
        "run_id": str(run.info.run_id),
        "run_name": run.info.run_name,
        "status": run.info.status,
        "start_time": run.info.start_time,  # ms since the epoch
        "experiment_id": str(run.info.experiment_id),
        "artifact_uri": run.info.artifact_uri,
        "tags": dict(run.data.tags),
    }


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No tqdm bar per download (it clutters notebook output); the previous setting is restored."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def latest_run(cfg: TrackingConfig, run_name: str = "evaluate", workdir: str | Path | None = None,
               of_run: str | None = None) -> dict[str, Any] | None:
    """The most recent FINISHED run called ``run_name`` in ``cfg.experiment``, or None.

    Args:
        cfg: the ``tracking`` config section.
        run_name: MLflow run name (the stages name their runs ``train`` and ``evaluate``).
        workdir: folder the stages ran in (for the local SQLite store).
        of_run: only runs linked to this run id: its children (``mlflow.parentRunId``) or runs tagged
            ``train_run_id`` with it (an evaluate run of that training run).

    Returns:
        ``{"run_id", "run_name", "status", "start_time", "experiment_id", "artifact_uri", "tags"}``.
    """
    client, _ = _client(cfg, workdir)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return None
    base = f"attributes.run_name = '{run_name}' and attributes.status = 'FINISHED'"
    filters = [base]
    if of_run is not None:
        filters = [f"{base} and tags.mlflow.parentRunId = '{of_run}'",
                   f"{base} and tags.train_run_id = '{of_run}'"]
    found = []
    for flt in filters:
        found += client.search_runs([exp.experiment_id], filter_string=flt,
                                    order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        return None
    return _info(max(found, key=lambda r: r.info.start_time or 0))


def get_run(run_id: str, cfg: TrackingConfig, workdir: str | Path | None = None) -> dict[str, Any]:
    """What :func:`latest_run` returns, for one run id.

    Raises:
        RunNotFound: no such run in the store.
    """
    from mlflow.exceptions import MlflowException

    client, uri = _client(cfg, workdir)
    try:
        return _info(client.get_run(run_id))
    except MlflowException as exc:
        raise RunNotFound(f"MLflow run {run_id!r} not found in {redact_uri(uri)} "
                          f"({exc.error_code})") from None


def download_run_artifacts(run_id: str, dst: str | Path, cfg: TrackingConfig, artifact_path: str = "",
                           workdir: str | Path | None = None) -> Path:
    """Download ``artifact_path`` (a file or folder; "" = everything) of a run into ``dst``.

    Returns:
        The local path of ``artifact_path`` (``dst/<artifact_path>``).

    Raises:
        RunNotFound: the run does not exist or has no such artifact.
    """
    from mlflow.exceptions import MlflowException

    client, uri = _client(cfg, workdir)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    artifact_path = artifact_path.strip("/")
    try:
        if artifact_path:
            parent = posixpath.dirname(artifact_path)
            if artifact_path not in {a.path for a in client.list_artifacts(run_id, parent or None)}:
                raise RunNotFound(f"MLflow run {run_id} in {redact_uri(uri)} has no artifact "
                                  f"{artifact_path!r}")
        with _quiet_downloads():
            return Path(client.download_artifacts(run_id, artifact_path, str(dst)))
    except MlflowException as exc:
        raise RunNotFound(f"MLflow run {run_id!r} in {redact_uri(uri)}: cannot download {artifact_path!r} "
                          f"({exc.error_code}: {exc.message})") from None
