"""Real-data benchmark (issue 12): three systems at the same CPU wall-clock training budget per fold, on real
MRI, scored by one evaluator.

Systems (``--systems``, default all three, each in its own sub-folder of the work folder):

* ``ours``: the current working tree's defaults, trained with ``train.time_budget_min = --budget-min``
  (the budget covers the whole ``train()``: start-up, steps, the final checkpoint; the LR decay is
  compressed into it). If the config has no ``time_budget_min`` (older trees), it is calibrated like ``prev``.
* ``prev``: the previous defaults, the code at commit ``66f6038`` (before issue 12), extracted read-only with
  ``git archive 66f6038 | tar -x -C /tmp/prev_defaults`` (done automatically when ``--prev-code`` is absent)
  and run through its own CLI (``PYTHONPATH=/tmp/prev_defaults``, this repository's ``.venv`` python). It has
  no time budget, so its step budget is **calibrated**: a short run of ``train.epochs=2`` x
  ``--calibration-steps`` steps on the same fold; the second epoch's ``epoch_time_s`` / steps is the step
  time ``t``; it then trains ``floor(budget / t)`` steps as ``train.steps_per_epoch`` (its default 40) x
  ``epochs = round(steps / 40)`` (at least 1), so its cosine schedule runs to its end within about the
  budget. The calibration (one per data set, cached in ``prev/calibration.json``) is not counted.
* ``nnunet``: nnU-Net v2 itself, from the reference venv (``benchmarks/setup_reference_venv.sh``): its own
  ``nnUNetv2_plan_and_preprocess`` (``3d_fullres`` only), the trainer ``nnUNetTrainerBudget``
  (``benchmarks/nnunet_ext/trainers``: stops at the same budget, poly LR compressed into it, CPU device),
  ``nnUNetv2_predict`` with its default mirror TTA and ``--save_probabilities``. It is planned for the
  **same compute as ours**: a configuration ``3d_cpu_f<k>`` (``benchmarks/nnunet_ext/nnunet_cpu_plan.py``)
  with the patch and batch of ``ours``'s plan for that fold and ``ours``'s filter counts, topology from
  nnU-Net's own planner code. Its default plan (``3d_fullres``) is timed for ``--nnunet-default-iters``
  iterations and reported beside it. Its folds come from a ``splits_final.json`` written so that its
  training set equals ours per fold; its "validation" case is the fold's first training case (nnU-Net needs
  one; it only feeds the pseudo-Dice log, the final validation is skipped), so the test scan is never seen.

Data (``--dataset``):

* ``ms``: ``ms_lesion_change_lit_longitudinal`` (4 patients, leave one out, 4 folds); both FLAIR visits as two
  channels; lesion class ``lesion_change`` (label 1).
* ``brats``: ``brats2015_deepmedic`` (6 cases, 2 held out per fold, 3 folds); FLAIR + T1c
  (``T1c_subtrMeanDivStd.nii.gz``) as two channels; trained on 4 classes (BraTS 1+3 -> 1 necrosis /
  non-enhancing, 2 edema, 4 -> 3 enhancing; ``data.label_remap {3: 1, 4: 3}``, nnU-Net gets the same remapped
  label files). Scored twice: **enhancing tumour** (BraTS label 4; probability of class 3) and **whole
  tumour** (BraTS labels 1-4 merged; probability 1 - P(background)). The scans are already z-scored inside
  the brain, so our systems keep the intensities (``preprocess.intensity.scheme [none]``); nnU-Net applies
  its own z-score as it would. Lesions are counted from 50 mm^3 (``evaluation.min_lesion_mm3``), the BraTS
  2023+ lesion-wise rule for gliomas (50 voxels at 1 mm): the enhancing labels hold one-voxel fragments that
  would otherwise make most of the lesion count (fold 0: 9 of 11 enhancing "lesions" are 1-3 voxels).

Scoring, identical for all systems: each system writes a single-channel lesion probability map per test
scan in the scan's own grid (ours / prev: ``predict``; for whole tumour with a checkpoint whose plan names
``lesion_labels [1, 2, 3]``, so ``predict``'s lesion probability is the sum of those classes; nnU-Net: its
``.npz`` class probabilities, transposed from its (z, y, x) to (x, y, z)), the ground truth is written as
binary maps per lesion definition, and **this tree's** ``python -m pipeline evaluate --predictions ...
--lesion-label 1`` scores every system. Per fold: CPM with its bootstrap 95 % CI, sensitivity at 1 and 8 FP
per scan, lesion Dice (probability >= 0.5), lesion count; per system: the mean over folds and the **pooled**
evaluation of all folds' test scans together (every scan predicted once by the model that never saw it:
one FROC, one CI). Preprocessing seconds per case: our ``preprocess`` stage (all scans of the data set, per
fold) against nnU-Net's ``plan_and_preprocess`` (fingerprint + plan + preprocess, same scans, 2 processes).

Caching: each system's fold ends with ``<work>/<dataset>/<system>/fold<k>/result.json``; a rerun with the same
``--budget-min`` and test scans reuses it (``--force`` recomputes). A cached fold scored under another
minimum lesion volume (results from before it was recorded counted every lesion) is rescored from its saved
predictions, without training. Intermediate products (preprocessed data,
nnU-Net's preprocessing, calibration) are reused too, so an interrupted run resumes.

Usage (one data set per call; split systems into separate calls to keep each under a time slot)::

    .venv/bin/python benchmarks/bench_real_data.py --dataset ms --budget-min 15 --work /tmp/bench_real_data
    .venv/bin/python benchmarks/bench_real_data.py --dataset brats --systems nnunet --folds 0 --budget-min 1

The markdown section is printed and written into ``--output`` (replacing only this data set's section).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "real"
DEFAULT_OUTPUT = REPO / "benchmarks" / "real_data_latest.md"
DEFAULT_WORK = Path("/tmp/bench_real_data")
PREV_COMMIT = "66f6038"
DEFAULT_PREV_CODE = Path("/tmp/prev_defaults")
DEFAULT_REF_VENV = Path("/work/venv-ref")
NNUNET_EXT = REPO / "benchmarks" / "nnunet_ext"
SYSTEMS = ("ours", "prev", "nnunet")
SYSTEM_TITLES = {"ours": "ours (new defaults)", "prev": f"previous defaults ({PREV_COMMIT})", "nnunet": "nnU-Net v2"}
RESULT_VERSION = 1  # bump when result.json's content changes meaning (invalidates caches)


@dataclass(frozen=True)
class LesionDef:
    """One lesion definition to score.

    Attributes:
        name: used in folder names and tables.
        gt_values: label values in the label files on disk that form this lesion (merged).
        classes: class indices after ``label_remap`` whose probabilities sum to its probability.
        min_lesion_mm3: GT lesions below this volume are not counted (``evaluation.min_lesion_mm3``).
    """

    name: str
    gt_values: tuple[int, ...]
    classes: tuple[int, ...]
    min_lesion_mm3: float = 0.0


@dataclass(frozen=True)
class DataSpec:
    folder: str
    title: str
    channels: tuple[tuple[str, str], ...]  # (file name inside a case folder, channel name)
    labels: str
    label_names: tuple[str, ...]  # after remapping
    label_remap: dict[int, int]
    lesion_labels: tuple[int, ...]  # training lesion classes (after remapping)
    lesion_defs: tuple[LesionDef, ...]
    hold_out: int
    overrides: tuple[str, ...]  # for ours and prev
    nnunet_id: int
    nnunet_name: str


DATASETS: dict[str, DataSpec] = {
    "ms": DataSpec(
        folder="ms_lesion_change_lit_longitudinal",
        title="MS longitudinal FLAIR (lesion changes)",
        channels=(("study1_FLAIR_common.nii.gz", "FLAIR_visit1"), ("study2_FLAIR_common.nii.gz", "FLAIR_visit2")),
        labels="lesion_change_mask.nii.gz",
        label_names=("background", "lesion_change"),
        label_remap={},
        lesion_labels=(1,),
        lesion_defs=(LesionDef("lesion_change", (1,), (1,)),),
        hold_out=1,
        overrides=(),
        nnunet_id=901,
        nnunet_name="MSLesionChange",
    ),
    "brats": DataSpec(
        folder="brats2015_deepmedic",
        title="BraTS 2015 (FLAIR + T1c)",
        channels=(("Flair_subtrMeanDivStd.nii.gz", "FLAIR"), ("T1c_subtrMeanDivStd.nii.gz", "T1c")),
        labels="OTMultiClass.nii.gz",
        label_names=("background", "necrosis_nonenhancing", "edema", "enhancing"),
        label_remap={3: 1, 4: 3},
        lesion_labels=(3,),
        # the BraTS 2023+ lesion-wise rule for gliomas: components under 50 voxels (50 mm^3 at 1 mm) are not
        # counted (the ET labels hold one-voxel fragments that otherwise cap sensitivity, e.g. at 2 of 11)
        lesion_defs=(LesionDef("enhancing", (4,), (3,), min_lesion_mm3=50.0),
                     LesionDef("whole_tumour", (1, 2, 3, 4), (1, 2, 3), min_lesion_mm3=50.0)),
        hold_out=2,
        # z-scored inside the brain by the data set's authors (background -3.6, not 0): keep it
        overrides=("preprocess.intensity.scheme=[none]",),
        nnunet_id=902,
        nnunet_name="BraTS2015DeepMedic",
    ),
}


# --------------------------------------------------------------------------------------------------
# pure helpers (tested in tests/benchmarks/test_bench_real_data.py)


def fold_splits(case_ids: list[str], hold_out: int) -> list[dict[str, list[str]]]:
    """Consecutive groups of ``hold_out`` sorted cases are the test scans of each fold; the rest train.

    >>> fold_splits(["b", "a", "c"], 1)[1]
    {'train': ['a', 'c'], 'val': [], 'test': ['b']}
    """
    if hold_out < 1:
        raise ValueError(f"hold_out must be >= 1, got {hold_out}")
    ids = sorted(case_ids)
    folds = []
    for start in range(0, len(ids), hold_out):
        test = ids[start : start + hold_out]
        folds.append({"train": [c for c in ids if c not in test], "val": [], "test": test})
    return folds


def nnunet_splits(folds: list[dict[str, list[str]]]) -> list[dict[str, list[str]]]:
    """nnU-Net ``splits_final.json`` with the same training sets; its required validation case is the first
    training case (never the test scan: no leakage; nnU-Net only uses it for its pseudo-Dice log)."""
    return [{"train": list(f["train"]), "val": list(f["train"][:1])} for f in folds]


def parse_folds(spec: str, n_folds: int) -> list[int]:
    """``'all'`` or comma-separated indices -> sorted fold indices; out-of-range indices fail."""
    if spec == "all":
        return list(range(n_folds))
    folds = sorted({int(k) for k in spec.split(",") if k.strip()})
    bad = [k for k in folds if not 0 <= k < n_folds]
    if bad or not folds:
        raise ValueError(f"--folds {spec!r}: folds must be in 0..{n_folds - 1}")
    return folds


def calibrated_steps(budget_s: float, step_s: float, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, steps_per_epoch) whose ``epochs x steps`` training steps fit ``budget_s`` at ``step_s`` s/step.

    >>> calibrated_steps(900, 0.5, 40)
    (45, 40)
    >>> calibrated_steps(10, 2.0, 40)  # fewer steps than one epoch: one shorter epoch
    (1, 5)
    """
    if step_s <= 0 or budget_s <= 0:
        raise ValueError(f"budget ({budget_s} s) and step time ({step_s} s) must be > 0")
    total = max(1, math.floor(budget_s / step_s))
    if total < steps_per_epoch:
        return 1, total
    return max(1, round(total / steps_per_epoch)), steps_per_epoch


def cache_key(system: str, dataset: str, fold: int, test: list[str], budget_min: float,
              target_spacing_mm: list[float] | None = None) -> dict:
    """What a cached fold result must match to be reused (the spacing only when one was forced, so that
    results cached at each system's own plan keep their key)."""
    key = {"version": RESULT_VERSION, "system": system, "dataset": dataset, "fold": fold,
           "test": sorted(test), "budget_min": float(budget_min)}
    if target_spacing_mm:
        key["target_spacing_mm"] = [float(v) for v in target_spacing_mm]
    return key


def load_cached(path: Path, key: dict) -> dict | None:
    """The cached result at ``path`` if it exists, parses, and matches ``key``; else None."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("key") != key:
        return None
    return result


def save_result(path: Path, result: dict) -> None:
    """Write a fold result atomically (a kill never leaves a half-written cache file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def metrics_summary(metrics: dict) -> dict:
    """The benchmark's numbers from an ``evaluate`` ``metrics.json``: CPM (+ CI), sens @ 1 and 8 FP/scan,
    lesion Dice (the single class of a binary evaluation), lesion count."""
    sens = metrics.get("sensitivity_at_fp") or {}
    dice = metrics.get("dice") or {}
    return {
        "cpm": metrics.get("cpm"),
        "cpm_ci95": metrics.get("cpm_ci95"),
        "sens_1fp": sens.get("1"),
        "sens_8fp": sens.get("8"),
        "dice": next(iter(dice.values()), None) if dice else None,
        "lesions": metrics.get("lesions_total"),
        "scans": metrics.get("scans_total"),
    }


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def fmt_ci(ci) -> str:
    return "" if not ci else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def mean_of(values) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def lesion_table(lesion: str, results: dict[str, list[dict]], pooled: dict[str, dict]) -> list[str]:
    """Markdown rows for one lesion definition: every system's folds, their mean, and the pooled scoring.

    Args:
        lesion: lesion definition name (key of each result's ``metrics``).
        results: system -> fold results (``result.json`` contents).
        pooled: system -> :func:`metrics_summary` of all its folds' test scans evaluated together.
    """
    lines = [
        "| system | fold | test scan(s) | GT lesions | sens @ 1 FP/scan | sens @ 8 FP/scan | CPM [95% CI] | Dice | "
        "train s | steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for system in SYSTEMS:
        rows = results.get(system) or []
        for r in rows:
            m = r["metrics"][lesion]
            lines.append(
                f"| {system} | {r['fold']} | {', '.join(r['key']['test'])} | {fmt(m['lesions'])} | "
                f"{fmt(m['sens_1fp'])} | {fmt(m['sens_8fp'])} | {fmt(m['cpm'])}{fmt_ci(m['cpm_ci95'])} | "
                f"{fmt(m['dice'])} | {fmt(r.get('train_s'), 0)} | {fmt(r.get('train_steps'))} |"
            )
        if len(rows) > 1:
            ms = [r["metrics"][lesion] for r in rows]
            lines.append(
                f"| **{system}** | **mean** | | {fmt(mean_of(m['lesions'] for m in ms), 1)} | "
                f"{fmt(mean_of(m['sens_1fp'] for m in ms))} | {fmt(mean_of(m['sens_8fp'] for m in ms))} | "
                f"**{fmt(mean_of(m['cpm'] for m in ms))}** | {fmt(mean_of(m['dice'] for m in ms))} | "
                f"{fmt(mean_of(r.get('train_s') for r in rows), 0)} | |"
            )
        if system in pooled and len(rows) > 1:
            p = pooled[system]
            lines.append(
                f"| {system} | pooled | {p['scans']} scans | {fmt(p['lesions'])} | {fmt(p['sens_1fp'])} | "
                f"{fmt(p['sens_8fp'])} | {fmt(p['cpm'])}{fmt_ci(p['cpm_ci95'])} | {fmt(p['dice'])} | | |"
            )
    return lines


def system_table(results: dict[str, list[dict]], extras: dict[str, dict]) -> list[str]:
    """Per system: plan (patch x batch, parameters), preprocessing s/case, training and prediction seconds."""
    lines = [
        "| system | patch (x, y, z) x batch | parameters | budget method | preprocess s/case | train s/fold | "
        "steps/fold | s/step | predict s/fold |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for system in SYSTEMS:
        rows = results.get(system) or []
        if not rows:
            continue
        r0 = rows[0]
        train_s = mean_of(r.get("train_s") for r in rows)
        steps = mean_of(r.get("train_steps") for r in rows)
        lines.append(
            f"| {system} | {r0.get('patch_size')} x {r0.get('batch_size')} | {fmt(r0.get('parameters'))} | "
            f"{r0.get('budget_method', '')} | {fmt(mean_of(r.get('preprocess_s_per_case') for r in rows), 2)} | "
            f"{fmt(train_s, 0)} | {fmt(steps, 0)} | "
            f"{fmt(train_s / steps if train_s and steps else None, 2)} | "
            f"{fmt(mean_of(r.get('predict_s') for r in rows), 0)} |"
        )
    if "nnunet_default" in extras:
        d = extras["nnunet_default"]
        lines.append(
            f"| nnunet default plan (`3d_fullres`, timed only) | {d.get('patch_size')} x {d.get('batch_size')} | "
            f"{fmt(d.get('parameters'))} | {d.get('iterations')} iterations | | | | "
            f"{fmt(d.get('iteration_s'), 1)} | |"
        )
    return lines


def markdown(dataset: str, results: dict[str, list[dict]], pooled: dict[str, dict[str, dict]], extras: dict,
             command: str, machine_line: str, target_spacing_mm: list[float] | None = None) -> str:
    """The data set's section (between ``<!-- section:bench3-<dataset> -->`` markers); a forced target
    spacing (``--target-spacing``) is named in the title, since it is not each system's own plan."""
    spec = DATASETS[dataset]
    title = spec.title
    if target_spacing_mm:
        title += (f", reduced protocol: every system at {' x '.join(f'{v:g}' for v in target_spacing_mm)} mm "
                  "(nnU-Net through its `-overwrite_target_spacing`)")
    lines = [f"<!-- section:bench3-{dataset} -->", f"### {title}",
             "", "Command:", "", "```", command, "```", "", machine_line, ""]
    for lesion in spec.lesion_defs:
        head = f"**{lesion.name}**" + (f" (BraTS labels {list(lesion.gt_values)})" if dataset == "brats" else "")
        if lesion.min_lesion_mm3:
            head += f"; GT lesions under {lesion.min_lesion_mm3:g} mm^3 are not counted (`evaluation.min_lesion_mm3`)"
        lines += [head, ""]
        lines += lesion_table(lesion.name, results, {s: p[lesion.name] for s, p in pooled.items()
                                                     if lesion.name in p})
        lines.append("")
    lines += system_table(results, extras)
    if "nnunet_preprocess" in extras:
        pp = extras["nnunet_preprocess"]
        ours_pp = mean_of(r.get("preprocess_s_per_case") for r in results.get("ours") or [])
        ratio = f"; ours is {pp['s_per_case'] / ours_pp:.1f}x faster" if ours_pp else ""
        lines += ["", f"Preprocessing: nnU-Net `plan_and_preprocess` {pp['seconds']:.0f} s for {pp['cases']} "
                      f"cases = {pp['s_per_case']:.2f} s/case (`-np {pp['processes']}`){ratio}."]
    lines += ["", f"<!-- /section:bench3-{dataset} -->"]
    return "\n".join(lines)


def write_section(path: Path, dataset: str, section: str, header: str = "") -> None:
    """Replace this data set's marked section in ``path`` (or append it); other text is kept."""
    path = Path(path)
    text = path.read_text() if path.exists() else header
    tag = f"bench3-{dataset}"
    pattern = re.compile(rf"<!-- section:{tag} -->.*?<!-- /section:{tag} -->", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section
    path.write_text(text.rstrip("\n") + "\n")


# --------------------------------------------------------------------------------------------------
# processes


def run_logged(cmd: list[str], cwd: Path, log_path: Path, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` in ``cwd``, appending its output to ``log_path``; raise with the log's tail on failure.

    Returns:
        Wall-clock seconds.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"`{shlex.join(cmd[:4])} ...` failed (exit {proc.returncode}) in {cwd}; "
                           f"log {log_path}:\n{tail}")
    return seconds


def pipeline_env(code: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(code)}


def pipeline_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


# --------------------------------------------------------------------------------------------------
# inputs shared by all systems: nnU-Net-style image links, binary ground truth per lesion definition


def case_ids(data_root: Path, spec: DataSpec) -> list[str]:
    base = data_root / spec.folder
    return sorted(p.name for p in base.iterdir() if p.is_dir() and (p / spec.labels).is_file())


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and os.readlink(dst) == str(src):
            return
        dst.unlink()
    dst.symlink_to(src)


def write_label_file(src: Path, dst: Path, mapping: dict[int, int]) -> None:
    """``dst`` = ``src`` label map with values mapped (unlisted values -> 0), uint8, same grid and header."""
    import nibabel as nib
    import numpy as np

    if dst.is_file():
        return
    img = nib.load(str(src))
    data = np.rint(np.asarray(img.dataobj)).astype(np.int64)
    out = np.zeros(data.shape, np.uint8)
    for value, new in mapping.items():
        out[data == value] = new
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp.nii.gz")
    nib.save(nib.Nifti1Image(out, img.affine, header), str(tmp))
    os.replace(tmp, dst)


def prepare_inputs(data_root: Path, dataset: str, work: Path, folds: list[dict]) -> None:
    """``images/all/<case>_000c.nii.gz`` links, ``images/fold<k>/`` (test scans), ``gt/<lesion>/all`` and
    ``gt/<lesion>/fold<k>`` binary ground truth (1 = lesion)."""
    spec = DATASETS[dataset]
    base = data_root / spec.folder
    for case in case_ids(data_root, spec):
        for c, (file_name, _) in enumerate(spec.channels):
            link(base / case / file_name, work / "images" / "all" / f"{case}_{c:04d}.nii.gz")
        for lesion in spec.lesion_defs:
            write_label_file(base / case / spec.labels, work / "gt" / lesion.name / "all" / f"{case}.nii.gz",
                             {v: 1 for v in lesion.gt_values})
    for k, fold in enumerate(folds):
        for case in fold["test"]:
            for c in range(len(spec.channels)):
                name = f"{case}_{c:04d}.nii.gz"
                link(work / "images" / "all" / name, work / "images" / f"fold{k}" / name)
            for lesion in spec.lesion_defs:
                link(work / "gt" / lesion.name / "all" / f"{case}.nii.gz",
                     work / "gt" / lesion.name / f"fold{k}" / f"{case}.nii.gz")


def evaluate(pred_dir: Path, gt_dir: Path, out_dir: Path, log_path: Path, min_lesion_mm3: float = 0.0) -> dict:
    """Score a folder of lesion probability maps with this tree's ``evaluate --predictions`` (label 1)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_logged(pipeline_cmd("evaluate", "--params", str(REPO / "configs" / "params.yaml"), "--predictions",
                            str(pred_dir), "--labels", str(gt_dir), "--output", str(out_dir), "--lesion-label", "1",
                            "--set", f"evaluation.min_lesion_mm3={min_lesion_mm3}", "-q"),
               out_dir.parent, log_path, pipeline_env(REPO))
    return json.loads((out_dir / "metrics.json").read_text())


def scoring(dataset: str) -> dict[str, float]:
    """The scoring protocol of a data set's results: lesion name -> minimum counted GT lesion volume (mm^3)."""
    return {d.name: float(d.min_lesion_mm3) for d in DATASETS[dataset].lesion_defs}


def rescore(result: dict, dataset: str, k: int, opts: argparse.Namespace) -> dict:
    """``result`` with its metrics recomputed from its stored predictions when it was scored under another
    protocol (results from before ``scoring`` was recorded counted every lesion); cheap, no training."""
    wanted = scoring(dataset)
    if result.get("scoring", dict.fromkeys(wanted, 0.0)) == wanted:
        return result
    metrics = {}
    for lesion in DATASETS[dataset].lesion_defs:
        out = opts.work / dataset / result["system"] / f"fold{k}" / "rescored" / lesion.name
        m = evaluate(Path(result["predictions"][lesion.name]), opts.work / dataset / "gt" / lesion.name / f"fold{k}",
                     out, out.parent / "evaluate.log", lesion.min_lesion_mm3)
        metrics[lesion.name] = metrics_summary(m)
    result = {**result, "metrics": metrics, "scoring": wanted}
    save_result(opts.work / dataset / result["system"] / f"fold{k}" / "result.json", result)
    print(f"{result['system']} fold {k}: rescored with minimum lesion volumes {wanted} mm^3", flush=True)
    return result


# --------------------------------------------------------------------------------------------------
# ours and prev: this pipeline's CLI at two code versions


def code_root(system: str, opts: argparse.Namespace) -> Path:
    if system == "ours":
        return REPO
    root = opts.prev_code
    if not (root / "pipeline" / "cli.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", PREV_COMMIT], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


def code_has_time_budget(code: Path) -> bool:
    # cwd=code: `python -c` puts the working directory first on sys.path, which must not be another tree
    out = subprocess.run([sys.executable, "-c", "import pipeline; from pipeline.config import TrainConfig; "
                          "print(pipeline.__file__); print('time_budget_min' in TrainConfig.model_fields)"],
                         cwd=code, env=pipeline_env(code), capture_output=True, text=True, check=True)
    origin, has = out.stdout.split()[-2:]
    if not Path(origin).resolve().is_relative_to(code.resolve()):
        raise RuntimeError(f"`pipeline` imported from {origin}, not from {code}")
    return has == "True"


def write_params(code: Path, overrides: list[str], out: Path) -> dict:
    """Resolve ``code``'s own default params + overrides with that code's config loader; write and return it."""
    snippet = ("import json, sys; from pipeline.config import dump_config, load_config; "
               "cfg = load_config(sys.argv[2], sys.argv[3:]); open(sys.argv[1], 'w').write(dump_config(cfg)); "
               "print(json.dumps(cfg.model_dump(mode='json')))")
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", snippet, str(out), str(code / "configs" / "params.yaml"), *overrides],
                          cwd=code, env=pipeline_env(code), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"config for {code} with {overrides} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pipeline_overrides(system: str, dataset: str, manifest: Path, opts: argparse.Namespace) -> list[str]:
    spec = DATASETS[dataset]
    remap = "{" + ", ".join(f"{k}: {v}" for k, v in spec.label_remap.items()) + "}"
    out = [
        "data.source=msd",
        f"data.dataset={manifest}",
        f"data.lesion_labels={list(spec.lesion_labels)}",
        f"data.label_remap={remap}",
        f"train.device={opts.device}",
        f"inference.device={opts.device}",
        "tracking.enabled=false",
    ]
    if opts.target_spacing:
        out.append(f"preprocess.target_spacing_mm={list(opts.target_spacing)}")
    return out + list(spec.overrides) + (list(opts.overrides) if system == "ours" else [])


def prepare_pipeline_fold(system: str, dataset: str, k: int, split: dict, opts: argparse.Namespace) -> dict:
    """Fold folder with params, data split and preprocessed data (idempotent); returns timing and config."""
    spec = DATASETS[dataset]
    code = code_root(system, opts)
    env = pipeline_env(code)
    sys_dir = opts.work / dataset / system
    log_path = sys_dir / "pipeline.log"
    manifest = sys_dir / "manifest" / "dataset.json"
    if not manifest.is_file():
        base = opts.data_root / spec.folder
        args = ["make-dataset"]
        for file_name, _ in spec.channels:
            args += ["--images", str(base / "*" / file_name)]
        args += ["--labels", str(base / "*" / spec.labels), "--channel-names", *[n for _, n in spec.channels],
                 "--label-names", *spec.label_names, "--output", str(manifest)]
        manifest.parent.mkdir(parents=True, exist_ok=True)
        run_logged(pipeline_cmd(*args), manifest.parent, log_path, env)
    fold_dir = sys_dir / f"fold{k}"
    state_path = fold_dir / "prepared.json"
    if state_path.is_file():
        return json.loads(state_path.read_text())
    cfg = write_params(code, pipeline_overrides(system, dataset, manifest, opts), fold_dir / "configs" / "params.yaml")
    flog = fold_dir / "pipeline.log"
    run_logged(pipeline_cmd("prepare-data", "-q"), fold_dir, flog, env)
    splits_path = fold_dir / cfg["paths"]["splits"]
    splits = json.loads(splits_path.read_text())
    splits.update(split)
    splits_path.write_text(json.dumps(splits, indent=2) + "\n")
    pre_dir = fold_dir / cfg["paths"]["preprocessed"]
    shutil.rmtree(pre_dir, ignore_errors=True)  # the stage skips finished cases: time it from scratch
    pre_s = run_logged(pipeline_cmd("preprocess", "-q"), fold_dir, flog, env)
    plan = json.loads((pre_dir / "plan.json").read_text())
    # every scan the stage wrote (train, val and test: the test scans are preprocessed for `evaluate`)
    n_cases = len(list((pre_dir / "cases").glob("*.json"))) or len(splits["train"]) + len(splits["test"])
    state = {"config": cfg, "plan": plan, "preprocess_s": pre_s, "preprocess_cases": n_cases}
    save_result(state_path, state)
    return state


def read_epoch_times(train_log: Path) -> list[float]:
    with open(train_log) as f:
        return [float(row["epoch_time_s"]) for row in csv.DictReader(f) if row.get("epoch_time_s")]


def calibrate(system: str, dataset: str, fold_dir: Path, opts: argparse.Namespace) -> dict:
    """Seconds per training step of ``system`` on this data set (cached per data set; see the docstring)."""
    path = opts.work / dataset / system / "calibration.json"
    if path.is_file():
        return json.loads(path.read_text())
    steps = opts.calibration_steps
    models = "models_calibration"
    run_logged(pipeline_cmd("train", "-q", "--set", "train.epochs=2", "--set", f"train.steps_per_epoch={steps}",
                            "--set", f"paths.models={models}", "--set", "train.val_every=2"),
               fold_dir, fold_dir / "pipeline.log", pipeline_env(code_root(system, opts)))
    times = read_epoch_times(fold_dir / models / "train_log.csv")
    result = {"step_s": times[-1] / steps, "epoch_times_s": times, "steps_per_epoch": steps,
              "fold_dir": str(fold_dir)}
    save_result(path, result)
    shutil.rmtree(fold_dir / models, ignore_errors=True)
    return result


def find_checkpoint(models: Path) -> Path:
    for name in ("best.pt", "last.pt"):
        found = sorted(models.rglob(name), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise FileNotFoundError(f"{models}: no best.pt / last.pt after training")


def checkpoint_for(ckpt: Path, classes: tuple[int, ...], out: Path) -> Path:
    """The checkpoint, or a copy whose plan names ``classes`` as lesion labels (``predict``'s lesion
    probability is then the sum of those classes' softmax probabilities; weights are unchanged)."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if tuple(state["plan"]["lesion_labels"]) == tuple(classes):
        return ckpt
    state["plan"] = {**state["plan"], "lesion_labels": list(classes)}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


def run_pipeline_fold(system: str, dataset: str, k: int, split: dict, opts: argparse.Namespace) -> dict:
    spec = DATASETS[dataset]
    code = code_root(system, opts)
    env = pipeline_env(code)
    has_budget = code_has_time_budget(code)  # also checks that `pipeline` comes from `code`
    prepared = prepare_pipeline_fold(system, dataset, k, split, opts)
    cfg = prepared["config"]
    fold_dir = opts.work / dataset / system / f"fold{k}"
    flog = fold_dir / "pipeline.log"
    budget_s = 60.0 * opts.budget_min
    train_set: list[str] = []
    planned_steps = None
    if system == "ours" and has_budget:
        method = "train.time_budget_min"
        # epochs x steps only cap the run: the budget ends it and drives the LR decay
        train_set = [f"train.time_budget_min={opts.budget_min}", "train.epochs=100000"]
    else:
        cal = calibrate(system, dataset, fold_dir, opts)
        epochs, steps = calibrated_steps(budget_s, cal["step_s"], int(cfg["train"]["steps_per_epoch"]))
        method = f"calibrated {cal['step_s']:.2f} s/step -> {epochs} x {steps}"
        planned_steps = epochs * steps
        train_set = [f"train.epochs={epochs}", f"train.steps_per_epoch={steps}", f"train.val_every={epochs}"]
    shutil.rmtree(fold_dir / cfg["paths"]["models"], ignore_errors=True)  # never resume a stale run
    sets = [a for kv in train_set for a in ("--set", kv)]
    train_s = run_logged(pipeline_cmd("train", "-q", *sets), fold_dir, flog, env)
    models = fold_dir / cfg["paths"]["models"]
    ckpt = find_checkpoint(models)
    train_log = models / "train_log.csv"
    n_steps = planned_steps
    summary = models / "train_summary.json"  # the budgeted loop records the steps it ran
    if n_steps is None and summary.is_file():
        n_steps = json.loads(summary.read_text()).get("steps")
    if n_steps is None and train_log.is_file():  # per-epoch step counts
        with open(train_log) as f:
            n_steps = sum(int(float(r["steps"])) for r in csv.DictReader(f) if r.get("steps")) or None
    if n_steps is None:
        import torch

        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        n_steps = state.get("steps")  # the budgeted loop records the steps it ran in the checkpoint
    predict_s = 0.0
    metrics = {}
    for lesion in spec.lesion_defs:
        model = checkpoint_for(ckpt, lesion.classes, fold_dir / "models_lesion" / f"{lesion.name}.pt")
        pred = fold_dir / "bench_predictions" / lesion.name
        shutil.rmtree(pred, ignore_errors=True)
        predict_s += run_logged(pipeline_cmd("predict", "-q", "--model", str(model), "--input",
                                             str(opts.work / dataset / "images" / f"fold{k}"), "--output", str(pred)),
                                fold_dir, flog, env)
        m = evaluate(pred / "probabilities", opts.work / dataset / "gt" / lesion.name / f"fold{k}",
                     fold_dir / "bench_evaluation" / lesion.name, flog, lesion.min_lesion_mm3)
        metrics[lesion.name] = metrics_summary(m)
    plan = prepared["plan"]
    return {
        "train_s": train_s, "train_steps": n_steps, "budget_method": method, "predict_s": predict_s,
        "preprocess_s": prepared["preprocess_s"],
        "preprocess_s_per_case": prepared["preprocess_s"] / max(1, prepared["preprocess_cases"]),
        "patch_size": plan.get("patch_size"), "batch_size": plan.get("batch_size"),
        "target_spacing_mm": plan.get("target_spacing_mm"), "parameters": count_parameters(ckpt),
        "model": cfg["train"]["model"], "metrics": metrics,
        "predictions": {d.name: str(fold_dir / "bench_predictions" / d.name / "probabilities")
                        for d in spec.lesion_defs},
    }


def count_parameters(ckpt: Path) -> int | None:
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    weights = state.get("model") or {}
    return int(sum(v.numel() for v in weights.values() if hasattr(v, "numel"))) or None


# --------------------------------------------------------------------------------------------------
# nnU-Net v2


def nnunet_env(dataset: str, opts: argparse.Namespace, **extra: str) -> dict[str, str]:
    root = opts.work / dataset / "nnunet"
    venv_bin = opts.ref_venv / "bin"
    return {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(opts.ref_venv),
        "PYTHONPATH": "",
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_extTrainer": str(NNUNET_EXT / "trainers"),
        "nnUNet_n_proc_DA": str(opts.nnunet_da_procs),
        "nnUNet_compile": "false",
        **extra,
    }


def ensure_nnunet_trainer(opts: argparse.Namespace) -> None:
    """Link ``nnUNetTrainerBudget.py`` into the installed ``nnunetv2/training/nnUNetTrainer/`` folder.

    nnU-Net looks trainers up by importing every module of that package before it tries
    ``nnUNet_extTrainer``; one of them (``primus``) imports timm -> torchvision, and PyPI's torchvision
    0.28.0 is a CUDA build that fails to import next to the CPU torch 2.13.0 (``operator torchvision::nms
    does not exist``). A module at the top of the folder is found first, before any subpackage is imported.
    """
    found = sorted(opts.ref_venv.glob("lib/python*/site-packages/nnunetv2/training/nnUNetTrainer"))
    if not found:
        raise RuntimeError(f"{opts.ref_venv}: no nnunetv2 (run benchmarks/setup_reference_venv.sh)")
    link(NNUNET_EXT / "trainers" / "nnUNetTrainerBudget.py", found[-1] / "nnUNetTrainerBudget.py")


def nnunet_dataset_name(dataset: str) -> str:
    spec = DATASETS[dataset]
    return f"Dataset{spec.nnunet_id:03d}_{spec.nnunet_name}"


def nnunet_setup(dataset: str, folds: list[dict], opts: argparse.Namespace) -> dict:
    """Raw data set (links; remapped labels written), ``plan_and_preprocess`` (timed), ``splits_final.json``."""
    spec = DATASETS[dataset]
    if not (opts.ref_venv / "bin" / "nnUNetv2_plan_and_preprocess").is_file():
        raise RuntimeError(f"{opts.ref_venv}: no nnunetv2 (run benchmarks/setup_reference_venv.sh)")
    ensure_nnunet_trainer(opts)
    root = opts.work / dataset / "nnunet"
    state_path = root / "preprocess.json"
    name = nnunet_dataset_name(dataset)
    if state_path.is_file():
        state = json.loads(state_path.read_text())
    else:
        raw = root / "raw" / name
        cases = case_ids(opts.data_root, spec)
        base = opts.data_root / spec.folder
        mapping = {v: v for v in range(len(spec.label_names) + 8)}
        mapping.update(spec.label_remap)
        for case in cases:
            for c in range(len(spec.channels)):
                link(opts.work / dataset / "images" / "all" / f"{case}_{c:04d}.nii.gz",
                     raw / "imagesTr" / f"{case}_{c:04d}.nii.gz")
            write_label_file(base / case / spec.labels, raw / "labelsTr" / f"{case}.nii.gz", mapping)
        (raw / "dataset.json").write_text(json.dumps({
            "channel_names": {str(c): n for c, (_, n) in enumerate(spec.channels)},
            "labels": {n: i for i, n in enumerate(spec.label_names)},
            "numTraining": len(cases), "file_ending": ".nii.gz",
        }, indent=2) + "\n")
        shutil.rmtree(root / "preprocessed" / name, ignore_errors=True)
        # --target-spacing (a reduced protocol): nnU-Net's own switch for its 3d_fullres spacing, given in
        # its (z, y, x) order, so that it preprocesses, trains and predicts at the same spacing as ours
        spacing = ["-overwrite_target_spacing", *map(str, reversed(opts.target_spacing))] if opts.target_spacing else []
        seconds = run_logged(["nnUNetv2_plan_and_preprocess", "-d", str(spec.nnunet_id), "-c", "3d_fullres",
                              "-npfp", str(opts.nnunet_processes), "-np", str(opts.nnunet_processes), *spacing],
                             root, root / "nnunet.log", nnunet_env(dataset, opts))
        state = {"seconds": seconds, "cases": len(cases), "s_per_case": seconds / len(cases),
                 "processes": opts.nnunet_processes, "target_spacing_mm": opts.target_spacing}
        save_result(state_path, state)
    if state.get("target_spacing_mm") != opts.target_spacing:
        raise RuntimeError(f"{state_path}: nnU-Net was preprocessed at target spacing "
                           f"{state.get('target_spacing_mm')}, not {opts.target_spacing}: use another --work folder")
    (root / "preprocessed" / name / "splits_final.json").write_text(json.dumps(nnunet_splits(folds), indent=1))
    return state


def nnunet_plans_path(dataset: str, opts: argparse.Namespace) -> Path:
    return opts.work / dataset / "nnunet" / "preprocessed" / nnunet_dataset_name(dataset) / "nnUNetPlans.json"


def nnunet_train(dataset: str, configuration: str, k: int, opts: argparse.Namespace, **env: str) -> tuple[float, dict]:
    root = opts.work / dataset / "nnunet"
    out = root / "results" / nnunet_dataset_name(dataset) / f"nnUNetTrainerBudget__nnUNetPlans__{configuration}"
    shutil.rmtree(out / f"fold_{k}", ignore_errors=True)
    seconds = run_logged(["nnUNetv2_train", str(DATASETS[dataset].nnunet_id), configuration, str(k),
                          "-tr", "nnUNetTrainerBudget", "-device", opts.device if opts.device != "auto" else "cpu"],
                         root, root / "nnunet.log", nnunet_env(dataset, opts, **env))
    return seconds, json.loads((out / f"fold_{k}" / "budget_log.json").read_text())


def nnunet_default_timing(dataset: str, opts: argparse.Namespace) -> dict | None:
    """Seconds per training iteration at nnU-Net's default ``3d_fullres`` plan (cached per data set)."""
    if opts.nnunet_default_iters <= 0:
        return None
    path = opts.work / dataset / "nnunet" / "default_plan_timing.json"
    cached = load_cached(path, {"iterations": opts.nnunet_default_iters})
    if cached:
        return cached
    _, log = nnunet_train(dataset, "3d_fullres", 0, opts, NNUNET_BENCH_MAX_ITERS=str(opts.nnunet_default_iters))
    its = log["iteration_s"]
    result = {"key": {"iterations": opts.nnunet_default_iters}, "iterations": len(its),
              "iteration_s": its[-1] if len(its) > 1 else its[0], "all_iteration_s": its,
              "patch_size": list(reversed(log["patch_size"])), "batch_size": log["batch_size"],
              "parameters": log["parameters"]}
    save_result(path, result)
    return result


def nnunet_probabilities_to_maps(npz: Path, reference: Path, lesion_defs: tuple[LesionDef, ...],
                                 out_dirs: dict[str, Path]) -> None:
    """nnU-Net's ``.npz`` class probabilities ``(K, z, y, x)`` (SimpleITK array order of the input) -> one
    lesion probability NIfTI per definition in the reference label file's grid ``(x, y, z)``: the sum of the
    definition's classes (for whole tumour that is 1 - P(background))."""
    import nibabel as nib
    import numpy as np

    probs = np.load(npz)["probabilities"].astype(np.float32)
    ref = nib.load(str(reference))
    probs = np.ascontiguousarray(probs.transpose(0, 3, 2, 1))  # (K, x, y, z)
    if probs.shape[1:] != ref.shape[:3]:
        raise ValueError(f"{npz}: probabilities {probs.shape[1:]} do not match {reference} grid {ref.shape[:3]}")
    header = ref.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1, 0)
    for lesion in lesion_defs:
        lesion_prob = np.clip(probs[list(lesion.classes)].sum(0), 0.0, 1.0)
        out = out_dirs[lesion.name] / reference.name
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(lesion_prob, ref.affine, header), str(out))


def nnunet_seg_agreement(seg: Path, probs_npz: Path) -> float:
    """Fraction of voxels where the argmax of the exported probabilities equals nnU-Net's own segmentation
    (checks the axis order of the export; ~1.0 expected)."""
    import nibabel as nib
    import numpy as np

    probs = np.load(probs_npz)["probabilities"]
    am = probs.argmax(0).transpose(2, 1, 0)
    s = np.asarray(nib.load(str(seg)).dataobj)
    return float(np.mean(am == s)) if am.shape == s.shape else 0.0


def run_nnunet_fold(dataset: str, k: int, split: dict, folds: list[dict], opts: argparse.Namespace) -> dict:
    spec = DATASETS[dataset]
    root = opts.work / dataset / "nnunet"
    pre = nnunet_setup(dataset, folds, opts)
    ours = prepare_pipeline_fold("ours", dataset, k, split, opts)  # the plan nnU-Net is matched to
    # filter counts: the plan's (the network it built) or else the config's
    filters = (ours["plan"].get("network") or {}).get("filters")
    model = ours["config"]["train"]["model"]
    base = filters[0] if filters else model["base_filters"] or 32
    max_features = max(filters) if filters else model.get("max_filters") or 320
    configuration = f"3d_cpu_f{k}"
    venv_python = str(opts.ref_venv / "bin" / "python")
    run_logged([venv_python, str(NNUNET_EXT / "nnunet_cpu_plan.py"), str(nnunet_plans_path(dataset, opts)),
                "--name", configuration, "--patch-xyz", *map(str, ours["plan"]["patch_size"]),
                "--batch", str(ours["plan"]["batch_size"]), "--base-features", str(base),
                "--max-features", str(max_features)],
               root, root / "nnunet.log", nnunet_env(dataset, opts))
    train_s, log = nnunet_train(dataset, configuration, k, opts, NNUNET_BENCH_BUDGET_S=str(60.0 * opts.budget_min))
    pred = root / "predictions" / f"fold{k}"
    shutil.rmtree(pred, ignore_errors=True)
    predict_s = run_logged(["nnUNetv2_predict", "-i", str(opts.work / dataset / "images" / f"fold{k}"), "-o", str(pred),
                            "-d", str(spec.nnunet_id), "-c", configuration, "-f", str(k), "-tr", "nnUNetTrainerBudget",
                            "-chk", "checkpoint_final.pth", "--save_probabilities", "-device",
                            opts.device if opts.device != "auto" else "cpu", "-npp", "1", "-nps", "1",
                            *(["--disable_tta"] if opts.nnunet_disable_tta else [])],
                           root, root / "nnunet.log", nnunet_env(dataset, opts))
    maps = {d.name: root / "lesion_maps" / f"fold{k}" / d.name for d in spec.lesion_defs}
    for m in maps.values():
        shutil.rmtree(m, ignore_errors=True)
    agreement = {}
    for case in split["test"]:
        reference = opts.work / dataset / "gt" / spec.lesion_defs[0].name / "all" / f"{case}.nii.gz"
        nnunet_probabilities_to_maps(pred / f"{case}.npz", reference, spec.lesion_defs, maps)
        agreement[case] = nnunet_seg_agreement(pred / f"{case}.nii.gz", pred / f"{case}.npz")
    metrics = {}
    for lesion in spec.lesion_defs:
        m = evaluate(maps[lesion.name], opts.work / dataset / "gt" / lesion.name / f"fold{k}",
                     root / "evaluation" / f"fold{k}" / lesion.name, root / "nnunet.log", lesion.min_lesion_mm3)
        metrics[lesion.name] = metrics_summary(m)
    return {
        "train_s": train_s, "train_loop_s": log["train_loop_s"], "train_steps": log["iterations"],
        "budget_method": "nnUNetTrainerBudget (wall clock)", "predict_s": predict_s,
        "preprocess_s": pre["seconds"], "preprocess_s_per_case": pre["s_per_case"],
        "patch_size": list(reversed(log["patch_size"])), "batch_size": log["batch_size"],
        "parameters": log["parameters"], "configuration": configuration, "metrics": metrics,
        "argmax_vs_seg_agreement": agreement, "mirror_tta": not opts.nnunet_disable_tta,
        "predictions": {d: str(p) for d, p in maps.items()},
    }


# --------------------------------------------------------------------------------------------------
# driver


def run_fold(system: str, dataset: str, k: int, folds: list[dict], opts: argparse.Namespace) -> dict:
    split = folds[k]
    path = opts.work / dataset / system / f"fold{k}" / "result.json"
    key = cache_key(system, dataset, k, split["test"], opts.budget_min, opts.target_spacing)
    cached = None if opts.force else load_cached(path, key)
    if cached:
        print(f"{system} fold {k}: cached ({path})", flush=True)
        return rescore(cached, dataset, k, opts)
    if opts.force and system != "nnunet":
        (opts.work / dataset / system / f"fold{k}" / "prepared.json").unlink(missing_ok=True)
    print(f"{system} fold {k}: train {split['train']}, test {split['test']} ...", flush=True)
    t0 = time.perf_counter()
    if system == "nnunet":
        body = run_nnunet_fold(dataset, k, split, folds, opts)
    else:
        body = run_pipeline_fold(system, dataset, k, split, opts)
    result = {"key": key, "fold": k, "system": system, "wall_s": time.perf_counter() - t0,
              "load_avg_end": os.getloadavg()[0], "scoring": scoring(dataset), **body}
    save_result(path, result)
    summary = ", ".join(f"{d} CPM {fmt(m['cpm'])} Dice {fmt(m['dice'])}" for d, m in body["metrics"].items())
    print(f"{system} fold {k}: {summary}; train {body['train_s']:.0f} s, {body['train_steps']} steps", flush=True)
    return result


def pooled_metrics(system: str, dataset: str, rows: list[dict], opts: argparse.Namespace) -> dict[str, dict]:
    """Evaluate all folds' test scans of ``system`` together (one FROC and CI per lesion definition)."""
    out = {}
    for lesion in DATASETS[dataset].lesion_defs:
        folder = opts.work / dataset / system / "pooled" / lesion.name
        shutil.rmtree(folder, ignore_errors=True)
        for r in rows:
            src = Path(r["predictions"][lesion.name])
            for f in sorted(src.iterdir()):
                link(f, folder / "predictions" / f.name)
                link(opts.work / dataset / "gt" / lesion.name / "all" / f.name, folder / "labels" / f.name)
        m = evaluate(folder / "predictions", folder / "labels", folder / "evaluation", folder / "evaluate.log",
                     lesion.min_lesion_mm3)
        out[lesion.name] = metrics_summary(m)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of ours,prev,nnunet")
    p.add_argument("--folds", default="all", help="'all' or comma-separated fold indices, e.g. 0 or 0,2")
    p.add_argument("--budget-min", type=float, default=15.0, help="training wall-clock budget per fold (minutes)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--target-spacing", type=float, nargs=3, default=None,
                   help="mm (x y z), for all three systems, nnU-Net through its own -overwrite_target_spacing "
                        "(a reduced protocol; default: each system's own plan)")
    p.add_argument("--calibration-steps", type=int, default=10, help="steps per calibration epoch (prev)")
    p.add_argument("--nnunet-default-iters", type=int, default=2,
                   help="iterations to time nnU-Net's default plan (0: skip)")
    p.add_argument("--nnunet-da-procs", type=int, default=1, help="nnU-Net augmentation processes (nnUNet_n_proc_DA)")
    p.add_argument("--nnunet-disable-tta", action="store_true",
                   help="nnU-Net prediction without its mirror TTA (8x faster; at 1 mm BraTS with the CPU patch, "
                        "TTA costs about 12 min per scan on 2 cores)")
    p.add_argument("--nnunet-processes", type=int, default=2, help="nnU-Net plan_and_preprocess processes")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder (results are cached here)")
    p.add_argument("--prev-code", type=Path, default=DEFAULT_PREV_CODE, help=f"extracted commit {PREV_COMMIT}")
    p.add_argument("--ref-venv", type=Path, default=DEFAULT_REF_VENV, help="venv with nnunetv2")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="only print the table")
    p.add_argument("--force", action="store_true", help="ignore cached fold results")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for `ours` (repeatable)")
    opts = p.parse_args(argv)
    systems = [s.strip() for s in opts.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        p.error(f"--systems: unknown {bad}; choose from {list(SYSTEMS)}")
    opts.systems = systems
    opts.work = opts.work.resolve()
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    command = ".venv/bin/python benchmarks/bench_real_data.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    spec = DATASETS[opts.dataset]
    if not (opts.data_root / spec.folder).is_dir():
        print(f"data set not found: {opts.data_root / spec.folder}", file=sys.stderr)
        return 2
    work = opts.work / opts.dataset
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    folds = fold_splits(case_ids(opts.data_root, spec), spec.hold_out)
    chosen = parse_folds(opts.folds, len(folds))
    prepare_inputs(opts.data_root, opts.dataset, work, folds)
    extras: dict = {}
    for system in opts.systems:
        for k in chosen:
            run_fold(system, opts.dataset, k, folds, opts)
        if system == "nnunet":
            timing = nnunet_default_timing(opts.dataset, opts)
            if timing:
                extras["nnunet_default"] = timing
    # the table shows every cached fold of every system at this budget, not only the ones run now
    results: dict[str, list[dict]] = {}
    for system in SYSTEMS:
        for k in range(len(folds)):
            r = load_cached(work / system / f"fold{k}" / "result.json",
                            cache_key(system, opts.dataset, k, folds[k]["test"], opts.budget_min,
                                      opts.target_spacing))
            if r:
                results.setdefault(system, []).append(rescore(r, opts.dataset, k, opts))
    pooled = {s: pooled_metrics(s, opts.dataset, rows, opts) for s, rows in results.items() if len(rows) > 1}
    if (work / "nnunet" / "preprocess.json").is_file():
        extras["nnunet_preprocess"] = json.loads((work / "nnunet" / "preprocess.json").read_text())
    if "nnunet_default" not in extras and (work / "nnunet" / "default_plan_timing.json").is_file():
        extras["nnunet_default"] = json.loads((work / "nnunet" / "default_plan_timing.json").read_text())
    machine_line = (f"Machine: {machine()}; device `{opts.device}`; load average {load0:.1f} at the start, "
                    f"{os.getloadavg()[0]:.1f} at the end; this call {(time.perf_counter() - t0) / 60:.1f} min; "
                    f"budget {opts.budget_min:g} min of training per fold and system.")
    section = markdown(opts.dataset, results, pooled, extras, command, machine_line, opts.target_spacing)
    print(section)
    (work / "results.json").write_text(json.dumps({"results": results, "pooled": pooled, "extras": extras},
                                                  indent=1) + "\n")
    if not opts.no_write:
        write_section(opts.output, opts.dataset, section)
        print(f"wrote {opts.output}; work folder {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
