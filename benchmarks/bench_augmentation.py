"""Benchmark training augmentation: augmented patches per second on one core, ours
(``pipeline.data.augment.augment_patch``) against nnU-Net v2's own training transforms, on the same arrays
and the same patch centres in the same run.

* ours: ``augment_patch`` with the default ``train.augment`` (nnU-Net's probabilities and ranges): the
  patch box from ``crop_box``, one spatial transform read straight from the scan when rotation / scaling is
  drawn (else a plain crop), per-channel intensity transforms, mirroring.
* nnU-Net v2: ``nnUNetTrainer.get_training_transforms`` imported from nnunetv2 (run in a separate venv,
  ``--ref-python``, default ``/work/venv-ref/bin/python``), composed as its trainer composes them for a 3D
  isotropic patch (rotation +-30 deg, mirror axes (0, 1, 2), no dummy 2D, no deep supervision targets,
  no regions / cascade / ignore label), applied as its ``nnUNetDataLoader.generate_train_batch`` applies
  them: a crop of the trainer's ``initial_patch_size`` (``get_patch_size(patch, rot, rot, rot, (0.85,
  1.25))``) around the same centre, bounded as its ``get_bbox`` bounds it, padded by ``crop_and_pad_nd``
  (image 0, segmentation -1), then the transforms, under ``threadpool_limits(1)``.

Data: ``--cases`` synthetic two-channel scans (smooth background, noise, spheres labelled 1 and 2), written
as ``.npy`` into a temporary folder (not timed); centres chosen once by our ``PatchSampler`` (1/3 lesion
centred) and shared by both sides. Each side runs in its own child process pinned to one core
(``sched_setaffinity``; ``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``); the sides alternate over
``--rounds`` rounds (ours, nnU-Net, ours, ...) so that both see the same share of whatever else the
machine does; each child discards ``--warmup`` patches first (and nnU-Net's blur picks its FFT-or-conv
choice for every kernel size before timing). Reported: patches/s per core over all timed patches, the
ratio ours / nnU-Net, and the per-round ratios.

Usage::

    .venv/bin/python benchmarks/bench_augmentation.py                      # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_augmentation.py --patch 128 128 128 --n 40 --rounds 3 \\
        --markdown /tmp/results_augmentation.md
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REF_PYTHON = "/work/venv-ref/bin/python"


# ----------------------------------------------------------------------------------------------- data


def write_data(root: Path, n_cases: int, shape: tuple[int, int, int], channels: int, seed: int) -> None:
    """``case_<i>_image.npy`` (C, X, Y, Z) float32 (about zero mean, unit std) and ``case_<i>_label.npy``
    (X, Y, Z) uint8 with a few spheres of labels 1 and 2."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    radius2 = grids[0] ** 2 + grids[1] ** 2 + grids[2] ** 2
    for i in range(n_cases):
        label = np.zeros(shape, np.uint8)
        for k in range(6):
            c = [int(rng.integers(n // 6, n - n // 6)) for n in shape]
            r = int(rng.integers(2, 8))
            sl = tuple(slice(max(0, cc - r), cc + r + 1) for cc in c)
            sub = np.meshgrid(*[np.arange(s.start, min(s.stop, n)) - cc for s, n, cc in zip(sl, shape, c)],
                              indexing="ij")
            label[sl][sub[0] ** 2 + sub[1] ** 2 + sub[2] ** 2 <= r * r] = 1 + k % 2
        image = np.empty((channels, *shape), np.float32)
        for ch in range(channels):
            image[ch] = (1 - radius2) * (1 + 0.2 * ch) + 0.3 * rng.standard_normal(shape, dtype=np.float32)
            image[ch][label > 0] += 1.5
        np.save(root / f"case_{i}_image.npy", image)
        np.save(root / f"case_{i}_label.npy", label)


def choose_centres(root: Path, n_cases: int, n: int, seed: int) -> list[tuple[int, list[int]]]:
    """``n`` (case, centre voxel) pairs from our lesion-aware sampler (1/3 lesion-centred)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.data.sampling import PatchSampler, index_lesions

    labels = [np.load(root / f"case_{i}_label.npy") for i in range(n_cases)]
    sampler = PatchSampler([lab.shape for lab in labels], [index_lesions(lab, [1, 2]) for lab in labels], 1 / 3)
    rng = np.random.default_rng(seed)
    out: list[tuple[int, list[int]]] = []
    while len(out) < n:
        out += [(case, list(centre)) for case, centre, _ in sampler.batch(rng, 3)]
    return out[:n]


# -------------------------------------------------------------------------------------------- workers


def pin_one_core(core: int) -> None:
    try:
        os.sched_setaffinity(0, {core})
    except (AttributeError, OSError):  # not Linux, or the core is not ours: one thread still
        pass


def worker_ours(data: Path, patch: tuple[int, int, int], centres, warmup: int, seed: int) -> list[float]:
    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.config import AugmentConfig
    from pipeline.data.augment import augment_patch

    torch.set_num_threads(1)
    cases = sorted({c for c, _ in centres})
    images = {c: np.load(data / f"case_{c}_image.npy") for c in cases}
    labels = {c: np.load(data / f"case_{c}_label.npy") for c in cases}
    cfg = AugmentConfig()
    times = []
    for i, (case, centre) in enumerate(centres[:warmup] + centres):
        rng = np.random.default_rng([seed, i])
        start = time.perf_counter()
        img, lab = augment_patch(images[case], labels[case], centre, patch, rng, cfg, None)
        img, lab = img.contiguous(), lab.contiguous()  # both sides hand over contiguous tensors
        times.append(time.perf_counter() - start)
    return times[warmup:]


def worker_nnunet(data: Path, patch: tuple[int, int, int], centres, warmup: int, seed: int) -> list[float]:
    import torch
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size for an isotropic 3D patch
    rotation = (-30.0 / 360 * 2.0 * np.pi, 30.0 / 360 * 2.0 * np.pi)
    initial = np.asarray(get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25)))
    transforms = nnUNetTrainer.get_training_transforms(
        patch, rotation, None, (0, 1, 2), False, use_mask_for_norm=None, is_cascaded=False,
        foreground_labels=[1, 2], regions=None, ignore_label=None)
    # let the blur pick FFT or direct convolution for each kernel size before timing (it does so once)
    blur = [t.transform for t in transforms.transforms if isinstance(getattr(t, "transform", None),
                                                                      GaussianBlurTransform)]
    for sigma in np.linspace(0.5, 1.0, 11):
        for d in range(3):
            blur[0]._benchmark_wrapper(torch.zeros((1, *patch)), float(sigma), d)
    cases = sorted({c for c, _ in centres})
    images = {c: np.load(data / f"case_{c}_image.npy") for c in cases}
    labels = {c: np.load(data / f"case_{c}_label.npy")[None] for c in cases}
    need_to_pad = initial - np.asarray(patch)
    times = []
    with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
        for case, centre in centres[:warmup] + centres:
            start = time.perf_counter()
            shape = images[case].shape[1:]
            # nnUNetDataLoader.get_bbox for a chosen voxel: initial patch around it, within the pad limits
            lbs = [-(int(need_to_pad[d]) // 2) for d in range(3)]
            ubs = [shape[d] + int(need_to_pad[d]) // 2 + int(need_to_pad[d]) % 2 - int(initial[d]) for d in range(3)]
            lo = [min(max(lbs[d], centre[d] - int(initial[d]) // 2), ubs[d]) for d in range(3)]
            bbox = [[lo[d], lo[d] + int(initial[d])] for d in range(3)]
            data_cropped = torch.from_numpy(crop_and_pad_nd(images[case], bbox, 0)).float()
            seg_cropped = torch.from_numpy(crop_and_pad_nd(labels[case], bbox, -1, cast_cropped_to=np.int16)).to(
                torch.int16)
            out = transforms(**{"image": data_cropped, "segmentation": seg_cropped})
            out["image"].contiguous(), out["segmentation"].contiguous()
            times.append(time.perf_counter() - start)
    return times[warmup:]


def run_child(python: str, side: str, args, data: Path, core: int, seed: int) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", side, "--data", str(data), "--core", str(core),
           "--seed", str(seed), "--warmup", str(args.warmup), "--patch", *map(str, args.patch)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    load = os.getloadavg()[0]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_before"] = load
    return result


# -------------------------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [
        f"Patch {'x'.join(map(str, a['patch']))}, {a['channels']} channels, scans "
        f"{'x'.join(map(str, a['shape']))} ({a['cases']} cases), {a['n']} patches x {a['rounds']} rounds per side "
        f"(+{a['warmup']} warm-up each), one core per side, {res['machine']}; load average "
        f"{res['load_min']:.2f}-{res['load_max']:.2f} before the children.",
        "",
        "| | patches/s per core | s per patch (median) | s per patch (p90) |",
        "|---|---:|---:|---:|",
    ]
    for side, name in (("ours", "ours (`augment_patch`)"), ("nnunet", "nnU-Net v2 (`get_training_transforms`)")):
        t = np.asarray(res[side])
        lines.append(f"| {name} | {len(t) / t.sum():.2f} | {np.median(t):.3f} | {np.quantile(t, 0.9):.3f} |")
    lines += ["", f"Ratio ours / nnU-Net: **{res['ratio']:.2f}** (per round: "
              + ", ".join(f"{r:.2f}" for r in res["round_ratios"]) + ")."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    ap.add_argument("--shape", type=int, nargs=3, default=[192, 224, 160])
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--n", type=int, default=40, help="timed patches per side and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--core", type=int, default=0, help="the core each child is pinned to")
    ap.add_argument("--ref-python", default=DEFAULT_REF_PYTHON, help="python of a venv with nnunetv2")
    ap.add_argument("--markdown", type=Path, help="write the results table here")
    ap.add_argument("--worker", choices=["ours", "nnunet"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    patch = tuple(args.patch)

    if args.worker:
        pin_one_core(args.core)
        centres = json.loads((args.data / "centres.json").read_text())
        fn = worker_ours if args.worker == "ours" else worker_nnunet
        print(json.dumps({"times": fn(args.data, patch, centres, args.warmup, args.seed)}))
        return

    if not Path(args.ref_python).exists():
        sys.exit(f"{args.ref_python}: no python with nnunetv2; create it (see benchmarks/RESULTS.md) or pass "
                 "--ref-python")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_data(data, args.cases, tuple(args.shape), args.channels, args.seed)
        (data / "centres.json").write_text(json.dumps(choose_centres(data, args.cases, args.n, args.seed)))
        res: dict = {"ours": [], "nnunet": [], "round_ratios": [], "loads": []}
        for r in range(args.rounds):
            per = {}
            for side, python in (("ours", sys.executable), ("nnunet", args.ref_python)):
                out = run_child(python, side, args, data, args.core, args.seed + r)
                res[side] += out["times"]
                res["loads"].append(out["load_before"])
                per[side] = len(out["times"]) / sum(out["times"])
                print(f"round {r} {side}: {per[side]:.2f} patches/s", flush=True)
            res["round_ratios"].append(per["ours"] / per["nnunet"])
    res["ratio"] = (len(res["ours"]) / sum(res["ours"])) / (len(res["nnunet"]) / sum(res["nnunet"]))
    res["load_min"], res["load_max"] = min(res["loads"]), max(res["loads"])
    res["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    res["args"] = {k: v for k, v in vars(args).items() if k not in ("markdown", "worker", "data")}
    text = markdown(res)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
