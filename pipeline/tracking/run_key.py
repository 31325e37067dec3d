"""The pipeline key: which MLflow parent run a stage belongs to, derived from what the execution depends on.

``dvc repro`` runs each stage as its own process, and a cached stage does not run at all, so there is no
process that could hand a "pipeline run id" to the others. Instead every stage derives the same key from
the inputs that define one pipeline execution::

    key = <git commit[:12]> "-" sha256(commit, config, code, data, splits)[:20]

================  =========================================================================================
commit            ``git rev-parse HEAD`` (``nogit`` outside a repository)
config            the validated config as sorted JSON, **without** the ``tracking`` section (where a run is
                  recorded does not change what it computes)
code              sha256 over (relative path, content) of every ``.py`` file of the ``pipeline`` package,
                  so an uncommitted code edit is a new execution although the commit is the same
data              DVC's md5 of ``paths.raw`` when DVC tracks it, else its stat hash (see
                  :mod:`pipeline.tracking.lineage`)
splits            sha256 of the ``paths.splits`` file (``missing`` when absent)
================  =========================================================================================

The train and evaluate stages of one ``dvc repro`` (or ``dvc exp run``) therefore compute the same key
and log into the same parent run; changing a parameter, the code or the data gives a new key, hence a new
parent. Nothing here imports mlflow.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tracking.lineage import _git, data_tags

if TYPE_CHECKING:
    from pipeline.config import Config


def config_hash(cfg_dict: dict[str, Any]) -> str:
    """sha256 of the config (a :meth:`Config.to_dict`) without its ``tracking`` section, as sorted JSON.

    >>> config_hash({"seed": 0, "tracking": {"experiment": "a"}}) == config_hash({"seed": 0})
    True
    """
    doc = {k: v for k, v in cfg_dict.items() if k != "tracking"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=4)
def _code_hash(root: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, _, _ in stamp:
        h.update(rel.encode() + b"\0" + (Path(root) / rel).read_bytes() + b"\0")
    return h.hexdigest()


def code_hash(package_dir: str | Path | None = None) -> str:
    """sha256 over (relative path, content) of every ``*.py`` below ``package_dir`` (default: ``pipeline``).

    Cached per (path, size, mtime) listing, so a stage that asks twice reads the files once.
    """
    if package_dir is None:
        import pipeline

        package_dir = Path(pipeline.__file__).parent
    root = Path(package_dir)
    stamp = []
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        stamp.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return _code_hash(str(root.absolute()), tuple(stamp))


def _file_hash(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return "missing"


def data_hash(raw_dir: str | Path, dvc_lock: str | Path | None = None) -> str:
    """DVC's md5 of the data folder when DVC tracks it, else its stat hash; ``missing`` if it is absent."""
    if dvc_lock is None:
        dvc_lock = Path(os.environ.get("DVC_ROOT", ".")) / "dvc.lock"
    tags = data_tags(raw_dir, dvc_lock)
    return tags.get("data.dvc_md5") or tags.get("data.stat_hash") or "missing"


def pipeline_key(cfg: Config, *, repo_dir: str | Path | None = None, dvc_lock: str | Path | None = None,
                 package_dir: str | Path | None = None) -> str:
    """The parent-run key of this pipeline execution (see the module docstring); matches ``[A-Za-z0-9-]+``.

    Args:
        cfg: the stage's validated config (``paths.raw`` and ``paths.splits`` are hashed as data).
        repo_dir: where to ask git (default: the working directory).
        dvc_lock: the lock file holding DVC's md5 of the data (default ``$DVC_ROOT/dvc.lock``).
        package_dir: the code to hash (default: the installed ``pipeline`` package).
    """
    commit = (_git(["rev-parse", "HEAD"], Path(repo_dir or Path.cwd())) or "").strip() or "nogit"
    parts = {
        "commit": commit,
        "config": config_hash(cfg.to_dict()),
        "code": code_hash(package_dir),
        "data": data_hash(cfg.paths.raw, dvc_lock),
        "splits": _file_hash(Path(cfg.paths.splits)),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return f"{commit[:12]}-{digest[:20]}"
