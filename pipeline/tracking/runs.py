"""Run lifecycle: the parent run of a pipeline execution, and a stage's child run from start to end.

One pipeline execution is one *parent* run, found or created by :func:`find_or_create_parent` from the
pipeline key of :mod:`pipeline.tracking.run_key` (:mod:`pipeline.tracking.pipeline_run` puts the params
and headline metrics on it), with one child run per stage (``train``, ``evaluate``) opened by
:func:`child_run` and linked by MLflow's ``mlflow.parentRunId`` tag.

Run status: a child run ends FINISHED when its block completes (or calls ``sys.exit(0)``) and FAILED on
any exception, ``KeyboardInterrupt``, ``SystemExit`` with a non-zero code or SIGTERM (a kill -9 or OOM kill
cannot be caught). The parent run's status mirrors its latest child: RUNNING while a stage runs, then
FINISHED or FAILED. A FAILED or KILLED parent is never reused, so a re-run after a failure starts afresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pipeline.tracking.run_data import MAX_TAG_CHARS, tag_values
from pipeline.tracking.store import redact_uri

log = logging.getLogger(__name__)

PIPELINE_KEY_TAG = "pipeline_key"
_KEY_RE = re.compile(r"^[A-Za-z0-9._:+-]{1,200}$")


def find_or_create_parent(
    client: Any,
    experiment_id: str,
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
        client: an ``MlflowClient`` of the store.
        experiment_id: where to look for and create the parent.
        pipeline_key: identifies one pipeline execution, e.g. ``<git commit>-<params hash>``;
            letters, digits and ``._:+-`` only.
        run_name: name of a newly created parent.
        tags: set on a newly created parent (e.g. :func:`lineage_tags` without data).
        prefer: a parent run id to reuse whatever its status when it carries the same key (the
            evaluate stage passes the training run's parent: a re-run after a failed evaluation then
            completes the execution that holds the training run).

    Raises:
        ValueError: ``pipeline_key`` has other characters (it is quoted into a search filter).
    """
    if not _KEY_RE.match(pipeline_key):
        raise ValueError(f"pipeline_key {pipeline_key!r}: use 1-200 letters, digits or ._:+-")
    if prefer and existing_run(client, prefer) is not None:
        if client.get_run(prefer).data.tags.get(PIPELINE_KEY_TAG) == pipeline_key:
            log.info("MLflow: reusing parent run %s (the training run's) for pipeline key %s", prefer,
                     pipeline_key)
            return prefer
    runs = client.search_runs(
        [experiment_id],
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
    all_tags = {PIPELINE_KEY_TAG: pipeline_key, "mlflow.runName": name, **tag_values(tags)}
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    log.info("MLflow: created parent run %s for pipeline key %s", run.info.run_id, pipeline_key)
    return str(run.info.run_id)


def existing_run(client: Any, run_id: str | None, uri: str | None = None) -> str | None:
    """``run_id`` if that run exists and is not deleted, else None.

    With ``uri`` (the store's, for the message) a missing or deleted run is reported in a WARNING: a
    child run is then not linked to it.
    """
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        if uri is not None:
            log.warning(
                "MLflow: parent run %s not found in %s (written by a stage that used another store?); "
                "this run is not linked to it.",
                run_id,
                redact_uri(uri),
            )
        return None
    if run.info.lifecycle_stage == "deleted":
        if uri is not None:
            log.warning("MLflow: parent run %s is deleted; this run is not linked to it.", run_id)
        return None
    return run_id


@contextlib.contextmanager
def child_run(
    mlflow: Any,
    client: Any,
    experiment_id: str,
    run_name: str,
    parent: str | None = None,
    tags: Mapping[str, str] | None = None,
    where: Callable[[str], str] = str,
) -> Iterator[str]:
    """Run the block inside a new fluent MLflow run (a child of ``parent`` if given); yields its id.

    Ends the run (and sets the parent's status) as the module docstring says; the exception type and
    message go to the run's ``error`` tag and the exception is re-raised. A forked worker that leaves the
    block does not end the run.

    Args:
        mlflow: the mlflow module, with the tracking and registry URIs of the store set.
        client: an ``MlflowClient`` of the same store.
        experiment_id: the experiment of the run.
        run_name: e.g. ``train``.
        parent: an existing parent run id (check it with :func:`existing_run`), or None.
        tags: string tags for the new run (see :func:`~pipeline.tracking.run_data.tag_values`).
        where: run id -> where to look at the run, for the log (e.g. the tracker's ``ui_hint``).

    Raises:
        RuntimeError: another fluent run than ``parent`` is active in this process.
    """
    active = mlflow.active_run()
    if parent is not None and active is not None and active.info.run_id != parent:
        raise RuntimeError(f"another MLflow run ({active.info.run_id}) is active in this process")
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        parent_run_id=parent,
        nested=active is not None,
        tags=dict(tags or {}),
    )
    run_id = str(run.info.run_id)
    pid = os.getpid()
    status = "FAILED"
    try:
        if parent is not None:
            client.update_run(parent, status="RUNNING")
        log.info("MLflow: run %r (%s) started; see %s", run_name, run_id, where(run_id))
        with _sigterm_raises_systemexit():
            yield run_id
        status = "FINISHED"
    except SystemExit as exc:
        if exc.code in (0, None):
            status = "FINISHED"
        else:
            _safe_tag(client, run_id, "error", f"SystemExit({exc.code})")
        raise
    except BaseException as exc:
        _safe_tag(client, run_id, "error", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if os.getpid() == pid:  # not in a forked worker
            _end(mlflow, client, run_id, parent, status)


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


def _safe_tag(client: Any, run_id: str, key: str, value: str) -> None:
    try:
        client.set_tag(run_id, key, value[:MAX_TAG_CHARS])
    except Exception:  # noqa: BLE001 - never hide the original error behind a tracking error
        log.warning("MLflow: could not tag run %s with the error", run_id, exc_info=True)


def _end(mlflow: Any, client: Any, run_id: str, parent: str | None, status: str) -> None:
    try:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:
            client.set_terminated(run_id, status)
        if parent is not None:
            client.set_terminated(parent, status)
    except Exception:  # noqa: BLE001 - keep the stage's own exception (if any) on top
        log.error("MLflow: could not mark run %s %s", run_id, status, exc_info=True)
        if status == "FINISHED":
            raise
    else:
        log.info("MLflow: run %s %s", run_id, status)
