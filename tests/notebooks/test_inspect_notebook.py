"""``notebooks/inspect_predictions.ipynb``: committed stripped, and executed end to end on tiny runs.

The slow test runs the real CLI (prepare-data, preprocess, train, evaluate; MLflow on, SQLite store in
the temp dir) on a tiny configuration, then executes the notebook with nbclient on it, from the
workspace outputs and from the latest MLflow run. A model trained for seconds detects nothing, so the
notebook is also executed on a hand-made evaluated workspace (``tests/inspection/inspection_workspace.py``)
where hits, misses and false positives all exist. Executed notebooks are saved in the test's temp dir
(and copied to ``$PIPELINE_NOTEBOOK_OUT`` when set, to look at them).

The kernel is a private kernelspec written to a temp dir (``$JUPYTER_PATH``) that runs this very
interpreter, so the test works on a fresh machine whatever kernels are installed there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "inspect_predictions.ipynb"
BUILDER = REPO / "notebooks" / "build_inspect_predictions.py"
KERNEL = "rare-lesion-test-python"
TINY = ["data.synthetic.n_cases=6", "data.synthetic.shape=[48,48,16]", "train.epochs=1",
        "train.steps_per_epoch=3", "train.model.base_filters=4"]
VIEW_CELLS = {"view-missed": "missed", "view-fp": "FP", "view-detected": "TP"}
IMAGE_CELLS = ("gallery-missed", "gallery-fp", "froc")


def _builder():
    spec = importlib.util.spec_from_file_location("build_inspect_predictions", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_committed_notebook_is_stripped_and_generated():
    import nbformat

    raw = json.loads(NOTEBOOK.read_text())
    code = [c for c in raw["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    nbformat.validate(nbformat.reads(NOTEBOOK.read_text(), as_version=4))
    # the committed file is exactly what the generator writes (edit the generator, then rebuild)
    assert NOTEBOOK.read_text() == nbformat.writes(_builder().build()) + "\n"
    tags = {t for c in code for t in c.get("metadata", {}).get("tags", [])}
    assert set(VIEW_CELLS) | set(IMAGE_CELLS) | {"parameters", "summary"} <= tags


# ----------------------------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory):
    """A kernelspec running ``sys.executable`` in a temp ``JUPYTER_PATH``; restored afterwards."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rare-lesion tests", "language": "python"}))
    mp = pytest.MonkeyPatch()
    for var, first in (("JUPYTER_PATH", root), ("PYTHONPATH", REPO)):  # ours first, then any existing
        mp.setenv(var, os.pathsep.join([str(first), os.environ.get(var, "")]).rstrip(os.pathsep))
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("PIPELINE_RUN_ID", raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, kernel_env) -> Path:
    """A tiny pipeline run by the real CLI in a temp working directory (about 40 s on 2 CPU cores)."""
    from pipeline.config import dump_config, load_config

    work = tmp_path_factory.mktemp("tiny_run")
    (work / "configs").mkdir()
    cfg = load_config(REPO / "configs" / "params.yaml", TINY)
    (work / "configs" / "params.yaml").write_text(dump_config(cfg))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    for command in ("prepare-data", "preprocess", "train", "evaluate"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline", command, "-q"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, f"{command} failed:\n{proc.stdout}\n{proc.stderr}"
        print(f"{command}: {time.perf_counter() - t0:.1f} s")
    assert (work / "mlflow.db").is_file()
    assert (work / "results" / "evaluation" / "lesion_views" / "index.md").is_file()  # the stage's export
    return work


def _execute(workdir: Path, run_id: str | None, out: Path, monkeypatch: pytest.MonkeyPatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PIPELINE_WORKDIR", str(workdir))
    if run_id:
        monkeypatch.setenv("PIPELINE_RUN_ID", run_id)
    else:
        monkeypatch.delenv("PIPELINE_RUN_ID", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t0 = time.perf_counter()
    # cwd: a temp dir, so that nothing is written into the repository
    resources = {"metadata": {"path": str(out.parent)}}
    client = NotebookClient(nb, timeout=300, kernel_name=KERNEL, resources=resources)
    client.execute()
    print(f"notebook on {workdir.name} ({run_id or 'workspace'}): {time.perf_counter() - t0:.1f} s")
    nbformat.write(nb, out)
    if os.environ.get("PIPELINE_NOTEBOOK_OUT"):
        dst = Path(os.environ["PIPELINE_NOTEBOOK_OUT"])
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, dst / out.name)
    return nb


def _outputs(nb) -> dict[str, list]:
    return {t: c.outputs for c in nb.cells if c.cell_type == "code" for t in c.metadata.get("tags", [])}


def _pngs(outputs: list) -> list[bytes]:
    import base64

    return [base64.b64decode(o["data"]["image/png"]) for o in outputs if "image/png" in o.get("data", {})]


def _check(nb, kinds: set[str]) -> None:
    """No errors or stderr; images in every view cell whose kind exists, a reason printed otherwise."""
    from io import BytesIO

    from matplotlib.image import imread

    for cell in nb.cells:
        for o in cell.get("outputs", []):
            assert o["output_type"] != "error", f"{o.get('ename')}: {o.get('evalue')}"
            assert not (o["output_type"] == "stream" and o["name"] == "stderr"), o["text"]
    outputs = _outputs(nb)
    assert any("text/html" in o.get("data", {}) for o in outputs["summary"])  # the metrics table
    assert any("text/html" in o.get("data", {}) for o in outputs["table-sorted"])  # the lesion table
    for tag in IMAGE_CELLS:
        assert len(_pngs(outputs[tag])) == 1, tag
    for tag, kind in VIEW_CELLS.items():
        pngs = _pngs(outputs[tag])
        if kind in kinds:
            assert len(pngs) == 1, tag
            img = imread(BytesIO(pngs[0]))
            assert img.shape[1] > 1000 and img.shape[0] > 400  # the three panels side by side
        else:
            assert not pngs and "No " in "".join(o.get("text", "") for o in outputs[tag]), tag


@pytest.mark.slow
@pytest.mark.parametrize("run_id", [None, "latest"])
def test_notebook_on_a_tiny_pipeline_run(tiny_run, run_id, tmp_path, monkeypatch):
    from pipeline.inspection import load_run

    kinds = set(load_run(tiny_run).lesions["kind"].astype(str))
    nb = _execute(tiny_run, run_id, tmp_path / f"inspect_predictions_tiny_{run_id or 'workspace'}.ipynb",
                  monkeypatch)
    _check(nb, kinds)
    summary = "".join(o.get("text", "") for o in _outputs(nb)["summary"] if o["output_type"] == "stream")
    assert ("mlflow run" if run_id else "workspace") in summary


@pytest.mark.slow
def test_notebook_shows_hits_misses_and_false_positives(kernel_env, tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "tests" / "inspection"))
    from inspection_workspace import build_workspace

    ws = build_workspace(tmp_path / "handmade", bootstrap=200, export=True)
    nb = _execute(ws.root, None, tmp_path / "inspect_predictions_handmade.ipynb", monkeypatch)
    _check(nb, {"missed", "FP", "TP"})
