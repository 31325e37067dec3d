"""Data set manifests: the Medical Segmentation Decathlon layout (also nnU-Net v2's raw format) and CSV.

MSD / nnU-Net ``dataset.json``::

    {"labels": {"0": "background", "1": "liver", "2": "lesion"},   # MSD; nnU-Net v2: {"background": 0, ...}
     "modality": {"0": "CT"},                                      # or nnU-Net v2 "channel_names"
     "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
     "test": ["./imagesTs/b.nii.gz"],
     "root": "."}                                                  # optional, relative to dataset.json

An ``image`` is one 3D file, one 4D multi-channel file, or a list of 3D files (one per channel). Without a
``training`` list, nnU-Net v2 naming is discovered: ``imagesTr/<case>_<XXXX><file_ending>``.

CSV manifest: a header with ``case_id`` (optional), one or more ``image*`` columns (one per channel, in
column order) and ``label`` (empty for unlabelled cases).

Every path resolves inside the data set root (the manifest's folder, or an explicit ``root``); a path that
escapes it is rejected, so a manifest cannot read arbitrary files.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.io.formats import read_volume, strip_suffix
from pipeline.io.volume import Volume, grid_mismatch


class DatasetError(ValueError):
    """The manifest is invalid; ``problems`` lists every problem found, each naming its file."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Case:
    case_id: str
    images: tuple[Path, ...]  # one (3D or 4D) file, or one 3D file per channel
    label: Path | None = None


@dataclass(frozen=True)
class Dataset:
    root: Path
    manifest: Path
    name: str
    labels: dict[int, str]
    channel_names: tuple[str, ...]
    training: tuple[Case, ...]
    test: tuple[Case, ...] = field(default_factory=tuple)

    def case(self, case_id: str) -> Case:
        for c in self.training + self.test:
            if c.case_id == case_id:
                return c
        raise KeyError(f"{self.manifest}: no case {case_id!r}")


def _inside(root: Path, rel: str, manifest: Path, problems: list[str]) -> Path | None:
    """Resolve ``rel`` against ``root`` lexically; reject paths that leave the root."""
    if not isinstance(rel, str) or not rel.strip():
        problems.append(f"{manifest}: invalid path entry {rel!r}")
        return None
    joined = Path(os.path.normpath(root / rel))
    root_n = Path(os.path.normpath(root))
    if joined != root_n and root_n not in joined.parents:
        problems.append(f"{manifest}: path {rel!r} escapes the data set root {root_n}")
        return None
    return joined


def _parse_labels(raw, manifest: Path, problems: list[str]) -> dict[int, str]:
    labels: dict[int, str] = {}
    if not isinstance(raw, dict) or not raw:
        problems.append(f"{manifest}: 'labels' must be a non-empty mapping")
        return labels
    for key, value in raw.items():
        try:
            if isinstance(value, int | float | list):  # nnU-Net v2: {"name": value}
                if isinstance(value, list):
                    problems.append(f"{manifest}: region-based label {key!r}={value} is not supported")
                    continue
                labels[int(value)] = str(key)
            else:  # MSD: {"value": "name"}
                labels[int(key)] = str(value)
        except (TypeError, ValueError):
            problems.append(f"{manifest}: label entry {key!r}: {value!r} is not an integer label")
    return dict(sorted(labels.items()))


def _case_id(image: Path) -> str:
    return re.sub(r"_\d{4}$", "", strip_suffix(image))


def load_msd(path: str | Path, root: str | Path | None = None) -> Dataset:
    """Read an MSD / nnU-Net v2 ``dataset.json`` (``path`` is the file or its folder)."""
    path = Path(path)
    manifest = path / "dataset.json" if path.is_dir() else path
    problems: list[str] = []
    if not manifest.is_file():
        raise DatasetError([f"{manifest}: dataset.json not found"])
    try:
        meta = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError([f"{manifest}: not valid JSON ({exc})"]) from None
    if not isinstance(meta, dict):
        raise DatasetError([f"{manifest}: top level must be a JSON object"])
    base = manifest.parent
    root_path = Path(root) if root is not None else base / str(meta.get("root", "."))
    labels = _parse_labels(meta.get("labels"), manifest, problems)
    channels_raw = meta.get("channel_names", meta.get("modality", {"0": "unknown"}))
    if not isinstance(channels_raw, dict) or not channels_raw:
        problems.append(f"{manifest}: 'modality' / 'channel_names' must be a non-empty mapping")
        channels_raw = {"0": "unknown"}
    if not all(str(k).isdigit() for k in channels_raw):
        problems.append(f"{manifest}: 'modality' / 'channel_names' keys must be channel indices 0, 1, ..., "
                        f"got {list(channels_raw)}")
        channels_raw = {str(i): v for i, v in enumerate(channels_raw.values())}
    channel_names = tuple(str(channels_raw[k]) for k in sorted(channels_raw, key=lambda k: int(k)))

    training: list[Case] = []
    if "training" in meta:
        entries = meta["training"]
        if not isinstance(entries, list):
            problems.append(f"{manifest}: 'training' must be a list")
        elif not entries:
            problems.append(f"{manifest}: the training list is empty; at least one labelled case is needed")
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            if not isinstance(entry, dict) or "image" not in entry:
                problems.append(f"{manifest}: training[{i}] needs an 'image' (and 'label') entry")
                continue
            if not entry.get("label"):  # a training case without a label map cannot train or validate
                problems.append(f"{manifest}: training[{i}] ({entry['image']}) has no 'label'")
                continue
            rels = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
            images = [_inside(root_path, r, manifest, problems) for r in rels]
            label = _inside(root_path, entry["label"], manifest, problems)
            if None in images or label is None:
                continue
            cid = str(entry.get("case_id") or _case_id(images[0]))  # type: ignore[arg-type]
            training.append(Case(cid, tuple(images), label))  # type: ignore[arg-type]
    elif "file_ending" in meta:  # nnU-Net v2 raw layout
        ending = str(meta["file_ending"])
        by_case: dict[str, list[Path]] = {}
        for img in sorted((root_path / "imagesTr").glob(f"*{ending}")):
            by_case.setdefault(_case_id(img), []).append(img)
        for cid, imgs in sorted(by_case.items()):
            training.append(Case(cid, tuple(imgs), root_path / "labelsTr" / f"{cid}{ending}"))
        if not training:
            problems.append(f"{manifest}: no training images match {root_path / 'imagesTr'}/*{ending} "
                            "(nnU-Net layout)")
    else:
        problems.append(f"{manifest}: no 'training' list (and no nnU-Net 'file_ending' to discover cases)")

    test: list[Case] = []
    for i, entry in enumerate(meta.get("test", []) or []):
        rels = entry if isinstance(entry, list) else [entry.get("image") if isinstance(entry, dict) else entry]
        images = [_inside(root_path, r, manifest, problems) for r in rels]
        if None not in images:
            test.append(Case(_case_id(images[0]), tuple(images), None))  # type: ignore[arg-type]

    _check_unique(training + test, manifest, problems)
    if problems:
        raise DatasetError(problems)
    return Dataset(root_path, manifest, str(meta.get("name", base.name)), labels, channel_names,
                   tuple(training), tuple(test))


def load_csv(path: str | Path, root: str | Path | None = None, labels: dict[int, str] | None = None,
             channel_names: tuple[str, ...] | None = None) -> Dataset:
    """Read a CSV manifest (columns ``case_id``, ``image``/``image_0``..., ``label``)."""
    manifest = Path(path)
    if not manifest.is_file():
        raise DatasetError([f"{manifest}: CSV manifest not found"])
    problems: list[str] = []
    root_path = Path(root) if root is not None else manifest.parent
    try:
        with open(manifest, newline="") as fh:
            rows = list(csv.DictReader(fh))
            header = list(rows[0].keys()) if rows else []
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError([f"{manifest}: not a readable CSV file ({exc})"]) from None
    image_cols = [c for c in header if c and c.strip().lower().startswith("image")]
    if rows and not image_cols:
        problems.append(f"{manifest}: no 'image' column in header {header}")
    training, test = [], []
    for n, row in enumerate(rows, start=2):
        images = [_inside(root_path, row[c], manifest, problems) for c in image_cols]
        label_rel = (row.get("label") or "").strip()
        label = _inside(root_path, label_rel, manifest, problems) if label_rel else None
        if not images or None in images or (label_rel and label is None):
            continue
        cid = (row.get("case_id") or row.get("id") or "").strip() or _case_id(images[0])  # type: ignore[arg-type]
        (training if label else test).append(Case(cid, tuple(images), label))  # type: ignore[arg-type]
    if not training:
        problems.append(f"{manifest}: no labelled cases; at least one training case is needed")
    if labels is None:
        problems.append(f"{manifest}: a CSV data set needs declared labels (config data.labels)")
    _check_unique(training + test, manifest, problems)
    if problems:
        raise DatasetError(problems)
    names = channel_names or tuple(f"channel{i}" for i in range(len(image_cols)))
    return Dataset(root_path, manifest, manifest.stem, dict(sorted((labels or {}).items())), tuple(names),
                   tuple(training), tuple(test))


def _check_unique(cases: list[Case], manifest: Path, problems: list[str]) -> None:
    seen: set[str] = set()
    for c in cases:
        if c.case_id in seen:
            problems.append(f"{manifest}: duplicate case id {c.case_id!r}")
        seen.add(c.case_id)


def load_dataset(data_cfg, raw_dir: str | Path) -> Dataset:
    """The data set a config points at (``data`` section); synthetic data lives in ``raw_dir``."""
    if data_cfg.source == "csv":
        ds = load_csv(data_cfg.dataset, data_cfg.root, data_cfg.labels, data_cfg.channel_names)
    else:
        ds = load_msd(data_cfg.dataset or raw_dir, data_cfg.root)
    overrides = {}
    if data_cfg.labels:
        overrides["labels"] = dict(sorted(data_cfg.labels.items()))
    if data_cfg.channel_names:
        overrides["channel_names"] = tuple(data_cfg.channel_names)
    if overrides:
        from dataclasses import replace

        ds = replace(ds, **overrides)
    return ds


# ----------------------------------------------------------------------------------------------- reading


def read_case_image(case: Case) -> Volume:
    """All channels of a case as one Volume ``(C, X, Y, Z)``; channel files must share one grid."""
    vols = [read_volume(p) for p in case.images]
    first = vols[0]
    for p, v in zip(case.images[1:], vols[1:], strict=True):
        diff = grid_mismatch(first, v)
        if diff:
            raise ValueError(f"case {case.case_id}: {p}: channel grid differs from {case.images[0]}: {'; '.join(diff)}")
    data = first.data if len(vols) == 1 else np.concatenate([v.data for v in vols], axis=0)
    return Volume(data, first.affine)


def remap_labels(label: np.ndarray, remap: dict[int, int] | None) -> np.ndarray:
    """Apply ``{old: new}`` simultaneously (``{1: 2, 2: 1}`` swaps)."""
    if not remap:
        return label
    out = label.copy()
    for old, new in remap.items():
        out[label == old] = new
    return out


def read_case_label(case: Case, remap: dict[int, int] | None = None) -> Volume:
    """The label map ``(1, X, Y, Z)`` as integers, after ``remap``."""
    if case.label is None:
        raise ValueError(f"case {case.case_id}: has no label file")
    vol = read_volume(case.label)
    if vol.n_channels != 1:
        raise ValueError(f"case {case.case_id}: {case.label}: label map has {vol.n_channels} channels, expected 1")
    data = vol.data
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ValueError(f"case {case.case_id}: {case.label}: label map has non-integer values")
        data = rounded.astype(np.int16)
    return Volume(remap_labels(data, remap), vol.affine)
