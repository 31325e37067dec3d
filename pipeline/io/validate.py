"""Check a data set before any work: every problem is reported at once, each naming case, file and problem."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.config import DataConfig
from pipeline.io.dataset import Case, Dataset, load_dataset, remap_labels
from pipeline.io.formats import VolumeReadError, read_volume
from pipeline.io.volume import Volume, grid_mismatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseSummary:
    """What validation learned about a readable labelled case (used for stratified splits)."""

    case_id: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    label_values: tuple[int, ...]


class DataValidationError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the data set:\n" + "\n".join(problems))


def _check_case(case: Case, ds: Dataset, remap: dict[int, int] | None, problems: list[str]) -> CaseSummary | None:
    where = f"case {case.case_id}"
    images: list[tuple[str, Volume]] = []
    for path in case.images:
        try:
            vol = read_volume(path)
        except VolumeReadError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if not np.issubdtype(vol.data.dtype, np.number):
            problems.append(f"{where}: {path}: non-numeric voxel type {vol.data.dtype}")
            continue
        if np.issubdtype(vol.data.dtype, np.floating):
            bad = int(np.count_nonzero(~np.isfinite(vol.data)))
            if bad:
                problems.append(f"{where}: {path}: {bad} NaN/Inf voxel(s)")
        images.append((str(path), vol))
    if len(images) != len(case.images):
        return None
    first_path, first = images[0]
    for path, vol in images[1:]:
        diff = grid_mismatch(first, vol)
        if diff:
            problems.append(f"{where}: {path}: channel grid does not match {first_path}: {'; '.join(diff)}")
    n_channels = sum(v.n_channels for _, v in images)
    if n_channels != len(ds.channel_names):
        problems.append(
            f"{where}: {first_path}: {n_channels} channel(s), the data set declares {len(ds.channel_names)} "
            f"({', '.join(ds.channel_names)})"
        )
    if case.label is None:
        return None
    try:
        label = read_volume(case.label)
    except VolumeReadError as exc:
        problems.append(f"{where}: {exc}")
        return None
    if label.n_channels != 1:
        problems.append(f"{where}: {case.label}: label map has {label.n_channels} channels, expected 1")
        return None
    diff = grid_mismatch(first, label)
    if diff:
        problems.append(f"{where}: {case.label}: label grid does not match image {first_path}: {'; '.join(diff)}")
    data = label.data
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            problems.append(f"{where}: {case.label}: NaN/Inf in label map")
            return None
        if not np.array_equal(np.rint(data), data):
            problems.append(f"{where}: {case.label}: label map has non-integer values")
            return None
        data = data.astype(np.int64)
    values = tuple(int(v) for v in np.unique(remap_labels(data, remap)))
    undeclared = sorted(set(values) - set(ds.labels))
    if undeclared:
        problems.append(
            f"{where}: {case.label}: label value(s) {undeclared} not declared in {ds.manifest.name} "
            f"(declared: {sorted(ds.labels)})"
        )
    return CaseSummary(case.case_id, label.shape, label.spacing, values)


def check_dataset(ds: Dataset, remap: dict[int, int] | None = None, lesion_labels=(),
                  progress: bool = True) -> list[CaseSummary]:
    """Validate every case; raise :class:`DataValidationError` listing all problems, else return summaries."""
    problems: list[str] = []
    missing = [lab for lab in lesion_labels if lab not in ds.labels]
    if missing:
        problems.append(f"{ds.manifest}: lesion label(s) {missing} are not declared labels {sorted(ds.labels)}")
    if not ds.training:
        problems.append(f"{ds.manifest}: no training cases")
    summaries = []
    for case in tqdm(ds.training + ds.test, desc="check-data", unit="case", disable=not progress):
        summary = _check_case(case, ds, remap, problems)
        if summary is not None:
            summaries.append(summary)
    if problems:
        raise DataValidationError(problems)
    log.info("data set %s: %d training and %d test cases are valid", ds.name, len(ds.training), len(ds.test))
    return summaries


def _warn_unused_classes(ds: Dataset, remap: dict[int, int] | None, summaries: list[CaseSummary]) -> None:
    """Warn about declared foreground classes that no labelled case holds (after ``remap``): each still gets
    an output channel, e.g. when ``data.label_remap`` merges classes but ``data.labels`` still declares the
    manifest's classes instead of those after remapping."""
    present = set().union(*(s.label_values for s in summaries))
    unused = {k: v for k, v in ds.labels.items() if k != 0 and k not in present}
    if unused:
        how = " after data.label_remap" if remap else ""
        log.warning("%s: declared class(es) %s occur in no labelled case%s; each still gets an output channel "
                    "(declare the classes after remapping with data.labels)", ds.manifest, unused, how)


def validated_dataset(data_cfg: DataConfig, raw_dir: str | Path,
                      progress: bool = True) -> tuple[Dataset, dict[str, bool]]:
    """Load the configured data set (``data`` section, raw folder ``raw_dir``) and validate every case;
    returns it and ``{case_id: has_lesion}`` (any of ``data.lesion_labels`` present)."""
    ds = load_dataset(data_cfg, raw_dir)
    summaries = check_dataset(ds, data_cfg.label_remap, data_cfg.lesion_labels, progress=progress)
    _warn_unused_classes(ds, data_cfg.label_remap, summaries)  # here, not in check_dataset: shards see subsets
    lesion = set(data_cfg.lesion_labels)
    return ds, {s.case_id: bool(lesion & set(s.label_values)) for s in summaries}
