"""Tracker against a temporary SQLite store: params, metrics, artifacts, status, linking, no-op modes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config, TrackingConfig
from pipeline.tracking import (
    MlflowTracker,
    Tracker,
    TrackingUnavailable,
    create_tracker,
    flat_params,
    param_value,
    read_run_ref,
    write_run_ref,
)

REPO = Path(__file__).resolve().parents[2]


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _tracker(store_uri: str, **kw) -> MlflowTracker:
    tracker = create_tracker(TrackingConfig(tracking_uri=store_uri, **kw))
    assert isinstance(tracker, MlflowTracker)
    return tracker


def test_param_value_format():
    assert param_value([128, 128, 40]) == "[128, 128, 40]"
    assert param_value((0.5, 1.0)) == "[0.5, 1.0]"
    assert param_value(None) == "null"
    assert param_value(False) == "false"
    assert param_value(2.0) == "2.0"
    assert param_value("cosine") == "cosine"
    long = param_value("x" * 10_000)
    assert len(long) == 6000 and long.endswith("...[truncated]")


def test_params_equal_the_flat_config(store_uri):
    cfg = Config()
    tracker = _tracker(store_uri)
    with tracker.start("train") as run:
        run.log_params(cfg.flat())
        run_id = run.run_id
    params = _client(store_uri).get_run(run_id).data.params
    assert params == flat_params(cfg.flat())
    assert len(params) > 100  # more than one log_batch of 100
    assert params["train.loss.gamma"] == "2.0"
    assert params["data.synthetic.shape"] == "[128, 128, 40]"
    assert params["train.batch_size"] == "null"


def test_metrics_per_step_and_final(store_uri):
    tracker = _tracker(store_uri)
    with tracker.start("train") as run:
        for epoch, loss in enumerate([0.9, 0.5, 0.25]):
            run.log_metrics({"train/loss": loss, "lr": np.float32(1e-3)}, step=epoch)
        run.log_metrics({"final/cpm": 0.75})
        run_id = run.run_id
        with pytest.raises(TypeError, match="bad"):
            run.log_metrics({"bad": "x"})
    client = _client(store_uri)
    history = client.get_metric_history(run_id, "train/loss")
    history = sorted(history, key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.5), (2, 0.25)]
    assert client.get_run(run_id).data.metrics["final/cpm"] == 0.75


def test_artifacts_are_listed_under_the_store_folder(store_uri, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (tmp_path / "lesions.csv").write_text("case,lesion,hit\na,1,1\n")
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    (plan_dir / "plan.json").write_text("{}")
    (plan_dir / "fingerprint.json").write_text("{}")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    tracker = _tracker(store_uri)
    with tracker.start("evaluate") as run:
        run.log_artifact(tmp_path / "lesions.csv")
        run.log_artifact(plan_dir, artifact_path="plan")
        run.log_dict({"cpm": 0.5}, "metrics.json")
        run.log_text("seed: 0\n", "config/params.yaml")
        run.log_figure(fig, "plots/froc.png")
        with pytest.raises(FileNotFoundError, match="missing.txt"):
            run.log_artifact(tmp_path / "missing.txt")
        run_id = run.run_id
    plt.close(fig)
    client = _client(store_uri)

    def listing(path=None):
        out = []
        for info in client.list_artifacts(run_id, path):
            out += listing(info.path) if info.is_dir else [info.path]
        return out

    assert sorted(listing()) == [
        "config/params.yaml",
        "lesions.csv",
        "metrics.json",
        "plan/fingerprint.json",
        "plan/plan.json",
        "plots/froc.png",
    ]
    # a SQLite store keeps artifacts beside the database, never in a stray ./mlruns
    artifact_uri = client.get_run(run_id).info.artifact_uri
    assert str(tmp_path / "store" / "mlartifacts") in artifact_uri
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_failure_marks_run_and_parent_failed(store_uri, exc):
    tracker = _tracker(store_uri)
    parent = tracker.parent_run("key-1")
    with pytest.raises(type(exc)):
        with tracker.start("train", parent_run_id=parent) as run:
            run_id = run.run_id
            raise exc
    client = _client(store_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith(type(exc).__name__)
    assert client.get_run(parent).info.status == "FAILED"
    assert tracker.run_id is None


def test_success_and_sys_exit_zero_mark_finished(store_uri):
    tracker = _tracker(store_uri)
    with tracker.start("a") as run:
        a = run.run_id
    with pytest.raises(SystemExit):
        with tracker.start("b") as run:
            b = run.run_id
            sys.exit(0)
    client = _client(store_uri)
    assert client.get_run(a).info.status == "FINISHED"
    assert client.get_run(b).info.status == "FINISHED"


def test_sigterm_marks_run_failed(store_uri, tmp_path):
    # a separate process that is killed with SIGTERM while its run is active
    script = textwrap.dedent(
        f"""
        import sys, time
        from pipeline.config import TrackingConfig
        from pipeline.tracking import create_tracker
        tracker = create_tracker(TrackingConfig(tracking_uri={store_uri!r}))
        with tracker.start("train") as run:
            print(run.run_id, flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert _client(store_uri).get_run(run_id).info.status == "FAILED"


def test_disabled_or_nonzero_rank_is_a_noop(tmp_path, monkeypatch, closed_port):
    # an unreachable URI proves that nothing is even checked
    cfg = TrackingConfig(enabled=False, tracking_uri=f"http://127.0.0.1:{closed_port}")
    trackers = [create_tracker(cfg)]
    monkeypatch.setenv("RANK", "1")
    trackers.append(create_tracker(TrackingConfig(tracking_uri=f"http://127.0.0.1:{closed_port}")))
    for tracker in trackers:
        assert type(tracker) is Tracker and not tracker.enabled
        assert tracker.parent_run("k") is None
        with tracker.start("train", parent_run_id=None) as run:
            run.log_params({"a": 1})
            run.log_metrics({"m": 1.0}, step=0)
            run.log_artifact("does-not-matter")
            assert run.log_torch_model(None, np.zeros((1, 1, 2, 2, 2), np.float32), "x") is None
            assert run.run_id is None
        with pytest.raises(ValueError):  # exceptions still propagate
            with tracker.start("train"):
                raise ValueError
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, closed_port):
    uri = f"http://127.0.0.1:{closed_port}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable) as info:
        create_tracker(TrackingConfig(tracking_uri=uri))
    assert time.monotonic() - t0 < 10
    assert uri in str(info.value)
    assert "on_unreachable=fallback" in str(info.value)
    assert not (tmp_path / "mlflow.db").exists()  # nothing was recorded anywhere


def test_unreachable_server_env_uri_also_checked(monkeypatch, closed_port):
    uri = f"http://127.0.0.1:{closed_port}/"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingUnavailable, match=str(closed_port)):
        create_tracker(TrackingConfig())


def test_fallback_records_to_the_local_store(tmp_path, closed_port, caplog, _template_db):
    import shutil

    shutil.copy(_template_db, tmp_path / "mlflow.db")  # the local default store, in the cwd (tmp_path)
    uri = f"http://127.0.0.1:{closed_port}"
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        tracker = create_tracker(TrackingConfig(tracking_uri=uri, on_unreachable="fallback"))
    assert tracker.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracker.fallback_from == uri
    assert any(uri in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    with tracker.start("train") as run:
        run.log_metrics({"loss": 1.0}, step=0)
        run_id = run.run_id
    run = _client(tracker.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tracking.fallback_from"] == uri
    assert str(tmp_path / "mlartifacts") in run.info.artifact_uri


def test_parent_child_linking_and_reuse_by_key(store_uri, tmp_path):
    tracker = _tracker(store_uri)
    parent = tracker.parent_run("abc123-p1", tags={"git.commit": "abc123"})
    assert tracker.parent_run("abc123-p1") == parent  # same key -> same parent
    other = tracker.parent_run("abc123-p2")
    assert other != parent
    with pytest.raises(ValueError, match="pipeline_key"):
        tracker.parent_run("bad key'")

    with tracker.start("train", parent_run_id=parent) as run:
        assert run.parent_run_id == parent
        train_id = run.run_id
    write_run_ref(tmp_path / "models" / "run.json", {**tracker.run_ref(), "model_version": None})
    client = _client(store_uri)
    assert client.get_run(parent).info.status == "FINISHED"

    # the evaluate stage: another process in real life, so another tracker reading the reference
    ref = read_run_ref(tmp_path / "models" / "run.json")
    assert ref["run_id"] == train_id and ref["parent_run_id"] == parent
    evaluator = _tracker(store_uri)
    tags = {"train_run_id": ref["run_id"]}
    with evaluator.start("evaluate", parent_run_id=ref["parent_run_id"], tags=tags):
        pass
    children = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert {c.info.run_name for c in children} == {"train", "evaluate"}
    parent_run = client.get_run(parent)
    assert parent_run.data.tags["pipeline_key"] == "abc123-p1"
    assert parent_run.data.tags["mlflow.runName"] == "pipeline-abc123-p1"
    assert parent_run.data.tags["git.commit"] == "abc123"

    # a failed pipeline is not reused: the next execution with that key gets a fresh parent
    with pytest.raises(RuntimeError):
        with tracker.start("train", parent_run_id=parent):
            raise RuntimeError
    assert tracker.parent_run("abc123-p1") != parent


def test_unknown_parent_is_reported_and_not_linked(store_uri, caplog):
    tracker = _tracker(store_uri)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        with tracker.start("evaluate", parent_run_id="0" * 32) as run:
            run_id = run.run_id
    assert "0" * 32 in caplog.text
    assert "mlflow.parentRunId" not in _client(store_uri).get_run(run_id).data.tags


def test_read_run_ref_missing_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.json"):
        read_run_ref(tmp_path / "run.json")


def test_logging_outside_a_run_is_an_error(store_uri):
    tracker = _tracker(store_uri)
    with pytest.raises(RuntimeError, match="tracker.start"):
        tracker.log_metrics({"x": 1.0})


class _DataDependent:
    """A model torch.export cannot trace (data-dependent branch): logging falls back to pickle."""

    @staticmethod
    def build():
        import torch

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

            def forward(self, x):
                y = self.conv(x)
                if y.sum() > 1e9:  # data-dependent control flow
                    return y * 0
                return y

        return Net()


def test_torch_model_falls_back_to_pickle_and_registers(store_uri):
    import mlflow
    import torch

    torch.manual_seed(0)
    model = _DataDependent.build()
    tracker = _tracker(store_uri)
    with tracker.start("train") as run:
        info = run.log_torch_model(model, np.zeros((1, 1, 8, 8, 8), np.float32), "tiny-fallback")
        run_id = run.run_id
    assert info["serialization_format"] == "pickle"
    assert info["registered_model_version"] == 1
    client = _client(store_uri)
    version = client.get_model_version("tiny-fallback", "1")
    assert version.run_id == run_id
    mlflow.set_registry_uri(store_uri)
    loaded = mlflow.pytorch.load_model("models:/tiny-fallback/1")
    x = torch.rand(1, 1, 8, 12, 16)
    torch.testing.assert_close(loaded(x), model(x))
    assert client.get_run(run_id).data.tags["model.serialization_format"] == "pickle"
