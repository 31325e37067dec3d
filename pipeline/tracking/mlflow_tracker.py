"""The tracker a stage holds: a no-op :class:`Tracker`, or an :class:`MlflowTracker` bound to one store.

Use :func:`create_tracker` at the very start of a stage: it resolves the store, checks that a server is
reachable (``tracking.on_unreachable``) and creates the experiment, before any work is done. It returns a
no-op :class:`Tracker` when tracking is disabled or on a non-zero distributed rank, so stage code never
branches on either.

:class:`MlflowTracker` is a thin class over the functions that do the work, one module per job:

=====================================  ==================================================================
:mod:`pipeline.tracking.store`         which store (URI precedence, reachability, the experiment)
:mod:`pipeline.tracking.runs`          run lifecycle: the parent run by pipeline key, a stage's child run,
                                       its status on success, error and SIGTERM
:mod:`pipeline.tracking.run_data`      params, metrics, tags, artifacts (and how values are written)
:mod:`pipeline.tracking.model_logging` the whole-scan pyfunc model (and a bare PyTorch model)
:mod:`pipeline.tracking.registry`      model version tags and the ``champion`` alias
=====================================  ==================================================================

It holds what they share: the client, the experiment and the active run (logging without a run id goes
to it). Stages are separate processes under DVC: the train stage hands its run ids to the evaluate stage
with :func:`~pipeline.tracking.pipeline_run.write_run_ref`.

mlflow is imported lazily (it takes seconds) with ``MLFLOW_DISABLE_TELEMETRY=true`` unless already set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.tracking.model_logging import log_scan_model, log_torch_model
from pipeline.tracking.registry import promote_if_better, tag_version
from pipeline.tracking.run_data import (
    log_artifact,
    log_metrics,
    log_params,
    merge_params,
    set_tags,
    tag_values,
)
from pipeline.tracking.runs import child_run, existing_run, find_or_create_parent
from pipeline.tracking.store import get_or_create_experiment, import_mlflow, redact_uri, select_store, ui_hint

if TYPE_CHECKING:
    import torch

    from pipeline.config import TrackingConfig

log = logging.getLogger(__name__)


def distributed_rank() -> int:
    """Global rank: ``$RANK`` (torchrun), else ``torch.distributed`` if already initialised, else 0."""
    rank = os.environ.get("RANK")
    if rank is not None and rank.strip().lstrip("-").isdigit():
        return int(rank)
    torch = sys.modules.get("torch")  # never import torch just to learn that we are not distributed
    if torch is not None:
        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    return 0


class Tracker:
    """Tracking interface; this base class records nothing (tracking disabled or a non-zero rank).

    Every method accepts what :class:`MlflowTracker` accepts and returns None, so stage code is the same
    whether or not tracking is on.
    """

    enabled: bool = False
    uri: str | None = None
    experiment_id: str | None = None
    fallback_from: str | None = None  # the unreachable server URI when on_unreachable=fallback was used

    def __init__(self) -> None:
        self._run_id: str | None = None
        self._last_run_id: str | None = None
        self._parent_run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        """The active run's id (None outside :meth:`start` and when not tracking)."""
        return self._run_id

    @property
    def parent_run_id(self) -> str | None:
        return self._parent_run_id

    def parent_run(
        self,
        pipeline_key: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        prefer: str | None = None,
    ) -> str | None:
        return None

    @contextlib.contextmanager
    def start(
        self,
        run_name: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> Iterator[Tracker]:
        """Open a run for the block (no-op here); exceptions always propagate."""
        yield self

    def run_ref(self) -> dict[str, Any]:
        """What a later stage needs to link to the active (or last ended) run; all None when not tracking."""
        return {
            "tracking_uri": redact_uri(self.uri) if self.uri else None,
            "experiment_id": self.experiment_id,
            "run_id": self._run_id or self._last_run_id,
            "parent_run_id": self._parent_run_id,
        }

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        pass

    def log_params(self, flat: Mapping[str, Any], run_id: str | None = None) -> None:
        pass

    def merge_params(self, flat: Mapping[str, Any], run_id: str | None = None) -> None:
        pass

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None
    ) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass

    def log_torch_model(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        registered_model_name: str | None = None,
        *,
        name: str = "model",
        serialization: str = "auto",
    ) -> dict[str, Any] | None:
        return None

    def log_scan_model(
        self,
        checkpoint: str | Path,
        n_channels: int,
        registered_model_name: str | None = None,
        *,
        name: str = "model",
        version_tags: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        return None

    def _tag_model(self, run_id: str, summary: Mapping[str, Any]) -> None:
        # the run table shows which model (and registered version) a training run produced
        self.set_tags({f"model.{k}": v for k, v in summary.items() if v is not None}, run_id=run_id)

    def tag_model_version(self, name: str | None, version: int | str | None, tags: Mapping[str, Any]) -> None:
        pass

    def promote(self, name: str | None, version: int | str | None, cpm: float | None, alias: str,
                min_cpm: float = 0.0) -> Any:
        return None


NullTracker = Tracker


class MlflowTracker(Tracker):
    """Records to MLflow. Build it with :func:`create_tracker`, which checks the store first."""

    enabled = True

    def __init__(self, uri: str, experiment: str, fallback_from: str | None = None) -> None:
        super().__init__()
        self.uri = uri
        self.experiment_name = experiment
        self.fallback_from = fallback_from
        self._client = import_mlflow().MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.experiment_id = get_or_create_experiment(self._client, experiment, uri)

    def _activate(self) -> Any:
        # the fluent API (start_run, <flavour>.log_model) uses the process-wide URIs
        mlflow = import_mlflow()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        return mlflow

    def _base_tags(self) -> dict[str, str]:
        return {"tracking.fallback_from": redact_uri(self.fallback_from)} if self.fallback_from else {}

    def _require_run(self, run_id: str | None = None) -> str:
        run_id = run_id or self._run_id
        if run_id is None:
            raise RuntimeError("no active MLflow run: log inside `with tracker.start(...)`")
        return run_id

    def ui_hint(self, run_id: str | None = None) -> str:
        """Where to look at a run: its URL on a server, or the ``mlflow ui`` command for a SQLite store."""
        return ui_hint(self.uri, self.experiment_id, run_id)

    # -- run lifecycle (pipeline.tracking.runs) ----------------------------------------------------------
    def parent_run(
        self,
        pipeline_key: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        prefer: str | None = None,
    ) -> str:
        """This pipeline execution's parent run (:func:`~pipeline.tracking.runs.find_or_create_parent`)."""
        return find_or_create_parent(self._client, self.experiment_id, pipeline_key, run_name,
                                     {**self._base_tags(), **(tags or {})}, prefer)

    @contextlib.contextmanager
    def start(
        self,
        run_name: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> Iterator[MlflowTracker]:
        """Run the block inside a new MLflow run (a child of ``parent_run_id`` if given).

        The run ends FINISHED if the block completes (or calls ``sys.exit(0)``) and FAILED on any exception,
        ``KeyboardInterrupt``, ``SystemExit`` with a non-zero code or SIGTERM; the exception type and
        message go to the ``error`` tag, and the exception is re-raised. The parent's status follows
        (:func:`pipeline.tracking.runs.child_run`). A parent that does not exist is reported and not linked.

        Yields:
            this tracker, with :attr:`run_id` set.
        """
        if self._run_id is not None:
            raise RuntimeError(f"MLflow run {self._run_id} is still active in this tracker; end it first")
        mlflow = self._activate()
        parent = existing_run(self._client, parent_run_id, uri=self.uri)
        tags = {**self._base_tags(), **tag_values(tags)}
        with child_run(mlflow, self._client, self.experiment_id, run_name, parent, tags,
                       where=self.ui_hint) as run_id:
            self._run_id, self._parent_run_id = run_id, parent
            try:
                yield self
            finally:
                self._run_id, self._last_run_id = None, run_id

    # -- logging (pipeline.tracking.run_data) ------------------------------------------------------------
    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        """Set tags on the active run (or on ``run_id``, e.g. the parent)."""
        set_tags(self._client, self._require_run(run_id), tags)

    def log_params(self, flat: Mapping[str, Any], run_id: str | None = None) -> None:
        """Log a flat ``{"dotted.key": value}`` dict as params (see :mod:`~pipeline.tracking.run_data`)."""
        log_params(self._client, self._require_run(run_id), flat)

    def merge_params(self, flat: Mapping[str, Any], run_id: str | None = None) -> None:
        """Log the params ``run_id`` does not have yet (:func:`~pipeline.tracking.run_data.merge_params`)."""
        merge_params(self._client, self._require_run(run_id), flat)

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None
    ) -> None:
        """Log numeric metrics at ``step`` (None -> 0) on the active run or ``run_id``."""
        log_metrics(self._client, self._require_run(run_id), metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under ``artifact_path`` of the active run."""
        log_artifact(self._client, self._require_run(), path, artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Write ``obj`` as JSON (``.json``) or YAML (``.yaml``/``.yml``) to ``artifact_file`` of the run."""
        self._client.log_dict(self._require_run(), obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self._require_run(), text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Save a matplotlib figure (e.g. the FROC plot) as ``artifact_file`` (``.png``, ``.svg``...)."""
        self._client.log_figure(self._require_run(), figure, artifact_file)

    # -- models (pipeline.tracking.model_logging, pipeline.tracking.registry) ----------------------------
    def log_torch_model(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        registered_model_name: str | None = None,
        *,
        name: str = "model",
        serialization: str = "auto",
    ) -> dict[str, Any]:
        """Log a bare PyTorch network; register it (:func:`pipeline.tracking.model_logging.log_torch_model`).

        Returns:
            ``{"model_uri", "model_id", "registered_model_name", "registered_model_version",
            "serialization_format"}``; the run also gets ``model.*`` tags with the same values.
        """
        rid = self._require_run()
        self._activate()
        result = log_torch_model(rid, model, input_example, registered_model_name, name=name,
                                 serialization=serialization)
        self._tag_model(rid, result)
        return result

    def log_scan_model(
        self,
        checkpoint: str | Path,
        n_channels: int,
        registered_model_name: str | None = None,
        *,
        name: str = "model",
        version_tags: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Log and register the whole-scan pyfunc (:func:`~pipeline.tracking.model_logging.log_scan_model`).

        Args:
            checkpoint: the ``best.pt`` to serve (it carries its config and plan).
            n_channels: input channels (for the stored input example).
            registered_model_name: registry name (``cfg.tracking.registered_model``); None: log only.
            name: the model's name within the run.
            version_tags: set on the new model version (e.g. ``git.commit``, ``data.hash``), with
                ``train_run_id``.

        Returns:
            ``{"model_uri", "model_id", "registered_model_name", "registered_model_version",
            "flavor": "pyfunc"}``; the run also gets ``model.*`` tags with the same values.
        """
        rid = self._require_run()
        self._activate()
        result = log_scan_model(rid, checkpoint, n_channels, registered_model_name, name=name)
        self._tag_model(rid, result)
        self.tag_model_version(registered_model_name, result["registered_model_version"],
                               {"train_run_id": rid, **(version_tags or {})})
        return result

    def _tag_model(self, run_id: str, summary: Mapping[str, Any]) -> None:
        # the run table shows which model (and registered version) a training run produced
        self.set_tags({f"model.{k}": v for k, v in summary.items() if v is not None}, run_id=run_id)

    def tag_model_version(self, name: str | None, version: int | str | None, tags: Mapping[str, Any]) -> None:
        """Set tags on a registered model version (no-op when ``name`` or ``version`` is None)."""
        if name and version is not None:
            tag_version(self._client, name, version, dict(tags))

    def promote(self, name: str | None, version: int | str | None, cpm: float | None, alias: str,
                min_cpm: float = 0.0) -> Any:
        """Tag the version with its test CPM and move ``alias`` to it if it beats the holder.

        See :func:`pipeline.tracking.registry.promote_if_better`; returns its :class:`Promotion` (None when
        ``name`` or ``version`` is None).
        """
        if not name or version is None:
            return None
        return promote_if_better(self._client, name, version, cpm, alias, min_cpm)


def create_tracker(cfg: TrackingConfig, *, timeout_s: float = 5.0, rank: int | None = None) -> Tracker:
    """The stage's tracker; call it first, before any work.

    Returns a no-op :class:`Tracker` when ``cfg.enabled`` is false or on a non-zero rank. Otherwise
    resolves the URI (:func:`~pipeline.tracking.store.resolve_tracking_uri`), checks that a server answers
    within ``timeout_s``, applies ``cfg.on_unreachable`` and creates the experiment.

    Raises:
        TrackingUnavailable: the server is unreachable and ``on_unreachable`` is ``fail``.
    """
    rank = distributed_rank() if rank is None else rank
    if not cfg.enabled or rank != 0:
        log.debug("MLflow tracking off (enabled=%s, rank=%s)", cfg.enabled, rank)
        return Tracker()
    uri, fallback_from = select_store(cfg, timeout_s)
    tracker = MlflowTracker(uri, cfg.experiment, fallback_from=fallback_from)
    log.info(
        "MLflow tracking to %s, experiment %r (id %s); view with: %s",
        redact_uri(uri),
        cfg.experiment,
        tracker.experiment_id,
        tracker.ui_hint(),
    )
    return tracker
