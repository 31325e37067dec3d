"""Params, metrics, tags and artifacts of a run, against a temporary SQLite store."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.tracking import flat_params, param_value
from pipeline.tracking.run_data import tag_values


def test_param_value_format():
    assert param_value([128, 128, 40]) == "[128, 128, 40]"
    assert param_value((0.5, 1.0)) == "[0.5, 1.0]"
    assert param_value(None) == "null"
    assert param_value(False) == "false"
    assert param_value(2.0) == "2.0"
    assert param_value("cosine") == "cosine"
    long = param_value("x" * 10_000)
    assert len(long) == 6000 and long.endswith("...[truncated]")


def test_tag_values_keep_strings_and_cut_long_ones():
    tags = tag_values({"git.commit": "abc", "n": 3, "ok": True, "none": None, "long": "y" * 9000})
    assert tags == {"git.commit": "abc", "n": "3", "ok": "true", "none": "null", "long": "y" * 8000}


def test_params_equal_the_flat_config(new_tracker, client):
    cfg = Config()
    tracker = new_tracker()
    with tracker.start("train") as run:
        run.log_params(cfg.flat())
        run_id = run.run_id
    params = client.get_run(run_id).data.params
    assert params == flat_params(cfg.flat())
    assert len(params) > 100  # more than one log_batch of 100
    assert params["train.loss.gamma"] == "2.0"
    assert params["data.synthetic.shape"] == "[128, 128, 40]"
    assert params["train.batch_size"] == "null"


def test_metrics_per_step_and_final(new_tracker, client):
    tracker = new_tracker()
    with tracker.start("train") as run:
        for epoch, loss in enumerate([0.9, 0.5, 0.25]):
            run.log_metrics({"train/loss": loss, "lr": np.float32(1e-3)}, step=epoch)
        run.log_metrics({"final/cpm": 0.75})
        run_id = run.run_id
        with pytest.raises(TypeError, match="bad"):
            run.log_metrics({"bad": "x"})
    history = client.get_metric_history(run_id, "train/loss")
    history = sorted(history, key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.5), (2, 0.25)]
    assert client.get_run(run_id).data.metrics["final/cpm"] == 0.75


def test_artifacts_are_listed_under_the_store_folder(tmp_path, new_tracker, client):
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
    tracker = new_tracker()
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
