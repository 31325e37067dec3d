"""One parent run per pipeline execution holding params and headline test metrics; the champion alias.

Train and evaluate are separate processes under ``dvc repro``: each builds its own tracker here, and the
evaluate side knows only what the train side wrote to ``mlflow_run.json``.
"""

from __future__ import annotations

import json

import pytest

from pipeline.config import config_from_dict
from pipeline.tracking import create_tracker, read_run_ref, write_run_ref
from pipeline.tracking.pipeline_run import finish_pipeline_run, open_pipeline_run


@pytest.fixture
def make_cfg(tmp_path, store_uri):
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "case.nii.gz").write_bytes(b"\1" * 8)
    (tmp_path / "data" / "splits.json").write_text(json.dumps({"train": ["case"], "test": []}))

    def make(**train):
        return config_from_dict({"tracking": {"tracking_uri": store_uri, "registered_model": "m"},
                                 "train": train})
    return make


@pytest.fixture
def registry(client):
    """The store's client, with the registered model ``m`` the train stage registers versions of."""
    client.create_registered_model("m")
    return client


@pytest.fixture
def ref_path(tmp_path):
    return tmp_path / "models" / "mlflow_run.json"


def _train(cfg, ref_path, client):
    tracker = create_tracker(cfg.tracking)
    parent, key = open_pipeline_run(tracker, cfg)
    with tracker.start("train", parent_run_id=parent) as run:
        run.log_metrics({"best_val_cpm": 0.5}, run_id=parent)
        version = client.create_model_version("m", source="file:///nowhere/model", run_id=run.run_id).version
        write_run_ref(ref_path, {**run.run_ref(), "pipeline_key": key, "registered_model": "m",
                                 "model_version": int(version)})
    return parent


def _evaluate(cfg, ref_path, cpm):
    tracker = create_tracker(cfg.tracking)
    ref = read_run_ref(ref_path)
    parent, _ = open_pipeline_run(tracker, cfg, prefer=ref["parent_run_id"])
    with tracker.start("evaluate", parent_run_id=parent) as run:
        promotion = finish_pipeline_run(run, parent, ref, cfg.tracking,
                                        {"cpm": cpm, "sens_at_1.0fp": cpm, "lesions_total": 12})
    return parent, promotion


def test_train_and_evaluate_share_one_parent_with_params_and_test_metrics(make_cfg, ref_path, registry):
    client = registry
    cfg = make_cfg(epochs=3)

    train_parent = _train(cfg, ref_path, client)
    eval_parent, promotion = _evaluate(cfg, ref_path, 0.62)
    assert eval_parent == train_parent
    parent = client.get_run(train_parent)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{train_parent}'")
    assert sorted(c.info.run_name for c in children) == ["evaluate", "train"]
    # one row relates the parameters to the test CPM
    assert parent.data.params["train.epochs"] == "3"
    assert len(parent.data.params) == len(cfg.flat())
    assert parent.data.metrics["cpm"] == pytest.approx(0.62)
    assert parent.data.metrics["best_val_cpm"] == pytest.approx(0.5)
    assert parent.data.tags["pipeline_key"] == read_run_ref(ref_path)["pipeline_key"]
    assert parent.data.tags["model.champion"] == "true"
    assert parent.info.status == "FINISHED"
    assert promotion.promoted
    version = client.get_model_version("m", "1")
    evaluate_id = next(c.info.run_id for c in children if c.info.run_name == "evaluate")
    assert version.tags["test.cpm"] == "0.62" and version.tags["evaluate_run_id"] == evaluate_id
    assert int(client.get_model_version_by_alias("m", "champion").version) == 1

    # a smoke run (other parameters -> another execution, another parent) with a worse CPM
    smoke = make_cfg(epochs=1)
    smoke_parent = _train(smoke, ref_path, client)
    assert smoke_parent != train_parent
    _, promotion = _evaluate(smoke, ref_path, 0.0)
    assert not promotion.promoted
    assert int(client.get_model_version_by_alias("m", "champion").version) == 1
    assert client.get_run(smoke_parent).data.tags["model.champion"] == "false"


def test_a_failed_evaluation_is_completed_in_the_same_parent(make_cfg, ref_path, registry):
    """Re-running only evaluate after it failed (train is cached) reuses the training run's parent."""
    client = registry
    cfg = make_cfg(epochs=2)
    train_parent = _train(cfg, ref_path, client)
    tracker = create_tracker(cfg.tracking)
    with pytest.raises(RuntimeError):
        with tracker.start("evaluate", parent_run_id=train_parent):
            raise RuntimeError("out of memory")
    assert client.get_run(train_parent).info.status == "FAILED"
    parent, _ = _evaluate(cfg, ref_path, 0.4)
    assert parent == train_parent
    assert client.get_run(parent).info.status == "FINISHED"


def test_disabled_tracking_opens_nothing(make_cfg):
    cfg = config_from_dict({"tracking": {"enabled": False}})
    tracker = create_tracker(cfg.tracking)
    assert open_pipeline_run(tracker, cfg) == (None, None)
    with tracker.start("evaluate") as run:
        assert finish_pipeline_run(run, None, {}, cfg.tracking, {"cpm": 0.9}) is None


def test_run_ref_round_trip_and_a_missing_one_names_the_file(tmp_path):
    ref = {"run_id": "r1", "parent_run_id": None, "model_version": 3}
    write_run_ref(tmp_path / "models" / "run.json", ref)
    assert read_run_ref(tmp_path / "models" / "run.json") == ref
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_run_ref(tmp_path / "missing.json")
