"""``predict``: every scan under an input path through one model or a fold ensemble, into
``<output>/probabilities/`` and ``<output>/labels/`` in each scan's own geometry and file format."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import Config
from pipeline.inference.predict import load_predictor, predict_volume
from pipeline.io.dataset import Case, read_case_image
from pipeline.io.formats import write_volume
from pipeline.io.scan_files import collect_inputs, output_suffix
from pipeline.stages.shard import Shard

log = logging.getLogger(__name__)


def run(cfg: Config, model_path: Path | Sequence[Path], input_path: Path, output_dir: Path,
                  progress: bool = True, output_format: str = "input", shard: Shard | None = None) -> list[Path]:
    """Predict every scan under ``input_path``; writes ``output_dir/probabilities/<case><suffix>`` and
    ``output_dir/labels/<case><suffix>`` (file names match the inputs, so ``evaluate`` can pair them).
    Several checkpoints in ``model_path``: their probabilities are averaged (an ensemble).

    With ``shard`` ``K/N`` only the scans ``sorted(case names)[K::N]`` are predicted: N shards, run anywhere
    at the same time into one ``output_dir``, write exactly the files of one unsharded run (each file is
    written atomically, so a killed shard leaves no half-written output; re-run it)."""
    from tqdm import tqdm

    loaded = load_predictor(model_path, cfg.inference.device)
    cases = collect_inputs(input_path, loaded.plan.n_channels)
    if shard is not None:
        cases = shard.select(cases, key=lambda case: case[0])
        log.info("shard %s: %d scan(s)", shard, len(cases))
    written = []
    for name, files in tqdm(cases, desc="predict", unit="scan", disable=not progress):
        image = read_case_image(Case(name, tuple(files)))  # channel files must share one grid
        pred = predict_volume(loaded, image, cfg.inference)
        suffix = output_suffix(files[0], output_format)
        written.append(write_volume(output_dir / "probabilities" / f"{name}{suffix}", pred.lesion_probability))
        write_volume(output_dir / "labels" / f"{name}{suffix}", pred.labels)
        log.info("%s -> %s", files[0], written[-1])
    return written
