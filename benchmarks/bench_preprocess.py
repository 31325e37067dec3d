"""Preprocessing throughput: our per-case transform vs MONAI's equivalent transform chain, side by side.

Both read the same NIfTI files (image + label) from a temporary folder, in the same run, each in its own
fresh child process (so peak memory is measured per pipeline), after one untimed warm-up case and with the
page cache already warm:

* **ours**: ``read_case_image`` + ``read_case_label`` + ``preprocess_case``
  (RAS reorientation, crop to nonzero, CT clip + z-score, cubic B-spline image resampling with the separate
  low-resolution axis, one-hot linear + argmax label resampling), one process, scipy single-threaded.
* **monai**: ``LoadImaged -> EnsureChannelFirstd -> Orientationd("RAS") -> Spacingd(bilinear / nearest)
  -> ScaleIntensityRanged(clip, the same linear map as our clip + z-score) -> CropForegroundd`` with MONAI's
  defaults otherwise (torch uses all cores; Spacingd computes in float64 by default).

Both resample to the same target spacing (our plan's). Reported: cases/s, MB/s (uncompressed image + label
voxel bytes read per second), peak RSS of the child process and its RSS after imports. The full stage
(``run_preprocess``: fingerprint + plan + every case written atomically, 2 worker processes) is timed too.

Data: ``default`` = the synthetic data set of the default config (128 x 128 x 40 at 0.8 x 0.8 x 2.5 mm, 30%
oblique); ``ct`` = CT-sized synthetic scans, 512 x 512 x 300 at 0.7 x 0.7 x 1.5 mm resampled to 1.5 mm
isotropic.

Usage::

    .venv/bin/python benchmarks/bench_preprocess.py                  # both data sets (~3-5 min, 2 cores)
    .venv/bin/python benchmarks/bench_preprocess.py --data default --n-default 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _rss_mb() -> float:
    """Current resident memory of this process (MB)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (MB): ``VmHWM`` (``ru_maxrss`` inherits the parent's peak)."""
    from pipeline.preprocessing.parallel import peak_rss_mb

    return float(peak_rss_mb() or 0.0)


def _input_mb(cases) -> float:
    """Uncompressed voxel bytes of the images and labels, from the NIfTI headers (MB)."""
    import nibabel as nib
    import numpy as np

    total = 0
    for case in cases:
        for path in (*case.images, case.label):
            header = nib.load(str(path)).header
            total += int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    return total / 2**20


# -------------------------------------------------------------------------------------------- children


def _child_ours(root: str, plan_path: str) -> dict:
    from pipeline.config import PreprocessConfig
    from pipeline.io.dataset import load_msd, read_case_image, read_case_label
    from pipeline.preprocessing.plan import load_plan
    from pipeline.preprocessing.transform import preprocess_case

    plan = load_plan(plan_path)
    cfg = PreprocessConfig()
    cases = load_msd(root).training

    def one(case):
        image, label = read_case_image(case), read_case_label(case)
        img, _, _ = preprocess_case(image, label, plan, cfg)
        return img.data.shape

    return _timed(cases, one)


def _child_monai(root: str, plan_path: str, dtype: str = "default") -> dict:
    import numpy as np
    import torch
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    from pipeline.io.dataset import load_msd

    plan = json.loads(Path(plan_path).read_text())
    ct = plan["intensity"][0]
    lo, hi = ct["clip"]
    b_min, b_max = (lo - ct["mean"]) / ct["std"], (hi - ct["mean"]) / ct["std"]  # = clip + z-score
    keys = ["image", "label"]
    chain = Compose(
        [
            LoadImaged(keys=keys),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS"),
            Spacingd(
                keys=keys,
                pixdim=plan["target_spacing_mm"],
                mode=("bilinear", "nearest"),
                **({"dtype": np.float32} if dtype == "float32" else {}),
            ),
            ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=b_min, b_max=b_max, clip=True),
            CropForegroundd(keys=keys, source_key="image", select_fn=lambda x: x > b_min),
        ]
    )
    cases = load_msd(root).training

    def one(case):
        out = chain({"image": str(case.images[0]), "label": str(case.label)})
        return tuple(out["image"].shape)

    result = _timed(cases, one)
    result["torch_threads"] = torch.get_num_threads()
    return result


def _timed(cases, one) -> dict:
    rss_after_imports = _rss_mb()
    one(cases[0])  # warm-up (lazy imports, caches), not timed
    seconds, shapes = [], []
    for case in cases:
        start = time.perf_counter()
        shapes.append(list(one(case)))
        seconds.append(time.perf_counter() - start)
    total = sum(seconds)
    return {
        "n_cases": len(cases),
        "seconds": total,
        "cases_per_s": len(cases) / total,
        "mb_per_s": _input_mb(cases) / total,
        "s_per_case": total / len(cases),
        "rss_after_imports_mb": rss_after_imports,
        "peak_rss_mb": _peak_rss_mb(),
        "out_shape": shapes[0],
    }


def _child_stage(root: str, out: str, workers: int) -> dict:
    from pipeline.config import config_from_dict
    from pipeline.io.dataset import load_msd
    from pipeline.stages.preprocess import run_preprocess

    ds = load_msd(root)
    ids = [c.case_id for c in ds.training]
    n_test = max(1, len(ids) // 5)
    splits = {
        "train": ids[: len(ids) - n_test - 1],
        "val": ids[len(ids) - n_test - 1 : len(ids) - n_test],
        "test": ids[len(ids) - n_test :],
    }
    if len(ids) < 3:  # tiny run: every case is a training case
        splits = {"train": ids, "val": [], "test": []}
    start = time.perf_counter()
    summary = run_preprocess(config_from_dict({}), ds, splits, Path(out), workers=workers)
    seconds = time.perf_counter() - start
    return {
        "n_cases": summary["n_cases"],
        "seconds": seconds,
        "cases_per_s": summary["n_cases"] / seconds,
        "workers": workers,
        "peak_rss_mb_main": _peak_rss_mb(),
        "peak_rss_mb_workers": summary["max_case_peak_rss_mb"],
    }


def _run_child(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- driver


def _make_data(kind: str, folder: Path, n: int) -> Path:
    """``n`` synthetic scans (:mod:`pipeline.data.synthetic`) in the MSD layout under ``folder/kind``."""
    from pipeline.config import SyntheticConfig
    from pipeline.data.synthetic import LABELS, generate_case
    from pipeline.io.formats import write_volume

    if kind == "default":
        cfg = SyntheticConfig()
    else:
        cfg = SyntheticConfig(shape=(512, 512, 300), spacing_mm=(0.7, 0.7, 1.5), oblique_fraction=0.0)
    root = folder / kind
    training = []
    for i in range(n):
        image, label, _ = generate_case(cfg, i)
        write_volume(root / "imagesTr" / f"{kind}_{i:03d}.nii.gz", image)
        write_volume(root / "labelsTr" / f"{kind}_{i:03d}.nii.gz", label)
        training.append(
            {"image": f"./imagesTr/{kind}_{i:03d}.nii.gz", "label": f"./labelsTr/{kind}_{i:03d}.nii.gz"}
        )
    meta = {
        "name": kind,
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def _plan(root: Path, out: Path, target: list[float] | None) -> Path:
    """Fingerprint + plan (the data-set step before per-case work); returns the plan file."""
    from pipeline.config import config_from_dict
    from pipeline.io.dataset import load_msd
    from pipeline.preprocessing.fingerprint import compute_fingerprint
    from pipeline.preprocessing.plan import make_plan

    cfg = config_from_dict({"preprocess": {"target_spacing_mm": target}} if target else {})
    ds = load_msd(root)
    fp = compute_fingerprint(ds, [c.case_id for c in ds.training], cfg.data, workers=2)
    plan_path = out / f"plan_{root.name}.json"
    plan_path.write_text(make_plan(fp, ds, cfg).to_json())
    return plan_path


def _warm_cache(root: Path) -> None:
    for path in sorted(root.rglob("*.nii.gz")):
        path.read_bytes()


def bench(kind: str, n: int, work: Path) -> dict:
    t = time.perf_counter()
    root = _make_data(kind, work, n)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    plan = _plan(root, work, [1.5, 1.5, 1.5] if kind == "ct" else None)
    plan_s = time.perf_counter() - t
    _warm_cache(root)
    ours = _run_child("ours", str(root), str(plan))
    monai = _run_child("monai", str(root), str(plan))
    monai32 = _run_child("monai", str(root), str(plan), "float32")
    stage = _run_child("stage", str(root), str(work / f"stage_{kind}"), "2")
    file_mb = sum(p.stat().st_size for p in root.rglob("*.nii.gz")) / 2**20
    return {
        "data": kind,
        "n_cases": ours["n_cases"],
        "generate_s": gen_s,
        "fingerprint_plan_s": plan_s,
        "files_mb": file_mb,
        "target_spacing_mm": json.loads(plan.read_text())["target_spacing_mm"],
        "ours": ours,
        "monai": monai,
        "monai_f32": monai32,
        "stage": stage,
        "ratio_cases_per_s": ours["cases_per_s"] / monai["cases_per_s"],
        "ratio_cases_per_s_f32": ours["cases_per_s"] / monai32["cases_per_s"],
    }


def _table(results: list[dict]) -> str:
    rows = [
        "| data | cases | pipeline | s/case | cases/s | MB/s | peak RSS MB (after imports) | out shape |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for name in ("ours", "monai", "monai_f32"):
            m = r[name]
            rows.append(
                f"| {r['data']} | {m['n_cases']} | {name} | {m['s_per_case']:.3f} | {m['cases_per_s']:.2f} | "
                f"{m['mb_per_s']:.1f} | {m['peak_rss_mb']:.0f} ({m['rss_after_imports_mb']:.0f}) | "
                f"{'x'.join(map(str, m['out_shape']))} |"
            )
        s = r["stage"]
        rows.append(
            f"| {r['data']} | {s['n_cases']} | ours, full stage ({s['workers']} workers, incl. fingerprint, "
            f"plan, atomic writes) | {s['seconds'] / s['n_cases']:.3f} | {s['cases_per_s']:.2f} | | "
            f"{s['peak_rss_mb_main']:.0f} main / {s['peak_rss_mb_workers']:.0f} per worker | |"
        )
    rows.append("")
    for r in results:
        rows.append(
            f"- **{r['data']}**: ours / MONAI throughput = **{r['ratio_cases_per_s']:.2f}x** "
            f"(MONAI defaults), **{r['ratio_cases_per_s_f32']:.2f}x** (MONAI with Spacingd dtype=float32); "
            f"target spacing {r['target_spacing_mm']} mm; MONAI torch threads {r['monai']['torch_threads']}; "
            f"data generation {r['generate_s']:.0f} s, fingerprint + plan {r['fingerprint_plan_s']:.1f} s "
            "(not in the per-case rates)"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["default", "ct", "both"], default="both")
    parser.add_argument(
        "--n-default", type=int, default=30, help="cases of the default synthetic data (>= 1)"
    )
    parser.add_argument("--n-ct", type=int, default=2, help="CT-sized cases (512 x 512 x 300)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        fn = {
            "ours": _child_ours,
            "monai": _child_monai,
            "stage": lambda r, o, w: _child_stage(r, o, int(w)),
        }[kind]
        print(json.dumps(fn(*rest)))
        return 0

    kinds = ["default", "ct"] if args.data == "both" else [args.data]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        for kind in kinds:
            results.append(bench(kind, args.n_default if kind == "default" else args.n_ct, Path(tmp)))
            print(f"{kind}: done", file=sys.stderr)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}"
    )
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
