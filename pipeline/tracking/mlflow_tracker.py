"""The one place that imports mlflow: runs, params, metrics, artifacts, the PyTorch model, the registry.

Use :func:`create_tracker` at the very start of a stage: it resolves the store, checks that a server is
reachable (``tracking.on_unreachable``) and creates the experiment, before any work is done. It returns a
no-op :class:`Tracker` when tracking is disabled or on a non-zero distributed rank, so stage code never
branches on either.

One pipeline execution is one *parent* run (found or created by :meth:`MlflowTracker.parent_run` from the
pipeline key of :mod:`pipeline.tracking.run_key`; :mod:`pipeline.tracking.pipeline_run` puts the params and
headline metrics on it) with one child run per stage (``train``, ``evaluate``), linked by MLflow's
``mlflow.parentRunId`` tag. Stages are separate processes under DVC: the train stage writes its run ids
with :func:`write_run_ref`, the evaluate stage reads them with :func:`read_run_ref`. The registered model
is the whole-scan pyfunc of :mod:`pipeline.tracking.pyfunc_model` (:meth:`MlflowTracker.log_scan_model`);
:mod:`pipeline.tracking.registry` moves the ``champion`` alias.

Run status: :meth:`Tracker.start` ends the run FINISHED when its block completes and FAILED on any
exception, ``KeyboardInterrupt`` or SIGTERM (a kill -9 or OOM kill cannot be caught). The parent run's
status mirrors its latest child: RUNNING while a stage runs, then FINISHED or FAILED.

mlflow is imported lazily (it takes seconds) with ``MLFLOW_DISABLE_TELEMETRY=true`` unless already set.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.io.atomic import write_json
from pipeline.tracking.store import artifact_location, is_http, redact_uri, select_store

if TYPE_CHECKING:
    import torch

    from pipeline.config import TrackingConfig

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow 3's limit on a param value
MAX_TAG_CHARS = 8000
PARAMS_PER_BATCH = 100  # MLflow's limit on params (and tags) in one log_batch
METRICS_PER_BATCH = 1000
PIPELINE_KEY_TAG = "pipeline_key"
_KEY_RE = re.compile(r"^[A-Za-z0-9._:+-]{1,200}$")


def _mlflow() -> Any:
    """Import mlflow (lazily: it costs seconds) with telemetry off unless the user decided otherwise."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


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


def param_value(value: Any) -> str:
    """How a config value is written as an MLflow param: JSON for lists/dicts/None/bools, ``str`` otherwise.

    Values longer than MLflow's limit (6000 characters) are cut and end with ``...[truncated]``; log the
    whole config as an artifact as well.

    >>> param_value([128, 128, 40]), param_value(None), param_value(True), param_value(0.5)
    ('[128, 128, 40]', 'null', 'true', '0.5')
    """
    if isinstance(value, (list, tuple, dict, bool)) or value is None:
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    if len(text) > MAX_PARAM_CHARS:
        marker = "...[truncated]"
        text = text[: MAX_PARAM_CHARS - len(marker)] + marker
    return text


def flat_params(flat: Mapping[str, Any]) -> dict[str, str]:
    """``{"train.loss.gamma": 2.0}`` -> ``{"train.loss.gamma": "2.0"}``, as :meth:`log_params` logs it."""
    return {str(k): param_value(v) for k, v in flat.items()}


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else param_value(value)
    return text[:MAX_TAG_CHARS]


@contextlib.contextmanager
def _sigterm_raises_systemexit() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``SystemExit(143)``, so ``finally`` blocks mark the run FAILED.

    Only in the main thread, and only when nobody else installed a SIGTERM handler.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        yield
        return

    def _handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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

    def tag_model_version(self, name: str | None, version: int | str | None, tags: Mapping[str, Any]) -> None:
        pass

    def promote(self, name: str | None, version: int | str | None, cpm: float | None, alias: str,
                min_cpm: float = 0.0) -> Any:
        return None

    def end_parent(self, parent_run_id: str | None, status: str = "FINISHED") -> None:
        pass


NullTracker = Tracker


class MlflowTracker(Tracker):
    """Records to MLflow. Build it with :func:`create_tracker`, which checks the store first."""

    enabled = True

    def __init__(self, uri: str, experiment: str, fallback_from: str | None = None) -> None:
        super().__init__()
        self.uri = uri
        self.experiment_name = experiment
        self.fallback_from = fallback_from
        self._owner_pid = os.getpid()
        self._client = self._make_client()
        self.experiment_id = self._get_or_create_experiment(experiment)

    # -- store ------------------------------------------------------------------------------------------
    def _make_client(self) -> Any:
        mlflow = _mlflow()
        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def _activate(self) -> Any:
        # the fluent API (start_run, pytorch.log_model) uses the process-wide URIs
        mlflow = _mlflow()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        return mlflow

    def _get_or_create_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise RuntimeError(
                    f"MLflow experiment {name!r} in {redact_uri(self.uri)} is deleted: restore it "
                    "(mlflow experiments restore) or choose another tracking.experiment"
                )
            return str(exp.experiment_id)
        location = artifact_location(self.uri)
        if location is not None:
            Path(location).mkdir(parents=True, exist_ok=True)
        try:
            return str(self._client.create_experiment(name, artifact_location=location))
        except MlflowException:  # created meanwhile by another process
            exp = self._client.get_experiment_by_name(name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def ui_hint(self, run_id: str | None = None) -> str:
        """Where to look at a run: its URL on a server, or the ``mlflow ui`` command for a SQLite store."""
        if is_http(self.uri):
            base = redact_uri(self.uri).rstrip("/")
            return f"{base}/#/experiments/{self.experiment_id}" + (f"/runs/{run_id}" if run_id else "")
        return f"mlflow ui --backend-store-uri {self.uri}"

    # -- runs -------------------------------------------------------------------------------------------
    def parent_run(
        self,
        pipeline_key: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        prefer: str | None = None,
    ) -> str:
        """Id of the parent run tagged ``pipeline_key=<key>``, reused unless it FAILED or was KILLED.

        A new parent is created (named ``pipeline-<key[:12]>``) when none exists or the last one failed,
        so a re-run after a failure starts a fresh parent while a re-run of a successful pipeline
        (``dvc repro`` of a later stage, same key) adds its runs to the existing one.

        Args:
            pipeline_key: identifies one pipeline execution, e.g. ``<git commit>-<params hash>``;
                letters, digits and ``._:+-`` only.
            run_name: name of a newly created parent.
            tags: set on a newly created parent (e.g. :func:`lineage_tags` without data).
            prefer: a parent run id to reuse whatever its status when it carries the same key (the
                evaluate stage passes the training run's parent: a re-run after a failed evaluation then
                completes the execution that holds the training run).
        """
        if not _KEY_RE.match(pipeline_key):
            raise ValueError(f"pipeline_key {pipeline_key!r}: use 1-200 letters, digits or ._:+-")
        if prefer and self._existing_parent(prefer, quiet=True) is not None:
            run = self._client.get_run(prefer)
            if run.data.tags.get(PIPELINE_KEY_TAG) == pipeline_key:
                log.info("MLflow: reusing parent run %s (the training run's) for pipeline key %s", prefer,
                         pipeline_key)
                return prefer
        runs = self._client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.{PIPELINE_KEY_TAG} = '{pipeline_key}' "
                "and attributes.status != 'FAILED' and attributes.status != 'KILLED'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            run_id = str(runs[0].info.run_id)
            log.info("MLflow: reusing parent run %s for pipeline key %s", run_id, pipeline_key)
            return run_id
        name = run_name or f"pipeline-{pipeline_key[:12]}"
        all_tags = {PIPELINE_KEY_TAG: pipeline_key, "mlflow.runName": name}
        all_tags.update(self._base_tags())
        all_tags.update({str(k): _tag_value(v) for k, v in (tags or {}).items()})
        run = self._client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        log.info("MLflow: created parent run %s for pipeline key %s", run.info.run_id, pipeline_key)
        return str(run.info.run_id)

    def end_parent(self, parent_run_id: str | None, status: str = "FINISHED") -> None:
        """Set a parent run's status (e.g. FINISHED after the last stage; :meth:`start` already does it)."""
        if parent_run_id:
            self._client.set_terminated(parent_run_id, status)

    def _base_tags(self) -> dict[str, str]:
        return {"tracking.fallback_from": redact_uri(self.fallback_from)} if self.fallback_from else {}

    def _existing_parent(self, parent_run_id: str | None, quiet: bool = False) -> str | None:
        if not parent_run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(parent_run_id)
        except MlflowException:
            if quiet:
                return None
            log.warning(
                "MLflow: parent run %s not found in %s (written by a stage that used another store?); "
                "this run is not linked to it.",
                parent_run_id,
                redact_uri(self.uri),
            )
            return None
        if run.info.lifecycle_stage == "deleted":
            if not quiet:
                log.warning("MLflow: parent run %s is deleted; this run is not linked to it.", parent_run_id)
            return None
        return parent_run_id

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
        message go to the ``error`` tag, and the exception is re-raised. The parent's status follows.

        Yields:
            this tracker, with :attr:`run_id` set.
        """
        if self._run_id is not None:
            raise RuntimeError(f"MLflow run {self._run_id} is still active in this tracker; end it first")
        mlflow = self._activate()
        parent = self._existing_parent(parent_run_id)
        all_tags = self._base_tags()
        all_tags.update({str(k): _tag_value(v) for k, v in (tags or {}).items()})
        active = mlflow.active_run()
        if parent is not None and active is not None and active.info.run_id != parent:
            raise RuntimeError(f"another MLflow run ({active.info.run_id}) is active in this process")
        run = mlflow.start_run(
            experiment_id=self.experiment_id,
            run_name=run_name,
            parent_run_id=parent,
            nested=active is not None,
            tags=all_tags,
        )
        self._run_id = run_id = str(run.info.run_id)
        self._parent_run_id = parent
        pid = os.getpid()
        status = "FAILED"
        try:
            if parent is not None:
                self._client.update_run(parent, status="RUNNING")
            log.info("MLflow: run %r (%s) started; see %s", run_name, run_id, self.ui_hint(run_id))
            with _sigterm_raises_systemexit():
                yield self
            status = "FINISHED"
        except SystemExit as exc:
            if exc.code in (0, None):
                status = "FINISHED"
            else:
                self._safe_tag(run_id, "error", f"SystemExit({exc.code})")
            raise
        except BaseException as exc:
            self._safe_tag(run_id, "error", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if os.getpid() == pid:  # not in a forked worker
                self._end(mlflow, run_id, parent, status)

    def _safe_tag(self, run_id: str, key: str, value: str) -> None:
        try:
            self._client.set_tag(run_id, key, value[:MAX_TAG_CHARS])
        except Exception:  # noqa: BLE001 - never hide the original error behind a tracking error
            log.warning("MLflow: could not tag run %s with the error", run_id, exc_info=True)

    def _end(self, mlflow: Any, run_id: str, parent: str | None, status: str) -> None:
        self._run_id = None
        self._last_run_id = run_id
        try:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run(status)
            else:
                self._client.set_terminated(run_id, status)
            if parent is not None:
                self._client.set_terminated(parent, status)
        except Exception:  # noqa: BLE001 - keep the stage's own exception (if any) on top
            log.error("MLflow: could not mark run %s %s", run_id, status, exc_info=True)
            if status == "FINISHED":
                raise
        else:
            log.info("MLflow: run %s %s", run_id, status)

    def _require_run(self, run_id: str | None = None) -> str:
        run_id = run_id or self._run_id
        if run_id is None:
            raise RuntimeError("no active MLflow run: log inside `with tracker.start(...)`")
        return run_id

    # -- logging ----------------------------------------------------------------------------------------
    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        """Set tags on the active run (or on ``run_id``, e.g. the parent)."""
        from mlflow.entities import RunTag

        rid = self._require_run(run_id)
        items = [RunTag(str(k), _tag_value(v)) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._client.log_batch(rid, tags=items[i : i + PARAMS_PER_BATCH])

    def log_params(self, flat: Mapping[str, Any], run_id: str | None = None) -> None:
        """Log a flat ``{"dotted.key": value}`` dict as params (see :func:`param_value` for the format).

        Params are immutable in MLflow: logging a key again with another value raises.
        """
        from mlflow.entities import Param

        rid = self._require_run(run_id)
        items = [Param(k, v) for k, v in flat_params(flat).items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._client.log_batch(rid, params=items[i : i + PARAMS_PER_BATCH])

    def merge_params(self, flat: Mapping[str, Any], run_id: str | None = None) -> None:
        """Log the params that ``run_id`` (e.g. the parent) does not have yet; keep the existing ones.

        A key already logged with another value is left as it is (params are immutable) and reported in a
        WARNING; a parent run's key includes the config, so this only happens for keys outside it.
        """
        rid = self._require_run(run_id)
        have = self._client.get_run(rid).data.params
        new = flat_params(flat)
        clash = sorted(k for k, v in new.items() if k in have and have[k] != v)
        if clash:
            log.warning("MLflow: run %s keeps its values of %d param(s) that differ here: %s", rid,
                        len(clash), ", ".join(clash[:10]))
        self.log_params({k: v for k, v in new.items() if k not in have}, run_id=rid)

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None
    ) -> None:
        """Log numeric metrics at ``step`` (e.g. the epoch; None -> 0) on the active run or ``run_id``.

        Non-finite values are kept (NaN).
        """
        from mlflow.entities import Metric

        rid = self._require_run(run_id)
        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            if isinstance(value, (np.ndarray, np.generic)) and np.size(value) == 1:
                value = value.item()
            elif hasattr(value, "item") and callable(value.item):  # 0-d torch tensor
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}")
            items.append(Metric(str(key), float(value), now, int(step or 0)))
        for i in range(0, len(items), METRICS_PER_BATCH):
            self._client.log_batch(rid, metrics=items[i : i + METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under ``artifact_path`` of the active run."""
        rid = self._require_run()
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(rid, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(rid, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"artifact to log does not exist: {path}")

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Write ``obj`` as JSON (``.json``) or YAML (``.yaml``/``.yml``) to ``artifact_file`` of the run."""
        self._client.log_dict(self._require_run(), obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self._require_run(), text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Save a matplotlib figure (e.g. the FROC plot) as ``artifact_file`` (``.png``, ``.svg``...)."""
        self._client.log_figure(self._require_run(), figure, artifact_file)

    def log_torch_model(
        self,
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
            model: a module mapping ``(N, C, X, Y, Z)`` float32 to ``(N, K, X, Y, Z)`` logits.
            input_example: a small float32 array ``(N, C, X, Y, Z)``, e.g. ``(1, 1, 16, 16, 16)`` (stored as
                JSON in the model: keep it tiny). A batch of 1 is repeated to 2 so that pt2 keeps the batch
                dimension dynamic.
            registered_model_name: registry name (``cfg.tracking.registered_model``); None: log only.
            name: the model's name within the run.

        Returns:
            ``{"model_uri", "model_id", "registered_model_name", "registered_model_version",
            "serialization_format"}``; the run also gets ``model.*`` tags with the same values.
        """
        import torch

        rid = self._require_run()
        mlflow = self._activate()
        import mlflow.pytorch

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
                info = mlflow.pytorch.log_model(
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
        version = getattr(info, "registered_model_version", None)  # an int from SQLite, a str over REST
        result = {
            "model_uri": info.model_uri,
            "model_id": getattr(info, "model_id", None),
            "registered_model_name": registered_model_name,
            "registered_model_version": int(version) if version is not None else None,
            "serialization_format": fmt,
        }
        self.set_tags({f"model.{k}": v for k, v in result.items() if v is not None}, run_id=rid)
        return result

    # -- the registered model ------------------------------------------------------------------------------
    def log_scan_model(
        self,
        checkpoint: str | Path,
        n_channels: int,
        registered_model_name: str | None = None,
        *,
        name: str = "model",
        version_tags: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Log the whole-scan pyfunc model (:mod:`pipeline.tracking.pyfunc_model`) and register it.

        Args:
            checkpoint: the ``best.pt`` to serve (it carries its config and plan).
            n_channels: input channels (for the stored input example).
            registered_model_name: registry name (``cfg.tracking.registered_model``); None: log only.
            name: the model's name within the run.
            version_tags: set on the new model version (e.g. ``git.commit``, ``data.hash``).

        Returns:
            ``{"model_uri", "model_id", "registered_model_name", "registered_model_version",
            "flavor": "pyfunc"}``; the run also gets ``model.*`` tags with the same values.
        """
        rid = self._require_run()
        mlflow = self._activate()
        active = mlflow.active_run()
        if active is None or active.info.run_id != rid:
            raise RuntimeError(f"MLflow run {rid} is not the active fluent run; log inside tracker.start()")
        from pipeline.tracking.pyfunc_model import log_scan_model

        info = log_scan_model(checkpoint, n_channels, name=name, registered_model_name=registered_model_name)
        version = getattr(info, "registered_model_version", None)  # an int from SQLite, a str over REST
        result = {
            "model_uri": info.model_uri,
            "model_id": getattr(info, "model_id", None),
            "registered_model_name": registered_model_name,
            "registered_model_version": int(version) if version is not None else None,
            "flavor": "pyfunc",
        }
        self.set_tags({f"model.{k}": v for k, v in result.items() if v is not None}, run_id=rid)
        if registered_model_name and version is not None:
            self.tag_model_version(registered_model_name, version, {"train_run_id": rid, **(version_tags or {})})
        return result

    def tag_model_version(self, name: str | None, version: int | str | None, tags: Mapping[str, Any]) -> None:
        """Set tags on a registered model version (no-op when ``name`` or ``version`` is None)."""
        if name and version is not None:
            from pipeline.tracking.registry import tag_version

            tag_version(self._client, name, version, dict(tags))

    def promote(self, name: str | None, version: int | str | None, cpm: float | None, alias: str,
                min_cpm: float = 0.0) -> Any:
        """Tag the version with its test CPM and move ``alias`` to it if it beats the holder.

        See :func:`pipeline.tracking.registry.promote_if_better`; returns its :class:`Promotion` (None when
        ``name`` or ``version`` is None).
        """
        if not name or version is None:
            return None
        from pipeline.tracking.registry import promote_if_better

        return promote_if_better(self._client, name, version, cpm, alias, min_cpm)


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


def create_tracker(cfg: TrackingConfig, *, timeout_s: float = 5.0, rank: int | None = None) -> Tracker:
    """The stage's tracker; call it first, before any work.

    Returns a no-op :class:`Tracker` when ``cfg.enabled`` is false or on a non-zero rank. Otherwise
    resolves the URI (config > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``), checks that a
    server answers within ``timeout_s``, applies ``cfg.on_unreachable`` and creates the experiment.

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


def write_run_ref(path: str | Path, ref: Mapping[str, Any]) -> None:
    """Write run ids for a later stage (atomically; JSON)."""
    write_json(path, dict(ref))


def read_run_ref(path: str | Path) -> dict[str, Any]:
    """Read what :func:`write_run_ref` wrote.

    Raises:
        FileNotFoundError: with the path and a hint that the producing stage has not run.
    """
    path = Path(path)
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no MLflow run reference (has the stage that writes it run?)"
        ) from None
