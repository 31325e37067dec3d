"""The preprocess stage's output folder, spelled once (the stage writes it; training reads it)::

    <out>/fingerprint.json        data set fingerprint (train + val cases)
    <out>/plan.json               the plan (:class:`pipeline.contracts.Plan`)
    <out>/cases/<id>_image.npy    float32 (C, x, y, z)
    <out>/cases/<id>_label.npy    uint8 (x, y, z)             (labelled cases)
    <out>/cases/<id>.json         the case record (:class:`pipeline.contracts.CaseRecord`), written last
"""

from __future__ import annotations

from pathlib import Path

PLAN_FILE, FINGERPRINT_FILE, CASES_DIR = "plan.json", "fingerprint.json", "cases"


def plan_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / PLAN_FILE


def fingerprint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / FINGERPRINT_FILE


def cases_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CASES_DIR


def case_paths(cases_folder: Path, case_id: str) -> dict[str, Path]:
    """Where one case lives in ``<out>/cases``: ``image``, ``label`` and ``record``."""
    return {
        "image": cases_folder / f"{case_id}_image.npy",
        "label": cases_folder / f"{case_id}_label.npy",
        "record": cases_folder / f"{case_id}.json",
    }
