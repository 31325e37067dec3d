"""Real-data benchmark (issue 8): cross-validated training and lesion-level evaluation on real MRI, run
through the real CLI stages, on CPU.

* ``--dataset ms``: the MS longitudinal FLAIR set (4 patients, ``../shared/data/real/
  ms_lesion_change_lit_longitudinal``). Leave one patient out: train on three, test on the fourth, for each
  of the four folds. Inputs: both visits as two channels (``--ms-channels both``, the default: the labels
  mark lesion *changes* between the visits, which a model can only see with both) or the second visit
  only (``study2``). One lesion class: ``lesion_change``.
* ``--dataset brats``: the 6 BraTS 2015 cases (``brats2015_deepmedic``, FLAIR only). Two cases held out per
  fold, three folds. Labels remapped on read (``data.label_remap {3: 1, 4: 3}``): 0 background,
  1 necrosis + non-enhancing tumour (BraTS 1 and 3), 2 edema, 3 enhancing tumour (BraTS 4); the lesion
  class is the enhancing tumour (``data.lesion_labels [3]``), the others are ordinary structures. These
  copies are already z-scored inside the brain (constant background -3.6), so intensities are kept
  (``preprocess.intensity.scheme [none]``); they are planned at 2 mm isotropic to fit a CPU budget.

Per fold, in its own work folder (``<work>/<dataset>/fold<k>/``): ``make-dataset`` (once per data set: a
``dataset.json`` pointing at the shared scans, no copies), a ``configs/params.yaml`` (the repository's
params plus the overrides below, written out so the fold can be rerun by hand), ``prepare-data``
(validation), then ``data/splits.json`` is replaced by the fold's split, then ``preprocess``, ``train``,
``evaluate``. No validation scans by default (``--val none``: with three training scans every scan is
needed for training; the last epoch's model is evaluated and no operating point is chosen, so Dice is
that of the argmax label map). Reported per fold from ``results/evaluation/metrics.json``: lesion-level
sensitivity at 1 and 8 false positives per scan, CPM, Dice of the lesion class, lesion count, stage times;
and their mean over the folds run.

Usage::

    .venv/bin/python benchmarks/bench_real_data.py --dataset ms --folds all --epochs 40 --steps 25
    .venv/bin/python benchmarks/bench_real_data.py --dataset brats --folds all --epochs 40 --steps 25
    .venv/bin/python benchmarks/bench_real_data.py --dataset ms --folds 0 --epochs 12 --steps 20   # one fold

The markdown table is printed and written into ``--output`` (default ``benchmarks/RESULTS.md (section "Real data")``),
replacing only the section of the data set that was run, with the exact command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "real"
DEFAULT_OUTPUT = REPO / "benchmarks" / "real_data_latest.md"

DATASETS = {
    "ms": {
        "folder": "ms_lesion_change_lit_longitudinal",
        "labels": "lesion_change_mask.nii.gz",
        "label_names": ["background", "lesion_change"],
        "lesion_labels": [1],
        "label_remap": {},
        "hold_out": 1,
        "target_spacing_mm": None,  # native 0.72 x 0.72 x 3 mm
        "overrides": [],
    },
    "brats": {
        "folder": "brats2015_deepmedic",
        "labels": "OTMultiClass.nii.gz",
        "label_names": ["background", "necrosis_nonenhancing", "edema", "enhancing"],
        "lesion_labels": [3],
        "label_remap": {3: 1, 4: 3},
        # 1 mm isotropic, 240 x 240 x 155 and not cropped (the z-scored FLAIR has a constant non-zero
        # background): 2 mm keeps a CPU fold within minutes
        "target_spacing_mm": [2.0, 2.0, 2.0],
        "hold_out": 2,
        # already z-scored inside the brain by the data set's authors (background -3.6, not 0): keep it
        "overrides": ["preprocess.intensity.scheme=[none]"],
    },
}


def channels(dataset: str, ms_channels: str) -> list[tuple[str, str]]:
    """(file name inside a case folder, channel name) per input channel."""
    if dataset == "brats":
        return [("Flair_subtrMeanDivStd.nii.gz", "FLAIR")]
    if ms_channels == "both":
        return [
            ("study1_FLAIR_common.nii.gz", "FLAIR_visit1"),
            ("study2_FLAIR_common.nii.gz", "FLAIR_visit2"),
        ]
    return [("study2_FLAIR_common.nii.gz", "FLAIR")]


def fold_splits(case_ids: list[str], hold_out: int) -> list[dict[str, list[str]]]:
    """Consecutive groups of ``hold_out`` sorted cases are the test scans of each fold; the rest train."""
    ids = sorted(case_ids)
    folds = []
    for start in range(0, len(ids), hold_out):
        test = ids[start : start + hold_out]
        folds.append({"train": [c for c in ids if c not in test], "val": [], "test": test})
    return folds


def run_stage(args: list[str], cwd: Path, log_path: Path) -> float:
    """Run ``python -m pipeline <args>`` in ``cwd``; raise with the log's tail on failure; return seconds."""
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ python -m pipeline {shlex.join(args)}\n")
        log.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(
            f"`python -m pipeline {args[0]}` failed (exit {proc.returncode}) in {cwd}:\n{tail}"
        )
    return seconds


def make_manifest(data_root: Path, dataset: str, ms_channels: str, out: Path, log_path: Path) -> Path:
    spec = DATASETS[dataset]
    base = data_root / spec["folder"]
    chans = channels(dataset, ms_channels)
    args = ["make-dataset"]
    for file_name, _ in chans:
        args += ["--images", str(base / "*" / file_name)]
    args += [
        "--labels",
        str(base / "*" / spec["labels"]),
        "--channel-names",
        *[name for _, name in chans],
        "--label-names",
        *spec["label_names"],
        "--output",
        str(out),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    run_stage(args, out.parent, log_path)
    return out


def fold_overrides(dataset: str, manifest: Path, opts: argparse.Namespace) -> list[str]:
    spec = DATASETS[dataset]
    remap = "{" + ", ".join(f"{k}: {v}" for k, v in spec["label_remap"].items()) + "}"
    spacing = opts.target_spacing or spec["target_spacing_mm"]
    out = [
        "data.source=msd",
        f"data.dataset={manifest}",
        f"data.lesion_labels={spec['lesion_labels']}",
        f"data.label_remap={remap}",
        f"train.epochs={opts.epochs}",
        f"train.steps_per_epoch={opts.steps}",
        f"train.model.base_filters={opts.base_filters}",
        f"train.device={opts.device}",
        f"inference.device={opts.device}",
        f"train.val_every={max(1, opts.epochs)}",
        f"tracking.enabled={'true' if opts.track else 'false'}",
        f"preprocess.target_spacing_mm={list(spacing) if spacing else 'null'}",
    ]
    return out + spec["overrides"] + list(opts.overrides)


def run_fold(
    dataset: str, k: int, split: dict[str, list[str]], manifest: Path, opts: argparse.Namespace, work: Path
) -> dict:
    from pipeline.config import dump_config, load_config

    fold_dir = work / dataset / f"fold{k}"
    (fold_dir / "configs").mkdir(parents=True, exist_ok=True)
    cfg = load_config(REPO / "configs" / "params.yaml", fold_overrides(dataset, manifest, opts))
    (fold_dir / "configs" / "params.yaml").write_text(dump_config(cfg))
    log_path = fold_dir / "pipeline.log"
    times = {"prepare-data": run_stage(["prepare-data", "-q"], fold_dir, log_path)}
    splits_path = fold_dir / cfg.paths.splits
    splits = json.loads(splits_path.read_text())
    if opts.val == "one":  # model selection and operating point on one training scan (not independent)
        split = {**split, "val": split["train"][:1]}
    splits.update(split)
    splits_path.write_text(json.dumps(splits, indent=2) + "\n")
    for stage in ("preprocess", "train", "evaluate"):
        times[stage] = run_stage([stage, "-q"], fold_dir, log_path)
    metrics = json.loads((fold_dir / cfg.paths.evaluation / "metrics.json").read_text())
    plan = json.loads((fold_dir / cfg.paths.preprocessed / "plan.json").read_text())
    lesion_name = DATASETS[dataset]["label_names"][DATASETS[dataset]["lesion_labels"][0]]
    sens = metrics.get("sensitivity_at_fp", {})
    return {
        "fold": k,
        "test": split["test"],
        "lesions": metrics.get("lesions_total"),
        "sens_1fp": sens.get("1"),
        "sens_8fp": sens.get("8"),
        "cpm": metrics.get("cpm"),
        "dice": (metrics.get("dice") or {}).get(lesion_name),
        "times_s": times,
        "patch_size": plan["patch_size"],
        "batch_size": plan["batch_size"],
        "target_spacing_mm": plan["target_spacing_mm"],
        "work": str(fold_dir),
    }


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def markdown(
    dataset: str,
    rows: list[dict],
    opts: argparse.Namespace,
    command: str,
    wall_s: float,
    load: tuple[float, float],
) -> str:
    spec = DATASETS[dataset]
    lesion_name = spec["label_names"][spec["lesion_labels"][0]]
    lines = [
        f"<!-- section:{dataset} -->",
        f"### {'MS longitudinal FLAIR (lesion changes)' if dataset == 'ms' else 'BraTS 2015 (enhancing tumour)'}",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        (
            f"Machine: {machine()}; device `{opts.device}`; shared with other jobs (load average "
            f"{load[0]:.1f} at the start, {load[1]:.1f} at the end). Wall time {wall_s / 60:.1f} min for "
            f"{len(rows)} fold(s)."
        ),
        "",
        f"Settings: {opts.epochs} epochs x {opts.steps} steps, U-Net base filters {opts.base_filters}, "
        f"patch {rows[0]['patch_size'] if rows else '?'} x batch {rows[0]['batch_size'] if rows else '?'}, "
        f"target spacing {[round(s, 3) for s in rows[0]['target_spacing_mm']] if rows else '?'} mm, "
        f"validation scans: {opts.val}, lesion class `{lesion_name}`"
        + (f", channels {[n for _, n in channels(dataset, opts.ms_channels)]}" if dataset == "ms" else "")
        + (f", overrides {spec['overrides'] + opts.overrides}" if spec["overrides"] + opts.overrides else "")
        + ".",
        "",
        (
            "| fold | test scan(s) | GT lesions | sens @ 1 FP/scan | sens @ 8 FP/scan | CPM | Dice | "
            "train s | fold total s |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['fold']} | {', '.join(r['test'])} | {r['lesions']} | {_fmt(r['sens_1fp'])} | "
            f"{_fmt(r['sens_8fp'])} | {_fmt(r['cpm'])} | {_fmt(r['dice'])} | "
            f"{r['times_s']['train']:.0f} | {sum(r['times_s'].values()):.0f} |"
        )
    if len(rows) > 1:
        lines.append(
            f"| **mean** | | {_fmt(_mean(rows, 'lesions'), 1)} | {_fmt(_mean(rows, 'sens_1fp'))} | "
            f"{_fmt(_mean(rows, 'sens_8fp'))} | {_fmt(_mean(rows, 'cpm'))} | {_fmt(_mean(rows, 'dice'))} "
            "| | |"
        )
    lines += ["", f"<!-- /section:{dataset} -->"]
    return "\n".join(lines)


HEADER = """## Real-data benchmark (issue 8)

Produced by `benchmarks/bench_real_data.py` (see its docstring); each section is replaced when that data set
is rerun. All folds, with the issue's budget of about 20 min of CPU per fold (about 4,000 steps at the
0.21 s/step (MS) and 0.15 s/step (BraTS, 2 mm) measured here on an idle 2-core machine):

```
.venv/bin/python benchmarks/bench_real_data.py --dataset ms --folds all --epochs 100 --steps 40
.venv/bin/python benchmarks/bench_real_data.py --dataset brats --folds all --epochs 100 --steps 40
```

Caveats: tiny training sets (3 MS patients, 4 BraTS cases per fold), a CPU budget of minutes per fold (a
model trained this briefly is far from converged), one or two test scans per fold (a fold's FROC rests on a
handful of lesions; no confidence interval is meaningful), no validation scans (the last epoch's model is
evaluated, with no operating point), and MS labels that mark lesion *changes* between visits, not all
lesions.
"""


def write_section(path: Path, dataset: str, section: str) -> None:
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"<!-- section:{dataset} -->.*?<!-- /section:{dataset} -->", re.DOTALL)
    text = (
        pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    )
    path.write_text(text.rstrip("\n") + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--folds", default="all", help="'all' or comma-separated fold indices, e.g. 0 or 0,2")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--steps", type=int, default=25, help="training steps per epoch")
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument(
        "--val",
        default="none",
        choices=["none", "one"],
        help="validation scans: none (last model), or the first training scan (not independent)",
    )
    p.add_argument("--ms-channels", default="both", choices=["both", "study2"])
    p.add_argument("--target-spacing", type=float, nargs=3, default=None, help="mm; default per data set")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary folder)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="only print the table")
    p.add_argument("--track", action="store_true", help="log to MLflow (SQLite store in each fold folder)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every fold (repeatable)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    command = ".venv/bin/python benchmarks/bench_real_data.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    spec = DATASETS[opts.dataset]
    base = opts.data_root / spec["folder"]
    if not base.is_dir():
        print(f"data set not found: {base}", file=sys.stderr)
        return 2
    work = opts.work or Path(tempfile.mkdtemp(prefix="bench_real_data_"))
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    manifest = make_manifest(
        opts.data_root,
        opts.dataset,
        opts.ms_channels,
        work / opts.dataset / "manifest" / "dataset.json",
        work / f"{opts.dataset}.log",
    )
    case_ids = [entry["case_id"] for entry in json.loads(manifest.read_text())["training"]]
    folds = fold_splits(case_ids, spec["hold_out"])
    chosen = range(len(folds)) if opts.folds == "all" else [int(k) for k in opts.folds.split(",")]
    rows = []
    for k in chosen:
        print(f"fold {k}: train {folds[k]['train']}, test {folds[k]['test']} ...", flush=True)
        row = run_fold(opts.dataset, k, folds[k], manifest, opts, work)
        rows.append(row)
        print(
            f"fold {k}: CPM {_fmt(row['cpm'])}, sens@1 {_fmt(row['sens_1fp'])}, sens@8 {_fmt(row['sens_8fp'])}, "
            f"Dice {_fmt(row['dice'])}, {row['lesions']} lesions, times {row['times_s']}",
            flush=True,
        )
    section = markdown(
        opts.dataset, rows, opts, command, time.perf_counter() - t0, (load0, os.getloadavg()[0])
    )
    print(section)
    (work / f"{opts.dataset}_results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if not opts.no_write:
        write_section(opts.output, opts.dataset, section)
        print(f"wrote {opts.output}; fold outputs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
