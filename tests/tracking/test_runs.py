"""Run lifecycle against a temporary SQLite store: parent runs by key, child runs, their status."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.tracking import read_run_ref, write_run_ref

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_failure_marks_run_and_parent_failed(exc, new_tracker, client):
    tracker = new_tracker()
    parent = tracker.parent_run("key-1")
    with pytest.raises(type(exc)):
        with tracker.start("train", parent_run_id=parent) as run:
            run_id = run.run_id
            raise exc
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith(type(exc).__name__)
    assert client.get_run(parent).info.status == "FAILED"
    assert tracker.run_id is None


def test_success_and_sys_exit_zero_mark_finished(new_tracker, client):
    tracker = new_tracker()
    with tracker.start("a") as run:
        a = run.run_id
    with pytest.raises(SystemExit):
        with tracker.start("b") as run:
            b = run.run_id
            sys.exit(0)
    assert client.get_run(a).info.status == "FINISHED"
    assert client.get_run(b).info.status == "FINISHED"


def test_sigterm_marks_run_failed(store_uri, tmp_path, client):
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
    assert client.get_run(run_id).info.status == "FAILED"


def test_parent_child_linking_and_reuse_by_key(tmp_path, new_tracker, client):
    tracker = new_tracker()
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
    assert client.get_run(parent).info.status == "FINISHED"

    # the evaluate stage: another process in real life, so another tracker reading the reference
    ref = read_run_ref(tmp_path / "models" / "run.json")
    assert ref["run_id"] == train_id and ref["parent_run_id"] == parent
    evaluator = new_tracker()
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


def test_unknown_parent_is_reported_and_not_linked(caplog, new_tracker, client):
    tracker = new_tracker()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        with tracker.start("evaluate", parent_run_id="0" * 32) as run:
            run_id = run.run_id
    assert "0" * 32 in caplog.text
    assert "mlflow.parentRunId" not in client.get_run(run_id).data.tags
