"""The preprocess stage: fingerprint + plan on train/val, then every case of the splits, resumably.

Outputs under ``out_dir``::

    fingerprint.json            data set fingerprint (train + val cases)
    plan.json                   the plan
    cases/<id>_image.npy        float32 (C, x, y, z)
    cases/<id>_label.npy        uint8 (x, y, z)             (labelled cases)
    cases/<id>.json             record: geometry of every step + plan_hash (written last)

Every file is written to a temporary name and renamed, and a case's record is written after its arrays,
so a record marks a finished case. A re-run skips cases whose record carries the current ``plan_hash`` and
the digest of the case's current source files, removes temporary files a killed run left behind and
recomputes the rest; everything is deterministic, so a killed-and-resumed run ends byte-identical to an
uninterrupted one. One run at a time per ``out_dir`` (a lock file enforces it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Config, PreprocessConfig
from pipeline.io.atomic import write_json, write_npy
from pipeline.io.dataset import Case, Dataset
from pipeline.preprocessing.cases import load_case, source_digest
from pipeline.preprocessing.fingerprint import compute_fingerprint
from pipeline.preprocessing.parallel import map_cases, peak_rss_mb, resolve_workers, worker_pool
from pipeline.preprocessing.plan import make_plan, plan_hash
from pipeline.preprocessing.transform import preprocess_case


class PreprocessError(RuntimeError):
    """Preprocessing a case failed; the message names the case and its files."""


def case_paths(cases_dir: Path, case_id: str) -> dict[str, Path]:
    """Where the stage writes one case: ``image``, ``label`` and ``record``."""
    return {
        "image": cases_dir / f"{case_id}_image.npy",
        "label": cases_dir / f"{case_id}_label.npy",
        "record": cases_dir / f"{case_id}.json",
    }


def is_finished(cases_dir: Path, case_id: str, expected_hash: str, source: str | None = None) -> bool:
    """True when the case's record exists, parses, carries ``expected_hash`` (and the ``source`` digest,
    when given) and its arrays exist."""
    paths = case_paths(cases_dir, case_id)
    try:
        record = json.loads(paths["record"].read_text())
    except (OSError, ValueError):
        return False
    if record.get("plan_hash") != expected_hash or not paths["image"].is_file():
        return False
    if source is not None and (record.get("source") or {}).get("sha256") != source:
        return False
    return not record.get("has_label") or paths["label"].is_file()


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def process_case(
    case: Case,
    root: str,
    label_remap: dict[int, int],
    plan: dict[str, Any],
    pre_cfg: PreprocessConfig,
    digest: str,
    cases_dir: str,
) -> dict[str, Any]:
    """Worker: skip the case if it is finished, else read, preprocess and write it (record last).

    Returns:
        A small summary: ``case_id``, ``skipped``, ``shape``, ``seconds``, ``peak_rss_mb``.
    """
    start = time.perf_counter()
    paths = case_paths(Path(cases_dir), case.case_id)
    source = source_digest(case, dict(label_remap))
    if is_finished(Path(cases_dir), case.case_id, digest, source):
        return {"case_id": case.case_id, "skipped": True, "seconds": time.perf_counter() - start}
    paths["record"].unlink(missing_ok=True)  # a half-rewritten case must not look finished
    try:
        image, label = load_case(case, dict(label_remap) or None, int(plan["n_classes"]))
        img, lab, record = preprocess_case(image, label, plan, pre_cfg)
    except Exception as exc:
        message = (
            str(exc)
            if str(exc).startswith(f"case {case.case_id}")
            else f"case {case.case_id} ({case.images[0]}): {exc}"
        )
        raise PreprocessError(message) from exc
    write_npy(paths["image"], img)
    if lab is not None:
        write_npy(paths["label"], lab)
    else:
        paths["label"].unlink(missing_ok=True)
    full = {
        "case_id": case.case_id,
        "plan_hash": digest,
        "source": {
            "images": [_relative(p, Path(root)) for p in case.images],
            "label": _relative(case.label, Path(root)) if case.label else None,
            "sha256": source,
        },
        "files": {"image": paths["image"].name, "label": paths["label"].name if lab is not None else None},
        **record,
    }
    write_json(paths["record"], full)
    return {
        "case_id": case.case_id,
        "skipped": False,
        "shape": record["shape"],
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }


def remove_temp_files(folder: Path) -> int:
    """Delete the temporary files (``.<name>.<random>.tmp*``) a killed run left in ``folder``."""
    removed = 0
    if folder.is_dir():
        for path in folder.glob(".*.tmp*"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    return removed


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".preprocess.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PreprocessError(f"{out_dir}: another preprocess run is writing here") from None
        yield


def _split_ids(splits: dict[str, Sequence[str]], dataset: Dataset) -> tuple[list[str], list[str]]:
    for key in ("train", "val", "test"):
        if key not in splits:
            raise PreprocessError(f"splits has no {key!r} list (keys: {sorted(splits)})")
    fit_ids = list(dict.fromkeys([*splits["train"], *splits["val"]]))
    all_ids = list(dict.fromkeys([*fit_ids, *splits["test"]]))
    known = {c.case_id for c in dataset.training + dataset.test}
    unknown = [cid for cid in all_ids if cid not in known]
    if unknown:
        raise PreprocessError(f"splits name cases that {dataset.manifest} does not have: {unknown[:10]}")
    leaked = set(fit_ids) & set(splits["test"])
    if leaked:
        raise PreprocessError(f"cases in both train/val and test: {sorted(leaked)[:10]}")
    return fit_ids, all_ids


def run_preprocess(
    cfg: Config, dataset: Dataset, splits: dict[str, list[str]], out_dir: Path, workers: int | None = None
) -> dict[str, Any]:
    """Fingerprint + plan (train + val), then preprocess every case of train + val + test.

    Args:
        cfg: the whole :class:`pipeline.config.Config`.
        dataset: the data set (:func:`pipeline.io.dataset.load_dataset`).
        splits: ``{"train": [ids], "val": [ids], "test": [ids]}``.
        out_dir: output folder (``cfg.paths.preprocessed``).
        workers: worker processes; None -> ``cfg.preprocess.workers``; 0 -> CPU cores.

    Returns:
        Summary: ``n_cases``, ``processed`` / ``skipped`` ids, ``plan_hash``, ``workers``, ``seconds`` and
        ``max_case_peak_rss_mb`` (the largest peak memory of a process that preprocessed a case).

    Raises:
        PreprocessError: bad splits, a locked ``out_dir`` or a failing case (named with its files).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    cases_dir = out_dir / "cases"
    n_workers = resolve_workers(workers, cfg.preprocess.workers)
    fit_ids, all_ids = _split_ids(splits, dataset)
    with _exclusive(out_dir), worker_pool(min(n_workers, len(all_ids))) as pool:
        remove_temp_files(out_dir)
        remove_temp_files(cases_dir)
        fingerprint = compute_fingerprint(dataset, fit_ids, cfg.data, n_workers, pool=pool)
        plan = make_plan(fingerprint, dataset, cfg)
        write_json(out_dir / "fingerprint.json", fingerprint)
        write_json(out_dir / "plan.json", plan)
        digest = plan_hash(plan, cfg.preprocess)
        cases_dir.mkdir(parents=True, exist_ok=True)
        tasks = [
            (
                dataset.case(cid),
                str(dataset.root),
                dict(cfg.data.label_remap),
                plan,
                cfg.preprocess,
                digest,
                str(cases_dir),
            )
            for cid in all_ids
        ]
        results = list(map_cases(process_case, tasks, pool, "preprocess"))
    done = [r for r in results if not r["skipped"]]
    return {
        "n_cases": len(all_ids),
        "processed": sorted(d["case_id"] for d in done),
        "skipped": sorted(r["case_id"] for r in results if r["skipped"]),
        "plan_hash": digest,
        "workers": n_workers,
        "seconds": time.perf_counter() - start,
        "max_case_peak_rss_mb": max((d["peak_rss_mb"] or 0.0 for d in done), default=None),
    }
