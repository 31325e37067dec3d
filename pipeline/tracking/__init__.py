"""Experiment tracking with MLflow: the only package that imports mlflow (lazily, inside functions).

Typical stage use (train)::

    tracker = create_tracker(cfg.tracking)          # resolves + checks the store before any work
    parent, key = open_pipeline_run(tracker, cfg)   # one parent run per pipeline execution (params on it)
    with tracker.start("train", parent_run_id=parent, tags=lineage_tags(data_dir)) as run:
        run.log_params(cfg.flat())
        run.log_metrics({"train/loss": loss}, step=epoch)
        run.log_scan_model(best_pt, n_channels, cfg.tracking.registered_model)   # whole-scan pyfunc
        write_run_ref(ref_path, run.run_ref())

(``open_pipeline_run`` / ``finish_pipeline_run`` live in :mod:`pipeline.tracking.pipeline_run`.)

See :mod:`pipeline.tracking.mlflow_tracker` for which module does which job, :mod:`pipeline.tracking.runs`
for the run status rules and :mod:`pipeline.tracking.lineage` for the tag names.
"""

from pipeline.tracking.artifacts import RunNotFound, download_run_artifacts, get_run, latest_run
from pipeline.tracking.lineage import lineage_tags
from pipeline.tracking.mlflow_tracker import (
    MlflowTracker,
    NullTracker,
    Tracker,
    create_tracker,
    distributed_rank,
)
from pipeline.tracking.pipeline_run import read_run_ref, write_run_ref
from pipeline.tracking.registry import should_promote
from pipeline.tracking.run_data import flat_params, param_value
from pipeline.tracking.run_key import pipeline_key
from pipeline.tracking.store import (
    TrackingUnavailable,
    check_reachable,
    local_store_uri,
    resolve_tracking_uri,
)

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "RunNotFound",
    "Tracker",
    "TrackingUnavailable",
    "check_reachable",
    "create_tracker",
    "distributed_rank",
    "download_run_artifacts",
    "flat_params",
    "get_run",
    "latest_run",
    "lineage_tags",
    "local_store_uri",
    "param_value",
    "pipeline_key",
    "read_run_ref",
    "resolve_tracking_uri",
    "should_promote",
    "write_run_ref",
]
