"""One MLflow parent run per pipeline execution, holding the params and the headline metrics.

The stages call two functions around their own child run::

    parent, key = open_pipeline_run(tracker, cfg)                      # train
    with tracker.start("train", parent_run_id=parent, ...) as run: ...

    parent, key = open_pipeline_run(tracker, cfg, prefer=ref["parent_run_id"])   # evaluate
    with tracker.start("evaluate", parent_run_id=parent, ...) as run:
        ...
        finish_pipeline_run(run, parent, ref, cfg.tracking, headline)

The parent is found or created by the :func:`~pipeline.tracking.run_key.pipeline_key` of the execution, so
the train and evaluate processes of one ``dvc repro`` / ``dvc exp run`` share it; it carries the whole flat
config as params, the lineage tags, the training summary and the test metrics, so one row of the MLflow
run table relates the parameters to the test CPM. The child runs keep the per-epoch curves and artifacts.

``dvc repro`` runs the stages as separate processes: the train stage writes its run ids (and the registered
model version) with :func:`write_run_ref` to ``mlflow_run.json``; the evaluate stage reads them with
:func:`read_run_ref` to prefer the same parent and to tag that model version.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.io.atomic import write_json
from pipeline.tracking.lineage import lineage_tags
from pipeline.tracking.run_key import data_hash, pipeline_key

if TYPE_CHECKING:
    from pipeline.config import Config, TrackingConfig
    from pipeline.tracking.mlflow_tracker import Tracker

log = logging.getLogger(__name__)


def open_pipeline_run(tracker: Tracker, cfg: Config, prefer: str | None = None) -> tuple[str | None, str | None]:
    """``(parent run id, pipeline key)``; ``(None, None)`` when the tracker records nothing.

    Finds or creates the parent of this execution (named after the DVC experiment when ``dvc exp run``
    runs it, else ``pipeline``) and adds the flat config to its params (existing ones are kept).

    Args:
        tracker: the stage's tracker (:func:`~pipeline.tracking.create_tracker`).
        cfg: the stage's config.
        prefer: the training run's parent id (read from ``mlflow_run.json``): reused when its key matches.
    """
    if not tracker.enabled:
        return None, None
    key = pipeline_key(cfg)
    tags = {k: v for k, v in lineage_tags(cfg.paths.raw).items() if not k.startswith("dvc.stage")}
    tags["data.hash"] = data_hash(cfg.paths.raw)
    name = os.environ.get("DVC_EXP_NAME") or "pipeline"
    parent = tracker.parent_run(key, run_name=name, tags=tags, prefer=prefer)
    tracker.merge_params(cfg.flat(), run_id=parent)
    return parent, key


def version_tags(cfg: Config, key: str | None) -> dict[str, str]:
    """Tags for a newly registered model version: code, data and pipeline key."""
    tags = {k: v for k, v in lineage_tags(cfg.paths.raw).items() if k in ("git.commit", "git.dirty")}
    tags["data.hash"] = data_hash(cfg.paths.raw)
    if key:
        tags["pipeline_key"] = key
    return tags


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-NaN numbers of a flat dict (bools, strings, lists and None dropped).

    >>> numeric({"cpm": 0.5, "n": 3, "ok": True, "name": "x", "ci": [0, 1], "none": None})
    {'cpm': 0.5, 'n': 3.0}
    """
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def finish_pipeline_run(run: Tracker, parent: str | None, ref: Mapping[str, Any], cfg: TrackingConfig,
                        headline: Mapping[str, Any]) -> Any:
    """Log the test metrics on the parent, tag the model version with them, move the alias if it is better.

    Args:
        run: the tracker inside the evaluate run.
        parent: the parent run id (:func:`open_pipeline_run`).
        ref: the training stage's run reference (``registered_model``, ``model_version``, ``run_id``).
        cfg: the ``tracking`` config section (alias name and minimum CPM).
        headline: flat numeric test metrics; ``cpm`` is the one that decides the alias.

    Returns:
        The :class:`~pipeline.tracking.registry.Promotion` (None without a registered version).
    """
    if not run.enabled:
        return None
    values = numeric(headline)
    if parent:
        run.log_metrics(values, run_id=parent)
    name, version = ref.get("registered_model"), ref.get("model_version")
    cpm = values.get("cpm")
    cpm = cpm if cpm is not None and math.isfinite(cpm) else None
    run.tag_model_version(name, version, {"evaluate_run_id": run.run_id,
                                          **{f"test.{k}": v for k, v in values.items() if k != "cpm"}})
    promotion = run.promote(name, version, cpm, cfg.champion_alias, cfg.champion_min_cpm)
    if parent and promotion is not None:
        run.set_tags({"model.registered_model_name": name, "model.registered_model_version": version,
                      f"model.{cfg.champion_alias}": str(promotion.promoted).lower()}, run_id=parent)
    return promotion


RUN_REF_FILE = "mlflow_run.json"  # in ``paths.models``: the train stage's run ids, read by evaluate and the notebook


def run_ref_path(models_dir: str | Path) -> Path:
    """Where the train stage leaves its run reference (:func:`write_run_ref`)."""
    return Path(models_dir) / RUN_REF_FILE


def write_run_ref(path: str | Path, ref: Mapping[str, Any]) -> None:
    """Write run ids for a later stage (atomically; JSON), e.g. ``{**run.run_ref(), "pipeline_key": key}``."""
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
