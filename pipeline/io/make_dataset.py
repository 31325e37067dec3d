"""``make-dataset``: write an MSD-style ``dataset.json`` that points at scans where they are (no copies).

    python -m pipeline make-dataset --images 'scans/*/FLAIR.nii.gz' --images 'scans/*/T1.nii.gz' \\
        --labels 'scans/*/lesion.nii.gz' --channel-names FLAIR T1 --label-names background lesion \\
        --output my_dataset/dataset.json

The case id is what the wildcards of a pattern match (``scans/*/FLAIR.nii.gz`` -> the folder name), or
the first group of ``--case-id-regex``. Every channel pattern and the label pattern must give the same
case ids. The manifest's ``root`` is the common folder of all files, so every path stays inside it.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
from pathlib import Path

import numpy as np

from pipeline.io.atomic import write_text
from pipeline.io.dataset import DatasetError, load_msd


def _pattern_regex(pattern: str) -> re.Pattern:
    """fnmatch pattern -> regex whose groups capture each ``*`` / ``?`` run."""
    parts = re.split(r"(\*+|\?)", pattern)
    rx = "".join(("(.*?)" if p.startswith("*") else "(.)") if p in ("?",) or p.startswith("*")
                 else fnmatch.translate(p)[4:-3] for p in parts if p)
    return re.compile(rf"^{rx}$")


def _case_ids(files: list[str], pattern: str, case_id_regex: str | None) -> dict[str, str]:
    rx = re.compile(case_id_regex) if case_id_regex else _pattern_regex(pattern)
    out: dict[str, str] = {}
    for f in files:
        m = rx.search(f) if case_id_regex else rx.match(f)
        if not m or not m.groups():
            raise DatasetError([f"{f}: cannot derive a case id (pattern {pattern!r}, regex {case_id_regex!r})"])
        cid = "_".join(g.strip("/").replace("/", "_") for g in m.groups() if g)
        if cid in out:
            raise DatasetError([f"{f}: case id {cid!r} also matches {out[cid]}; use --case-id-regex"])
        out[cid] = f
    return out


def make_dataset(images: list[str], labels: str, output: Path, channel_names: list[str] | None = None,
                 label_names: list[str] | None = None, case_id_regex: str | None = None,
                 root: str | None = None) -> Path:
    """Write ``output`` (a dataset.json) for the scans matched by the glob patterns; return its path."""
    problems: list[str] = []
    channel_maps = []
    for pattern in images:
        files = sorted(glob.glob(pattern))
        if not files:
            problems.append(f"--images {pattern!r}: no file matches")
        channel_maps.append(_case_ids(files, pattern, case_id_regex) if files else {})
    label_files = sorted(glob.glob(labels))
    if not label_files:
        problems.append(f"--labels {labels!r}: no file matches")
    label_map = _case_ids(label_files, labels, case_id_regex) if label_files else {}
    if channel_names and len(channel_names) != len(images):
        problems.append(f"--channel-names gives {len(channel_names)} names for {len(images)} --images patterns")
    if problems:
        raise DatasetError(problems)
    ids = sorted(set(channel_maps[0]))
    for pattern, cmap in zip(images[1:], channel_maps[1:], strict=True):
        missing = sorted(set(ids) ^ set(cmap))
        if missing:
            problems.append(f"--images {pattern!r}: case ids differ from the first channel: {missing[:10]}")
    unlabelled = sorted(set(ids) - set(label_map))
    orphans = sorted(set(label_map) - set(ids))
    if orphans:
        problems.append(f"--labels {labels!r}: labels without images for case(s) {orphans[:10]}")
    if problems:
        raise DatasetError(problems)

    all_files = [os.path.abspath(f) for cmap in channel_maps for f in cmap.values()] + \
                [os.path.abspath(f) for f in label_map.values()]
    common = os.path.commonpath([os.path.dirname(f) for f in all_files])
    root_dir = Path(os.path.abspath(root)) if root else Path(common)
    output = Path(output)
    rel = lambda f: os.path.relpath(os.path.abspath(f), root_dir)  # noqa: E731
    training, test = [], []
    for cid in ids:
        files = [rel(cmap[cid]) for cmap in channel_maps]
        entry_image = files[0] if len(files) == 1 else files
        if cid in label_map:
            training.append({"case_id": cid, "image": entry_image, "label": rel(label_map[cid])})
        else:
            test.append(entry_image)
    if label_names is None:
        from pipeline.io.formats import read_volume

        values = sorted({int(v) for f in label_map.values() for v in np.unique(read_volume(f).data)})
        label_names = ["background" if v == 0 else f"class_{v}" for v in range(max(values) + 1)]
    names = channel_names or [f"channel{i}" for i in range(len(images))]
    root_field = os.path.relpath(root_dir, output.parent.resolve()) if not root else str(root_dir)
    meta = {
        "name": output.parent.name or "dataset",
        "description": f"made by `python -m pipeline make-dataset` from {images} and {labels!r}",
        "root": root_field,
        "modality": {str(i): n for i, n in enumerate(names)},
        "labels": {str(i): n for i, n in enumerate(label_names)},
        "numTraining": len(training),
        "training": training,
        "test": test,
        "unlabelled_cases": unlabelled,
    }
    write_text(output, json.dumps(meta, indent=2) + "\n")
    try:
        load_msd(output)
    except DatasetError:
        output.unlink(missing_ok=True)
        raise
    return output
