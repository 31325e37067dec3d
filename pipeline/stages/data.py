"""The ``data`` stage: synthesise (embedded default) or point at a data set, validate it, split it.

Output: ``paths.raw`` (synthetic data only) and the split ``paths.splits``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.data.splits import stratified_split
from pipeline.data.synthetic import write_synthetic_dataset
from pipeline.io.atomic import write_json
from pipeline.io.dataset import Dataset
from pipeline.io.make_dataset import make_dataset
from pipeline.io.validate import validated_dataset

log = logging.getLogger(__name__)


def run(cfg: Config, progress: bool = True) -> dict:
    """Write the synthetic data set when configured, validate, and write ``paths.splits``; returns the split
    file's content."""
    if cfg.data.source == "synthetic":
        write_synthetic_dataset(cfg.paths.raw, cfg.data.synthetic, progress=progress)
    ds, has_lesion = validated_dataset(cfg.data, cfg.paths.raw, progress)
    splits = stratified_split(has_lesion, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    summary = {
        "dataset": ds.name,
        "manifest": str(ds.manifest),
        "labels": {str(k): v for k, v in ds.labels.items()},
        "channel_names": list(ds.channel_names),
        "lesion_labels": list(cfg.data.lesion_labels),
        "cases_with_lesions": sorted(c for c, f in has_lesion.items() if f),
        **splits,
    }
    write_json(Path(cfg.paths.splits), summary)
    log.info("splits: %d train, %d val, %d test", *(len(splits[k]) for k in ("train", "val", "test")))
    return summary


def synthesise(cfg: Config, out_dir: Path, progress: bool = True) -> Path:
    """``synth-data``: the embedded synthetic data set (``data.synthetic``) into ``out_dir``."""
    return write_synthetic_dataset(out_dir, cfg.data.synthetic, progress=progress)


def check(cfg: Config, progress: bool = True) -> tuple[Dataset, dict[str, bool]]:
    """``check-data``: validate the configured data set; returns it and ``{case_id: has_lesion}``."""
    return validated_dataset(cfg.data, cfg.paths.raw, progress)


def make_manifest(images: list[str], labels: str, output: Path, **options: Any) -> Path:
    """``make-dataset``: a ``dataset.json`` for scans matched by glob patterns (see
    :func:`pipeline.io.make_dataset.make_dataset` for ``options``); returns its path."""
    return make_dataset(images, labels, output, **options)
