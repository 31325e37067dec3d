"""What goes into a run: params, metrics, tags and artifacts, and how values are written for MLflow.

Functions over an ``MlflowClient`` and a run id, batched to MLflow's limits (100 params or tags, 1000
metrics per ``log_batch``). :class:`~pipeline.tracking.mlflow_tracker.MlflowTracker` calls them for its
active run (or a given one, e.g. the parent).

Value format (:func:`param_value`): JSON for lists, tuples, dicts, None and bools, ``str`` otherwise, cut
to MLflow 3's 6000 characters for a param and 8000 for a tag.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow 3's limit on a param value
MAX_TAG_CHARS = 8000
PARAMS_PER_BATCH = 100  # MLflow's limit on params (and tags) in one log_batch
METRICS_PER_BATCH = 1000


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
    """``{"train.loss.gamma": 2.0}`` -> ``{"train.loss.gamma": "2.0"}``, as :func:`log_params` logs it."""
    return {str(k): param_value(v) for k, v in flat.items()}


def tag_values(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags as MLflow stores them: strings kept, other values as :func:`param_value`; cut to 8000 chars.

    >>> tag_values({"a": "x", "n": 3, "none": None})
    {'a': 'x', 'n': '3', 'none': 'null'}
    """
    return {str(k): (v if isinstance(v, str) else param_value(v))[:MAX_TAG_CHARS]
            for k, v in (tags or {}).items()}


def set_tags(client: Any, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set tags on ``run_id`` (values as :func:`tag_values`)."""
    from mlflow.entities import RunTag

    items = [RunTag(k, v) for k, v in tag_values(tags).items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=items[i : i + PARAMS_PER_BATCH])


def log_params(client: Any, run_id: str, flat: Mapping[str, Any]) -> None:
    """Log a flat ``{"dotted.key": value}`` dict as params of ``run_id`` (format: :func:`param_value`).

    Params are immutable in MLflow: logging a key again with another value raises.
    """
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flat_params(flat).items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])


def merge_params(client: Any, run_id: str, flat: Mapping[str, Any]) -> None:
    """Log the params that ``run_id`` (e.g. the parent) does not have yet; keep the existing ones.

    A key already logged with another value is left as it is (params are immutable) and reported in a
    WARNING; a parent run's key includes the config, so this only happens for keys outside it.
    """
    have = client.get_run(run_id).data.params
    new = flat_params(flat)
    clash = sorted(k for k, v in new.items() if k in have and have[k] != v)
    if clash:
        log.warning("MLflow: run %s keeps its values of %d param(s) that differ here: %s", run_id,
                    len(clash), ", ".join(clash[:10]))
    log_params(client, run_id, {k: v for k, v in new.items() if k not in have})


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log numeric metrics of ``run_id`` at ``step`` (e.g. the epoch; None -> 0), timestamped now.

    NumPy scalars, size-1 arrays and 0-d tensors are accepted; non-finite values are kept (NaN).

    Raises:
        TypeError: a value is not a number (bools are not numbers here), naming its key.
    """
    from mlflow.entities import Metric

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
        client.log_batch(run_id, metrics=items[i : i + METRICS_PER_BATCH])


def log_artifact(client: Any, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file, or a folder's contents, under ``artifact_path`` of ``run_id``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        raise FileNotFoundError(f"artifact to log does not exist: {path}")
