"""The ``preprocess`` stage: fingerprint + plan on train/val, then every case of the splits, resumably.

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

Sharded, for many machines sharing a file system (docs/scaling.md): :func:`run_plan` writes
``fingerprint.json`` + ``plan.json`` once; then :func:`run_shard` ``K/N`` for every ``K`` (concurrently,
anywhere) preprocesses the cases ``sorted(ids)[K::N]`` with that plan and never recomputes it; last
:func:`run_merge` checks that every case is finished and names the missing ones with their shard. The
three together write exactly the bytes of one unsharded run. Shards hold the lock file shared (they run
side by side, each cleaning only its own cases' temporary files); the other runs hold it exclusively.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Config, PreprocessConfig
from pipeline.contracts import CaseFiles, CaseRecord, CaseSource, ContractError, Plan
from pipeline.io.atomic import write_json, write_npy
from pipeline.io.dataset import Case, Dataset, load_dataset
from pipeline.io.validate import check_dataset, validated_dataset
from pipeline.preprocessing.cases import load_case, source_digest
from pipeline.preprocessing.fingerprint import compute_fingerprint
from pipeline.preprocessing.layout import case_paths, fingerprint_path, plan_path
from pipeline.preprocessing.layout import cases_dir as cases_folder
from pipeline.preprocessing.parallel import map_cases, peak_rss_mb, resolve_workers, worker_pool
from pipeline.preprocessing.plan import load_plan, make_plan, plan_hash
from pipeline.preprocessing.transform import preprocess_case
from pipeline.stages.shard import Shard, owners


class PreprocessError(RuntimeError):
    """Preprocessing a case failed; the message names the case and its files."""


def is_finished(cases_dir: Path, case_id: str, expected_hash: str, source: str | None = None) -> bool:
    """True when the case's record exists, parses, carries ``expected_hash`` (and the ``source`` digest,
    when given) and its arrays exist."""
    paths = case_paths(cases_dir, case_id)
    try:
        record = CaseRecord.load(paths["record"])
    except ContractError:  # missing, unreadable or not a valid record: not finished
        return False
    if record.plan_hash != expected_hash or not paths["image"].is_file():
        return False
    if source is not None and (record.source is None or record.source.sha256 != source):
        return False
    return not record.has_label or paths["label"].is_file()


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def process_case(
    case: Case,
    root: str,
    label_remap: dict[int, int],
    plan: Plan,
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
        image, label = load_case(case, dict(label_remap) or None, plan.n_classes)
        img, lab, record = preprocess_case(image, label, plan, pre_cfg)
    except Exception as exc:
        message = (
            str(exc)
            if str(exc).startswith(f"case {case.case_id}")
            else f"case {case.case_id} ({case.images[0]}): {exc}"
        )
        raise PreprocessError(message) from exc
    write_npy(paths["image"], img.data)
    if lab is not None:
        write_npy(paths["label"], lab.data[0])
    else:
        paths["label"].unlink(missing_ok=True)
    full = record.stored(
        case.case_id,
        digest,
        CaseSource(
            images=tuple(_relative(p, Path(root)) for p in case.images),
            label=_relative(case.label, Path(root)) if case.label else None,
            sha256=source,
        ),
        CaseFiles(image=paths["image"].name, label=paths["label"].name if lab is not None else None),
    )
    write_json(paths["record"], full.to_dict())
    return {
        "case_id": case.case_id,
        "skipped": False,
        "shape": list(record.shape),
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }


def remove_temp_files(folder: Path, case_ids: Sequence[str] | None = None) -> int:
    """Delete the temporary files (``.<name>.<random>.tmp*``, :func:`pipeline.io.atomic.atomic_path`) a killed
    run left in ``folder``; with ``case_ids``, only those of these cases' outputs (a shard must not delete
    files its neighbours are writing). One listing of ``folder``, whatever the number of cases."""
    removed = 0
    if not folder.is_dir():
        return removed
    own = None if case_ids is None else {p.name for cid in case_ids for p in case_paths(folder, cid).values()}
    for path in folder.glob(".*.tmp*"):
        m = _TEMP_NAME.match(path.name)
        if path.is_file() and (own is None or (m is not None and m.group("name") in own)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


# ".<final name>.<mkstemp's random letters, digits, _>.tmp<suffix>"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.\w+\.tmp[^.]*(?:\.[^.]+)*$")


@contextlib.contextmanager
def _locked(out_dir: Path, shared: bool = False) -> Iterator[None]:
    """Hold ``out_dir/.preprocess.lock``: exclusively (plan, unsharded, merge), or shared (shards, which may
    run side by side but never beside an exclusive run). ``flock`` works across NFS clients (Linux emulates it
    with POSIX locks); Lustre needs the ``flock`` mount option."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".preprocess.lock", "a") as fh:  # "a": a shard opening it never truncates anything
        try:
            fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PreprocessError(
                f"{out_dir}: another preprocess run is writing here"
                + (" (a plan, merge or unsharded run)" if shared else "")
            ) from None
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


def _read_splits(cfg: Config) -> dict[str, list[str]]:
    return json.loads(Path(cfg.paths.splits).read_text())


def run(cfg: Config, out_dir: Path | None = None, workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The stage: validate the data set, read the split ``paths.splits`` and preprocess every case of it into
    ``out_dir`` (default ``paths.preprocessed``); see :func:`run_preprocess` for the summary it returns."""
    dataset, _ = validated_dataset(cfg.data, cfg.paths.raw, progress)
    return run_preprocess(cfg, dataset, _read_splits(cfg), Path(out_dir or cfg.paths.preprocessed), workers)


def run_plan(
    cfg: Config, out_dir: Path | None = None, workers: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Step 1 of a sharded run: validate the whole data set and write ``fingerprint.json`` + ``plan.json``
    into ``out_dir`` (default ``paths.preprocessed``); see :func:`plan_preprocess`."""
    dataset, _ = validated_dataset(cfg.data, cfg.paths.raw, progress)
    return plan_preprocess(cfg, dataset, _read_splits(cfg), Path(out_dir or cfg.paths.preprocessed), workers)


def run_shard(
    cfg: Config, shard: Shard, out_dir: Path | None = None, workers: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Step 2, once per shard: validate only this shard's cases (the plan run validated them all), then
    preprocess them with the stored plan; see :func:`preprocess_shard`."""
    dataset = load_dataset(cfg.data, cfg.paths.raw)
    splits = _read_splits(cfg)
    mine = shard.select(_split_ids(splits, dataset)[1])
    if mine:  # reading every scan in every shard would cost N times the whole data set
        own = dataclasses.replace(dataset, training=tuple(dataset.case(cid) for cid in mine), test=())
        check_dataset(own, cfg.data.label_remap, cfg.data.lesion_labels, progress=progress)
    return preprocess_shard(cfg, dataset, splits, shard, Path(out_dir or cfg.paths.preprocessed), workers)


def run_merge(
    cfg: Config, out_dir: Path | None = None, workers: int | None = None, num_parts: int | None = None
) -> dict[str, Any]:
    """Step 3, after every shard: check that every case is finished; see :func:`merge_preprocess`."""
    dataset = load_dataset(cfg.data, cfg.paths.raw)
    return merge_preprocess(
        cfg, dataset, _read_splits(cfg), Path(out_dir or cfg.paths.preprocessed), workers, num_parts
    )


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
    cases_dir = cases_folder(out_dir)
    n_workers = resolve_workers(workers, cfg.preprocess.workers)
    fit_ids, all_ids = _split_ids(splits, dataset)
    with _locked(out_dir), worker_pool(min(n_workers, len(all_ids))) as pool:
        remove_temp_files(out_dir)
        remove_temp_files(cases_dir)
        plan = _write_plan(cfg, dataset, fit_ids, out_dir, n_workers, pool)
        results = _process_cases(cfg, dataset, all_ids, plan, cases_dir, pool)
    return _summary(all_ids, results, plan_hash(plan, cfg.preprocess), n_workers, start)


def plan_preprocess(
    cfg: Config, dataset: Dataset, splits: dict[str, list[str]], out_dir: Path, workers: int | None = None
) -> dict[str, Any]:
    """Write ``fingerprint.json`` and ``plan.json`` (fingerprint of train + val) and nothing else: the plan
    every shard then reads. The same bytes as :func:`run_preprocess` writes for them.

    Returns:
        ``n_cases`` (train + val + test, the cases the shards will share), ``n_fingerprint_cases``,
        ``plan_hash``, ``workers``, ``seconds``.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    n_workers = resolve_workers(workers, cfg.preprocess.workers)
    fit_ids, all_ids = _split_ids(splits, dataset)
    with _locked(out_dir), worker_pool(min(n_workers, len(fit_ids))) as pool:
        remove_temp_files(out_dir)
        plan = _write_plan(cfg, dataset, fit_ids, out_dir, n_workers, pool)
    return {
        "n_cases": len(all_ids),
        "n_fingerprint_cases": len(fit_ids),
        "plan_hash": plan_hash(plan, cfg.preprocess),
        "workers": n_workers,
        "seconds": time.perf_counter() - start,
    }


def preprocess_shard(
    cfg: Config,
    dataset: Dataset,
    splits: dict[str, list[str]],
    shard: Shard,
    out_dir: Path,
    workers: int | None = None,
) -> dict[str, Any]:
    """Preprocess the cases of ``shard`` (``sorted(train + val + test)[K::N]``) with the stored plan.

    Shards of one ``out_dir`` may run at the same time on different machines: each writes only its own
    cases (arrays, then the record, each atomically) and deletes only its own cases' temporary files.
    A finished case (current plan hash and source digest) is skipped, so a re-run resumes.

    Returns:
        As :func:`run_preprocess` (``n_cases`` is the shard's), plus ``shard`` (``"K/N"``).

    Raises:
        FileNotFoundError: no ``plan.json`` / ``fingerprint.json`` yet (run :func:`plan_preprocess` first:
            a shard never plans, since N shards planning at once would race and the plan needs all cases).
        PreprocessError: the fingerprint is of other cases than the current train + val split, an
            exclusive run holds ``out_dir``, or a case fails.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    cases_dir = cases_folder(out_dir)
    n_workers = resolve_workers(workers, cfg.preprocess.workers)
    fit_ids, all_ids = _split_ids(splits, dataset)
    mine = shard.select(all_ids)
    _require_plan(out_dir)
    with _locked(out_dir, shared=True), worker_pool(min(n_workers, len(mine))) as pool:
        plan = _stored_plan(out_dir, fit_ids)
        remove_temp_files(cases_dir, mine)
        results = _process_cases(cfg, dataset, mine, plan, cases_dir, pool)
    return {**_summary(mine, results, plan_hash(plan, cfg.preprocess), n_workers, start), "shard": str(shard)}


def merge_preprocess(
    cfg: Config,
    dataset: Dataset,
    splits: dict[str, list[str]],
    out_dir: Path,
    workers: int | None = None,
    num_parts: int | None = None,
) -> dict[str, Any]:
    """After the shards: remove temporary files killed shards left, and check that every case of train +
    val + test is finished (record with the stored plan's hash and the digest of the case's current
    source files, arrays present). Writes no case data: the plan-dependent files (``fingerprint.json``,
    ``plan.json``) were written once by :func:`plan_preprocess`.

    Args:
        num_parts: the shards' ``N``, to name the shard of each missing case.

    Returns:
        ``n_cases``, ``plan_hash``, ``workers``, ``seconds``.

    Raises:
        FileNotFoundError: no plan yet.
        PreprocessError: cases missing or out of date, each named (with its shard ``K/N`` when
            ``num_parts`` is given); a shard still running.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    cases_dir = cases_folder(out_dir)
    n_workers = resolve_workers(workers, cfg.preprocess.workers)
    fit_ids, all_ids = _split_ids(splits, dataset)
    _require_plan(out_dir)
    with _locked(out_dir), worker_pool(min(n_workers, len(all_ids))) as pool:
        digest = plan_hash(_stored_plan(out_dir, fit_ids), cfg.preprocess)
        remove_temp_files(out_dir)
        remove_temp_files(cases_dir)
        remap = dict(cfg.data.label_remap)
        tasks = [(dataset.case(cid), remap, digest, str(cases_dir)) for cid in all_ids]
        missing = sorted(cid for cid, done in map_cases(_finished, tasks, pool, "verify") if not done)
    if missing:
        raise PreprocessError(_missing_message(cases_dir, missing, all_ids, num_parts))
    return {"n_cases": len(all_ids), "plan_hash": digest, "workers": n_workers, "seconds": time.perf_counter() - start}


def _missing_message(cases_dir: Path, missing: list[str], all_ids: list[str], num_parts: int | None) -> str:
    owner = owners(all_ids, num_parts) if num_parts else {}
    shown = ", ".join(f"{cid} (shard {owner[cid]})" if owner else cid for cid in missing[:50])
    more = f" and {len(missing) - 50} more" if len(missing) > 50 else ""
    if owner:
        shards = " ".join(sorted({str(owner[cid]) for cid in missing}, key=lambda s: int(s.split("/")[0])))
        todo = f"re-run preprocess --shard for {shards}, then --merge again"
    else:
        todo = "re-run the shards that hold them (add --num-parts N to --merge to name them), or a plain preprocess"
    return f"{cases_dir}: {len(missing)} of {len(all_ids)} case(s) missing or out of date: {shown}{more}; {todo}"


def _finished(case: Case, label_remap: dict[int, int], digest: str, cases_dir: str) -> tuple[str, bool]:
    """Worker for the merge check: ``(case_id, finished)`` (hashing the sources costs a read of each file)."""
    source = source_digest(case, dict(label_remap))
    return case.case_id, is_finished(Path(cases_dir), case.case_id, digest, source)


def _write_plan(
    cfg: Config, dataset: Dataset, fit_ids: list[str], out_dir: Path, n_workers: int, pool: Any
) -> Plan:
    fingerprint = compute_fingerprint(dataset, fit_ids, cfg.data, n_workers, pool=pool)
    plan = make_plan(fingerprint, dataset, cfg)
    write_json(fingerprint_path(out_dir), fingerprint)
    write_json(plan_path(out_dir), plan.to_dict())
    return plan


def _require_plan(out_dir: Path) -> None:
    for path in (plan_path(out_dir), fingerprint_path(out_dir)):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found: shards and --merge use the stored plan and never recompute it; "
                f"write it first with `python -m pipeline preprocess --plan-only` (same --output and config)"
            )


def _stored_plan(out_dir: Path, fit_ids: list[str]) -> Plan:
    """``plan.json``, after checking that ``fingerprint.json`` was taken on the current train + val split."""
    fingerprint_file = fingerprint_path(out_dir)
    try:
        planned = json.loads(fingerprint_file.read_text()).get("case_ids")
    except (OSError, ValueError, AttributeError) as exc:
        raise PreprocessError(f"{fingerprint_file}: unreadable ({exc}); re-run preprocess --plan-only") from exc
    if planned != sorted(set(fit_ids)):
        raise PreprocessError(
            f"{fingerprint_file}: planned on other cases than the current train + val split "
            f"({len(planned or [])} vs {len(set(fit_ids))} cases); re-run preprocess --plan-only"
        )
    return load_plan(plan_path(out_dir))


def _process_cases(
    cfg: Config, dataset: Dataset, ids: Sequence[str], plan: Plan, cases_dir: Path, pool: Any
) -> list[dict[str, Any]]:
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
        for cid in ids
    ]
    return list(map_cases(process_case, tasks, pool, "preprocess"))


def _summary(
    ids: Sequence[str], results: list[dict[str, Any]], digest: str, n_workers: int, start: float
) -> dict[str, Any]:
    done = [r for r in results if not r["skipped"]]
    return {
        "n_cases": len(ids),
        "processed": sorted(d["case_id"] for d in done),
        "skipped": sorted(r["case_id"] for r in results if r["skipped"]),
        "plan_hash": digest,
        "workers": n_workers,
        "seconds": time.perf_counter() - start,
        "max_case_peak_rss_mb": max((d["peak_rss_mb"] or 0.0 for d in done), default=None),
    }
