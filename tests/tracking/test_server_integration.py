"""A tiny tracked pipeline against a real ``mlflow server`` (SQLite backend) on a free loopback port.

The server runs with one worker and no job runner (3 processes instead of ~17) in its own process group,
which is stopped as a whole; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config, TrackingConfig
from pipeline.tracking import create_tracker, flat_params, lineage_tags, read_run_ref, write_run_ref
from tests.tracking.mlflow_process import mlflow_process

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 90


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with mlflow_process(lambda port: [
        "server",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "server-artifacts"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ], "/health", root, env, START_TIMEOUT_S) as url:  # fmt: skip
        yield url


def _tiny_unet():
    import torch

    class TinyUNet(torch.nn.Module):
        """(N, 1, X, Y, Z) -> (N, 2, X, Y, Z); X, Y, Z even."""

        def __init__(self) -> None:
            super().__init__()
            self.enc = torch.nn.Conv3d(1, 4, 3, padding=1)
            self.down = torch.nn.Conv3d(4, 8, 3, stride=2, padding=1)
            self.up = torch.nn.ConvTranspose3d(8, 4, 2, stride=2)
            self.head = torch.nn.Conv3d(8, 2, 1)

        def forward(self, x):
            e = torch.relu(self.enc(x))
            u = self.up(torch.relu(self.down(e)))
            return self.head(torch.cat([e, u], dim=1))

    torch.manual_seed(0)
    return TinyUNet()


def test_tracked_pipeline_against_a_real_server(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import torch

    # bound the client's waits too (its default retries last minutes)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    with mlflow_server(tmp_path) as url:
        cfg = Config(tracking=TrackingConfig(tracking_uri=url, experiment="it", registered_model="tiny-unet"))
        (work / "params.yaml").write_text("seed: 0\n")
        (work / "plan.json").write_text('{"patch_size": [16, 16, 16]}')
        (work / "fingerprint.json").write_text('{"median_spacing_mm": [0.8, 0.8, 2.5]}')

        # --- train stage ---
        tracker = create_tracker(cfg.tracking)
        assert tracker.uri == url
        parent = tracker.parent_run("deadbeef-0001")
        model = _tiny_unet()
        with tracker.start("train", parent_run_id=parent, tags=lineage_tags(None, device="cpu")) as run:
            run.log_params(cfg.flat())
            for epoch, loss in enumerate([0.8, 0.4]):
                run.log_metrics({"train/loss": loss, "val/dice": 1 - loss}, step=epoch)
            run.log_metrics({"best/val_dice": 0.6})
            for name in ("params.yaml", "plan.json", "fingerprint.json"):
                run.log_artifact(work / name, artifact_path="config" if name == "params.yaml" else "plan")
            fig, ax = plt.subplots()
            ax.plot([0.8, 0.4])
            run.log_figure(fig, "plots/training_curves.png")
            plt.close(fig)
            model_info = run.log_torch_model(
                model, np.random.rand(1, 1, 16, 16, 16).astype(np.float32), cfg.tracking.registered_model
            )
            write_run_ref(work / "run.json", {**run.run_ref(), "model": model_info})
        train_id = read_run_ref(work / "run.json")["run_id"]

        # --- evaluate stage (a separate process under DVC: a new tracker and the run reference) ---
        ref = read_run_ref(work / "run.json")
        (work / "lesions.csv").write_text("case,lesion,hit,score\nc0,1,1,0.9\n")
        evaluator = create_tracker(cfg.tracking)
        tags = {"train_run_id": train_id}
        with evaluator.start("evaluate", parent_run_id=ref["parent_run_id"], tags=tags) as run:
            run.log_metrics({"froc/cpm": 0.7, "froc/sens_at_1fp": 0.8})
            run.log_artifact(work / "lesions.csv")
            run.log_dict({"cpm": 0.7}, "metrics.json")
            fig, ax = plt.subplots()
            ax.plot([0.125, 8], [0.5, 0.9])
            run.log_figure(fig, "plots/froc.png")
            plt.close(fig)
            eval_id = run.run_id

        # --- checks through the MLflow client, against the server ---
        client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
        train = client.get_run(train_id)
        assert train.info.status == "FINISHED"
        assert train.data.params == flat_params(cfg.flat())
        assert train.data.tags["mlflow.parentRunId"] == parent
        assert train.data.tags["device"] == "cpu"
        assert train.data.tags["version.mlflow"] == mlflow.__version__
        history = sorted(client.get_metric_history(train_id, "train/loss"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(0, 0.8), (1, 0.4)]
        assert train.data.metrics["best/val_dice"] == 0.6
        assert {a.path for a in client.list_artifacts(train_id)} >= {"config", "plan", "plots"}
        plan = {a.path for a in client.list_artifacts(train_id, "plan")}
        assert plan == {"plan/plan.json", "plan/fingerprint.json"}

        evaluate = client.get_run(eval_id)
        assert evaluate.info.status == "FINISHED"
        assert evaluate.data.tags["mlflow.parentRunId"] == parent
        assert evaluate.data.metrics == {"froc/cpm": 0.7, "froc/sens_at_1fp": 0.8}
        assert {a.path for a in client.list_artifacts(eval_id)} == {"lesions.csv", "metrics.json", "plots"}
        local = client.download_artifacts(eval_id, "lesions.csv", str(tmp_path))
        assert Path(local).read_text().startswith("case,lesion")

        assert client.get_run(parent).info.status == "FINISHED"
        assert tracker.parent_run("deadbeef-0001") == parent  # same key -> same parent

        # the model: logged with a signature and example, registered, loadable with free spatial dims
        assert model_info["serialization_format"] == "pt2"
        assert model_info["registered_model_version"] == 1
        version = client.get_model_version("tiny-unet", "1")
        assert version.run_id == train_id
        logged = mlflow.get_logged_model(model_info["model_id"])
        assert logged.source_run_id == train_id
        mlflow.set_tracking_uri(url)
        mlflow.set_registry_uri(url)
        mlmodel = mlflow.models.get_model_info("models:/tiny-unet/1")
        assert mlmodel.signature is not None
        assert mlmodel.signature.inputs.inputs[0].shape == (-1, 1, -1, -1, -1)
        assert mlmodel.saved_input_example_info is not None
        loaded = mlflow.pytorch.load_model("models:/tiny-unet/1")
        x = torch.rand(3, 1, 8, 16, 12)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model.eval()(x))


@pytest.mark.slow
def test_the_real_cli_pipeline_logs_to_a_server(tmp_path):
    """prepare-data -> preprocess -> train -> evaluate through the CLI with MLFLOW_TRACKING_URI pointing at a
    real server: the train run's params equal the config, the evaluate run holds the FROC plot and
    metrics, and the model is registered."""
    import yaml

    from pipeline.config import load_config

    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    overrides = ["data.synthetic.n_cases=6", "data.synthetic.shape=[48,48,16]", "train.epochs=1",
                 "train.steps_per_epoch=2", "train.val_every=1", "train.model.base_filters=4",
                 "train.model.max_filters=16", "evaluation.bootstrap=10", "tracking.registered_model=cli-unet"]
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "params.yaml", overrides)
    (work / "configs" / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    with mlflow_server(tmp_path) as url:
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_DISABLE_TELEMETRY": "true"}
        for command in ("prepare-data", "preprocess", "train", "evaluate"):
            proc = subprocess.run([sys.executable, "-m", "pipeline", command, "-q"], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=300, check=False)
            assert proc.returncode == 0, f"{command}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        assert not (work / "mlflow.db").exists()  # nothing went to the local store

        from mlflow.tracking import MlflowClient

        # explicit URIs: an earlier test in this process may have set mlflow's global registry URI
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
        by_name = {r.info.run_name: r for r in runs}
        train, evaluate = by_name["train"], by_name["evaluate"]
        assert train.data.params == flat_params(cfg.flat())
        assert train.data.tags["mlflow.parentRunId"] == evaluate.data.tags["mlflow.parentRunId"]
        assert {"cpm", "sens_at_1fp"} <= set(evaluate.data.metrics)
        assert "loss" in train.data.metrics
        artifacts = {a.path for a in client.list_artifacts(evaluate.info.run_id, "evaluation")}
        assert {"evaluation/froc.png", "evaluation/metrics.json", "evaluation/lesions.csv"} <= artifacts
        versions = client.search_model_versions("name='cli-unet'")
        assert versions and versions[0].run_id == train.info.run_id
        assert all(r.info.status == "FINISHED" for r in (train, evaluate))
        # one parent run per execution holds the params and the headline test metrics
        parent = client.get_run(train.data.tags["mlflow.parentRunId"])
        assert parent.info.run_name == "pipeline" and parent.info.status == "FINISHED"
        assert parent.data.params == flat_params(cfg.flat())
        assert parent.data.metrics["cpm"] == evaluate.data.metrics["cpm"]
        assert "best_val_cpm" in parent.data.metrics
        # the registered version is the whole-scan pyfunc model, tagged with its lineage and test CPM
        version = versions[0]
        assert version.tags["pipeline_key"] == parent.data.tags["pipeline_key"]
        assert {"data.hash", "test.cpm", "train_run_id", "evaluate_run_id"} <= set(version.tags)
        assert train.data.tags["model.flavor"] == "pyfunc"
