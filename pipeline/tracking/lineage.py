"""Lineage tags for a run: code version, DVC experiment, data hash, package versions, device.

Tag names (all values are strings):

=====================  ======================================================================
``git.commit``         ``git rev-parse HEAD`` (absent outside a git repository or before the first commit);
                       also written as MLflow's ``mlflow.source.git.commit`` so the UI shows it
``git.dirty``          ``true`` if a tracked file is modified or staged (``git status --porcelain
                       --untracked-files=no``), DVC's own files excepted (``dvc.lock``, ``.dvc/``,
                       ``.gitignore`` files, which ``dvc repro`` itself writes): the commit alone does
                       not reproduce the run. Untracked files do not count (a fresh clone after
                       ``dvc repro`` has an untracked ``dvc.lock`` and ``.dvc/``)
``git.dirty_files``    up to 20 of the files that made it dirty, comma-separated (only when dirty)
``dvc.exp_name``       ``$DVC_EXP_NAME``, set by ``dvc exp run`` for every stage command
``dvc.exp_baseline``   ``$DVC_EXP_BASELINE_REV`` (the commit the experiment is based on), with the above
``dvc.stage``          ``$DVC_STAGE``, set by ``dvc repro`` / ``dvc exp run``
``data.path``          the data folder the hash describes
``data.dvc_md5``       DVC's md5 of that folder (an ``outs`` entry of ``dvc.lock`` or a ``<data>.dvc`` file),
                       when DVC tracks it
``data.stat_hash``     always: md5 over (relative path, size, mtime ns) of every file (fast, no reading)
``data.hash_source``   where ``data.dvc_md5`` came from, or ``stat-only`` when DVC does not track the data
``version.<pkg>``      torch, monai, numpy, mlflow, dvc, pipeline, python
``device``             ``cpu`` or ``cuda:<index> <name>``; ``device.count`` for CUDA
=====================  ======================================================================

Nothing here imports mlflow; torch is imported only to name a CUDA device when none is given.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

_PACKAGES = {"torch": "torch", "monai": "monai", "numpy": "numpy", "mlflow": "mlflow", "dvc": "dvc"}


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


# written by DVC itself during `dvc repro` / `dvc exp run`: a change there says nothing about the code
_DVC_OWN_FILES = ("dvc.lock", ".gitignore")
_DVC_OWN_DIRS = (".dvc/",)


def dirty_paths(porcelain: str) -> list[str]:
    """Paths of ``git status --porcelain`` (v1) output that make a run irreproducible from its commit.

    Untracked (``??``) and ignored (``!!``) entries and DVC's own files are dropped; for a rename the new
    path is kept. Pure (no git call).

    >>> dirty_paths(" M pipeline/x.py\\n?? dvc.lock\\n M dvc.lock\\n M data/.gitignore\\nA  .dvc/config\\n")
    ['pipeline/x.py']
    """
    paths = []
    for line in porcelain.splitlines():
        if len(line) < 4 or line[:2] in ("??", "!!"):
            continue
        path = line[3:].split(" -> ")[-1].strip().strip('"')
        if Path(path).name in _DVC_OWN_FILES or path.startswith(_DVC_OWN_DIRS):
            continue
        paths.append(path)
    return paths


def git_tags(repo_dir: str | Path | None = None) -> dict[str, str]:
    """``git.commit``, ``git.dirty`` (and ``git.dirty_files``); empty when git or a commit is unavailable."""
    cwd = Path(repo_dir or Path.cwd())
    commit = _git(["rev-parse", "HEAD"], cwd)
    if not commit:
        return {}
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    tags = {"git.commit": commit.strip(), "mlflow.source.git.commit": commit.strip()}
    if status is not None:
        dirty = dirty_paths(status)
        tags["git.dirty"] = "true" if dirty else "false"
        if dirty:
            tags["git.dirty_files"] = ",".join(dirty[:20]) + (",..." if len(dirty) > 20 else "")
    return tags


def dvc_env_tags(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """DVC's experiment name, baseline and stage from the environment DVC gives stage commands."""
    env = os.environ if env is None else env
    names = {
        "DVC_EXP_NAME": "dvc.exp_name",
        "DVC_EXP_BASELINE_REV": "dvc.exp_baseline",
        "DVC_STAGE": "dvc.stage",
    }
    return {tag: env[var] for var, tag in names.items() if env.get(var)}


def stat_hash(path: str | Path) -> str:
    """md5 over ``relative path, size, mtime_ns`` of every file below ``path`` (sorted; no file is read).

    Fast on large data sets; changes when a file is added, removed, resized or touched.
    """
    root = Path(path)
    h = hashlib.md5(usedforsecurity=False)
    if root.is_file():
        entries = [(root.name, root.stat())]
    else:
        entries = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in filenames:
                full = Path(dirpath, name)
                entries.append((full.relative_to(root).as_posix(), full.stat()))
    for rel, st in sorted(entries, key=lambda e: e[0]):
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def dvc_md5(data_dir: str | Path, dvc_lock: str | Path) -> tuple[str, str] | None:
    """DVC's md5 of ``data_dir`` and where it was found, or None.

    Looks at the ``outs`` of every stage in ``dvc_lock`` (an upstream stage's outputs are written to the
    lock file when that stage finishes, so they are current while a later stage runs; ``deps`` entries are
    skipped because the running stage's own entry is from its previous run), then at ``<data_dir>.dvc``.
    """
    target = Path(data_dir).absolute()
    lock = Path(dvc_lock)
    if lock.is_file():
        try:
            doc = yaml.safe_load(lock.read_text()) or {}
        except (OSError, yaml.YAMLError):
            doc = {}
        for stage, entry in (doc.get("stages") or {}).items():
            for out in (entry or {}).get("outs") or []:
                if _same_path(lock.absolute().parent, out.get("path"), target) and out.get("md5"):
                    return str(out["md5"]), f"{lock} (stage {stage}, outs)"
    dvc_file = target.with_name(target.name + ".dvc")
    if dvc_file.is_file():
        try:
            doc = yaml.safe_load(dvc_file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            doc = {}
        for out in doc.get("outs") or []:
            if _same_path(dvc_file.parent, out.get("path"), target) and out.get("md5"):
                return str(out["md5"]), str(dvc_file)
    return None


def _same_path(base: Path, rel: Any, target: Path) -> bool:
    if not isinstance(rel, str):
        return False
    return os.path.normpath(base / rel) == os.path.normpath(target)


def data_tags(data_dir: str | Path, dvc_lock: str | Path) -> dict[str, str]:
    """``data.*`` tags for one data folder (see the module docstring)."""
    path = Path(data_dir)
    tags = {"data.path": str(path)}
    if not path.exists():
        tags["data.hash_source"] = "missing"
        return tags
    tags["data.stat_hash"] = stat_hash(path)
    found = dvc_md5(path, dvc_lock)
    if found:
        tags["data.dvc_md5"], tags["data.hash_source"] = found
    else:
        tags["data.hash_source"] = "stat-only (not tracked by DVC)"
    return tags


def version_tags() -> dict[str, str]:
    """``version.<package>`` from installed metadata (nothing is imported), plus the pipeline and python."""
    tags = {}
    for key, dist in _PACKAGES.items():
        try:
            tags[f"version.{key}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    from pipeline import __version__

    tags["version.pipeline"] = __version__
    tags["version.python"] = platform.python_version()
    return tags


def device_tags(device: Any = None) -> dict[str, str]:
    """``device`` (``cpu`` / ``cuda:0 NVIDIA H200``); ``device=None`` picks CUDA 0 when available.

    Args:
        device: the ``torch.device`` (or its string) the stage actually uses; None to detect.
    """
    try:
        import torch
    except ImportError:
        return {"device": str(device or "cpu")}
    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type != "cuda":
        return {"device": dev.type}
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return {
        "device": f"cuda:{index} {torch.cuda.get_device_name(index)}",
        "device.count": str(torch.cuda.device_count()),
        "version.cuda": str(torch.version.cuda),
    }


def lineage_tags(
    data_dir: str | Path | None = None,
    dvc_lock: str | Path | None = None,
    *,
    repo_dir: str | Path | None = None,
    device: Any = None,
) -> dict[str, str]:
    """All lineage tags for a run (git, DVC experiment, data hash, versions, device).

    Args:
        data_dir: the data the stage reads (e.g. ``cfg.paths.preprocessed``); None skips ``data.*``.
        dvc_lock: defaults to ``$DVC_ROOT/dvc.lock`` under DVC, else ``./dvc.lock``.
        repo_dir: where to ask git (default: the working directory).
        device: the torch device the stage uses (None: detect).

    Never raises for a missing git, repository, lock file or CUDA.
    """
    if dvc_lock is None:
        dvc_lock = Path(os.environ.get("DVC_ROOT", ".")) / "dvc.lock"
    tags: dict[str, str] = {}
    tags.update(git_tags(repo_dir))
    tags.update(dvc_env_tags())
    if data_dir is not None:
        tags.update(data_tags(data_dir, dvc_lock))
    tags.update(version_tags())
    tags.update(device_tags(device))
    return tags
