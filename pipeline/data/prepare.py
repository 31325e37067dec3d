"""The ``data`` stage: synthesise (embedded default) or point at a data set, validate it, split it."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import Config
from pipeline.io.atomic import write_json
from pipeline.io.dataset import Dataset, load_dataset
from pipeline.io.validate import check_dataset

log = logging.getLogger(__name__)


def validated_dataset(cfg: Config, progress: bool = True) -> tuple[Dataset, dict[str, bool]]:
    """Load and fully validate the configured data set; returns it and ``{case_id: has_lesion}``."""
    ds = load_dataset(cfg.data, cfg.paths.raw)
    summaries = check_dataset(ds, cfg.data.label_remap, cfg.data.lesion_labels, progress=progress)
    lesion = set(cfg.data.lesion_labels)
    return ds, {s.case_id: bool(lesion & set(s.label_values)) for s in summaries}


def prepare_data(cfg: Config, progress: bool = True) -> dict:
    """Write the synthetic data set when configured, validate, and write ``paths.splits``."""
    from pipeline.data.splits import stratified_split

    if cfg.data.source == "synthetic":
        from pipeline.data.synthetic import write_synthetic_dataset

        write_synthetic_dataset(cfg.paths.raw, cfg.data.synthetic, progress=progress)
    ds, has_lesion = validated_dataset(cfg, progress)
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
