"""Benchmark the training step: ours (``PatchBatches`` + ``pipeline.training.loop.train``) against a plain
MONAI tutorial-style loop on the same data, network, patch size, batch size, augmentations and steps.

Data: ``--cases`` synthetic CT-like scans (``generate_case``) normalised like the preprocess stage, written
in the preprocessed layout into a temporary folder (not timed).

* ours: ``train()`` with validation off; lesion-aware ``PatchBatches`` (1/3 lesion patches) in
  ``--workers`` DataLoader worker(s), our focal + Dice loss, AdamW, gradient clipping, LR schedule.
* MONAI: ``CacheDataset`` -> ``RandCropByPosNegLabeld`` (pos 1 : neg 2, i.e. 1/3 lesion-centred) -> the
  same augmentation chain (``build_augmentation``) -> ``monai.data.DataLoader`` (shuffle, same workers)
  -> the same network (``build_model``) -> ``monai.losses.DiceFocalLoss`` -> AdamW; the tutorial's
  ``zero_grad / forward / loss / backward / step``. MetaTensor tracking is on, as in the tutorials
  (``--monai-track-meta off`` turns it off).

Throughput: both sides live in one process and run their epochs in alternation (ours, MONAI, ours, ...),
so that both see the same share of whatever else the machine is doing; each epoch is ``--cases / --batch``
steps (one pass over the scans for MONAI) with a fresh DataLoader iterator (workers start per epoch on both
sides). Ours runs each epoch as ``train(..., resume=True)`` with one more epoch, the real code path (model
rebuild and checkpoint I/O happen outside the timed epoch). The first epoch of each side is warm-up and not
counted. Reported: patches/s and voxels/s over the timed epochs, the median per-epoch ratio, the data-wait
fraction (time waiting for the next batch / (wait + compute)).

Peak memory: each side once more in its own child process (1 epoch): peak RSS (VmHWM) of the main process
and of its loader worker (whose RSS includes the pages it shares with the main process).

Usage::

    .venv/bin/python benchmarks/bench_training.py                      # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_training.py --markdown /tmp/results_training.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SPACING_MM = (1.0, 1.0, 2.0)
LESION = 2


# ----------------------------------------------------------------------------------------------- data


def write_data(
    root: Path, n_cases: int, shape: tuple[int, int, int], patch: tuple[int, int, int], batch: int
) -> None:
    """Synthetic scans in the preprocessed layout (``plan.json``, ``cases/<id>_{image,label}.npy``)."""
    from pipeline.config import SyntheticConfig
    from pipeline.contracts import Plan
    from pipeline.data.synthetic import generate_case
    from pipeline.preprocessing.transform import grid_record

    syn = SyntheticConfig(
        shape=shape, spacing_mm=SPACING_MM, n_cases=n_cases, lesion_free_fraction=0.0, oblique_fraction=0.0
    )
    cases = root / "cases"
    cases.mkdir(parents=True)
    ids = []
    for i in range(n_cases):
        image, label, _ = generate_case(syn, i)
        cid = f"case_{i:03d}"
        np.save(cases / f"{cid}_image.npy", (image.data.astype(np.float32) - 50.0) / 100.0)
        np.save(cases / f"{cid}_label.npy", np.ascontiguousarray(label.data[0]))
        (cases / f"{cid}.json").write_text(grid_record(image.shape, SPACING_MM, 3, case_id=cid).to_json())
        ids.append(cid)
    # the plan the preprocess stage makes for such data: 5 levels, no downsampling of z at the first level
    plan = Plan.from_dict({
        "version": 2, "orientation": "RAS", "channel_names": ["CT"],
        "labels": {"0": "background", "1": "organ", "2": "lesion"}, "n_classes": 3, "lesion_labels": [LESION],
        "target_spacing_mm": list(SPACING_MM), "anisotropic": False, "median_shape": list(shape),
        "patch_size": list(patch), "patch_size_requested": None, "batch_size": batch,
        "budget": {"kind": "cpu", "requested": "cpu", "voxels": float(np.prod(patch) * batch),
                   "patch_voxels_x_batch": int(np.prod(patch) * batch)},
        "network": {
            "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
            "kernel_sizes": [[3, 3, 1]] + [[3, 3, 3]] * 4,
            "filters": [8, 16, 32, 64, 128],  # the CPU plan's width (pipeline/preprocessing/plan.py)
        },
        "intensity": [{"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 50.0, "std": 100.0}],
        "resampling": {"image_order": 3, "image_order_z": 1, "anisotropy_ratio": 3.0,
                       "label": "one-hot linear + argmax", "crop_to_nonzero": True},
        "n_fingerprint_cases": n_cases,
    }, "bench_training")
    (root / "plan.json").write_text(plan.to_json())
    (root / "ids.json").write_text(json.dumps(ids))


def config(root: Path, args: argparse.Namespace, epochs: int | None = None):
    from pipeline.config import config_from_dict

    return config_from_dict(
        {
            "seed": 0,
            "paths": {"preprocessed": str(root), "models": str(root / "models")},
            "train": {
                "epochs": epochs or args.epochs,
                "steps_per_epoch": args.cases // args.batch,
                "num_workers": args.workers,
                "device": "cpu",
                "val_every": 10**6,
                "optim": {"warmup_epochs": 0},
            },
            "tracking": {"enabled": False},
        }
    )


# ----------------------------------------------------------------------------------------------- sides


def ours_epochs(root: Path, args: argparse.Namespace):
    """Generator: each ``next()`` trains one more epoch via ``train(resume=True)``; yields its history row."""
    from pipeline.preprocessing.plan import load_plan
    from pipeline.training.data import load_preprocessed
    from pipeline.training.loop import train

    plan = load_plan(root / "plan.json")
    cases = load_preprocessed(root, json.loads((root / "ids.json").read_text()))
    out = root / f"models_{os.getpid()}"
    for epoch in range(args.epochs):
        cfg = config(root, args, epochs=epoch + 1)
        result = train(cfg, plan, cases, [], out, resume=epoch > 0, progress=False)
        row = result.history[-1]
        yield {
            "steps": cfg.train.steps_per_epoch,
            "seconds": row["epoch_time_s"],
            "wait": row["data_wait_fraction"],
            "loss": row["loss"],
        }


def monai_epochs(root: Path, args: argparse.Namespace):
    """A generator: each ``next()`` runs one epoch of the MONAI tutorial loop."""
    import torch
    from monai import transforms as T
    from monai.data import CacheDataset, DataLoader, set_track_meta
    from monai.losses import DiceFocalLoss

    from pipeline.model.factory import build_model
    from pipeline.preprocessing.plan import load_plan
    from pipeline.training.data import build_augmentation, load_preprocessed

    cfg = config(root, args)
    plan = load_plan(root / "plan.json")
    torch.manual_seed(cfg.seed)
    cases = load_preprocessed(root, json.loads((root / "ids.json").read_text()))
    items = [{"image": c.image, "label": c.label[None]} for c in cases]
    patch = plan.patch_size
    aug = build_augmentation(cfg.train.augment, anisotropic_axis=None)
    transform = T.Compose(
        [
            T.EnsureTyped(keys=["image", "label"]),
            T.RandCropByPosNegLabeld(
                keys=["image", "label"], label_key="label", spatial_size=patch, pos=1, neg=2, num_samples=1
            ),
            *aug.transforms,
            T.EnsureTyped(keys=["label"], dtype=torch.int64),
        ]
    )
    transform.set_random_state(seed=cfg.seed)
    set_track_meta(args.monai_track_meta == "on")
    ds = CacheDataset(items, transform=transform, cache_rate=1.0, num_workers=0, progress=False)
    loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers)
    model = build_model(cfg.train.model, plan.network, 1, plan.n_classes)
    loss_function = DiceFocalLoss(to_onehot_y=True, softmax=True, include_background=False, gamma=2.0)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.optim.lr, weight_decay=cfg.train.optim.weight_decay
    )
    for _ in range(args.epochs):
        set_track_meta(args.monai_track_meta == "on")  # ours sets it off in its own (worker) process only
        model.train()
        wait = compute = 0.0
        n = 0
        t_epoch = t_ready = time.perf_counter()
        for batch_data in loader:
            t_got = time.perf_counter()
            wait += t_got - t_ready
            inputs, labels = batch_data["image"], batch_data["label"]
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = loss_function(outputs, labels)
            loss.backward()
            optimizer.step()
            n += 1
            t_ready = time.perf_counter()
            compute += t_ready - t_got
        yield {
            "steps": n,
            "seconds": time.perf_counter() - t_epoch,
            "wait": wait / (wait + compute),
            "loss": loss.item(),
        }


def interleaved(root: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    sides = {"ours": ours_epochs(root, args), "monai": monai_epochs(root, args)}
    epochs: dict[str, list[dict]] = {"ours": [], "monai": []}
    for epoch in range(args.epochs):
        for name in ("ours", "monai") if epoch % 2 == 0 else ("monai", "ours"):
            row = next(sides[name])
            epochs[name].append(row)
            print(
                f"epoch {epoch + 1} {name:5s}: {row['steps'] * args.batch / row['seconds']:.2f} patches/s, "
                f"data wait {row['wait']:.3f}, loss {row['loss']:.3f}",
                flush=True,
            )
    return epochs


def vm_hwm_mb() -> float:
    """Peak RSS of this process since its ``exec`` (``VmHWM``). ``getrusage(RUSAGE_SELF).ru_maxrss`` would
    not do: Linux carries it over from the forking parent, i.e. the benchmark driver."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def child(args: argparse.Namespace) -> None:
    """One side alone in this process (for its peak RSS)."""
    for _ in (ours_epochs if args.side == "ours" else monai_epochs)(Path(args.data), args):
        pass
    # a loader worker is forked: its RSS counts the pages it shares with this process
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    Path(args.json).write_text(json.dumps({"peak_rss_mb": vm_hwm_mb(), "workers_peak_rss_mb": workers}))


# ----------------------------------------------------------------------------------------------- main


def summarise(rows: list[dict], batch: int) -> dict:
    timed = rows[1:]  # the first epoch is warm-up
    patches = sum(r["steps"] for r in timed) * batch
    seconds = sum(r["seconds"] for r in timed)
    return {
        "pps": patches / seconds,
        "per_epoch": [r["steps"] * batch / r["seconds"] for r in timed],
        "wait": sum(r["wait"] * r["seconds"] for r in timed) / seconds,
        "first_s": rows[0]["seconds"],
    }


def markdown(
    args: argparse.Namespace,
    epochs: dict[str, list[dict]],
    memory: dict[str, dict],
    command: str,
    wall: float,
    load: tuple[float, float],
) -> str:
    import monai
    import torch

    voxels = int(np.prod(args.patch))
    ours, mon = summarise(epochs["ours"], args.batch), summarise(epochs["monai"], args.batch)
    paired = statistics.median(a / b for a, b in zip(ours["per_epoch"], mon["per_epoch"], strict=True))
    steps = args.cases // args.batch
    mem = {k: f"{v['peak_rss_mb']:.0f} MB / {v['workers_peak_rss_mb']:.0f} MB" for k, v in memory.items()}
    shape, patch = " x ".join(map(str, args.shape)), " x ".join(map(str, args.patch))
    per_epoch = {
        k: ", ".join(f"{v:.2f}" for v in d["per_epoch"]) for k, d in (("ours", ours), ("monai", mon))
    }
    lines = [
        "## Training step (`benchmarks/bench_training.py`)",
        "",
        f"Machine: the shared development VM, {os.cpu_count()} CPU cores ({platform.machine()}), CPU only, "
        f"shared with other work (load average {load[0]:.1f} at the start, {load[1]:.1f} at the end); "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), MONAI {monai.__version__}, "
        f"Python {platform.python_version()}.",
        f"Data: {args.cases} synthetic CT-like scans of {shape} voxels in memory; patch {patch} "
        f"({voxels:,} voxels), batch {args.batch}, {args.workers} loader worker(s); the default network "
        "(MONAI UNet, 16-256 filters, 5 levels, 1 residual unit, instance norm) and augmentations; AdamW. "
        f"{args.epochs} epochs of {steps} steps per side, alternating ours / MONAI epoch by epoch in one "
        "process; the first epoch of each not counted.",
        "",
        "| | ours (`PatchBatches` + `train()`) | MONAI tutorial loop |",
        "| --- | --- | --- |",
        f"| patches/s | **{ours['pps']:.2f}** | **{mon['pps']:.2f}** |",
        f"| voxels/s | {ours['pps'] * voxels / 1e6:.2f} M | {mon['pps'] * voxels / 1e6:.2f} M |",
        f"| patches/s per timed epoch | {per_epoch['ours']} | {per_epoch['monai']} |",
        f"| data-wait fraction | {ours['wait']:.3f} | {mon['wait']:.3f} |",
        f"| first (warm-up) epoch | {ours['first_s']:.1f} s | {mon['first_s']:.1f} s |",
        f"| peak RSS, main process / loader worker (each side alone; the worker's includes pages shared "
        f"with the main process) | {mem['ours']} | {mem['monai']} |",
        f"| **ratio ours / MONAI, patches/s** (median of per-epoch ratios) "
        f"| **{ours['pps'] / mon['pps']:.2f}x** ({paired:.2f}x) | |",
        "",
        "Same network (`build_model`), patch, batch, augmentation chain (`build_augmentation`), optimiser, "
        "workers and number of steps on the same arrays. Differences by design: ours samples lesion-first "
        "(1/3 of the patches; MONAI's `RandCropByPosNegLabeld` pos 1 : neg 2 picks lesion *voxels*), uses "
        "our softmax focal + batch Dice loss (MONAI: `DiceFocalLoss`, whose focal term is sigmoid), clips "
        "gradients and sets the LR per step. MONAI MetaTensor tracking: "
        f"{args.monai_track_meta} (as in the tutorials).",
        "",
        f"Command (wall time {wall / 60:.1f} min):",
        "",
        f"    {command}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=24, help="scans; also 2 x steps per epoch (default 24)")
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 48])
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 64, 32])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--monai-track-meta", choices=["on", "off"], default="on")
    ap.add_argument("--markdown", help="write the results section to this file")
    ap.add_argument("--side", choices=["ours", "monai"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        child(args)
        return 0

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        root = Path(tmp) / "pre"
        write_data(root, args.cases, tuple(args.shape), tuple(args.patch), args.batch)
        epochs = interleaved(root, args)
        memory = {}
        for side in ("ours", "monai"):
            out = Path(tmp) / f"{side}.json"
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--side",
                    side,
                    "--data",
                    str(root),
                    "--json",
                    str(out),
                    f"--cases={args.cases}",
                    f"--batch={args.batch}",
                    "--epochs=1",
                    f"--workers={args.workers}",
                    f"--monai-track-meta={args.monai_track_meta}",
                    "--patch",
                    *map(str, args.patch),
                    "--shape",
                    *map(str, args.shape),
                ],
                check=True,
            )
            memory[side] = json.loads(out.read_text())
    wall = time.perf_counter() - t0
    command = ".venv/bin/python benchmarks/bench_training.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = markdown(args, epochs, memory, command.strip(), wall, (load_start, os.getloadavg()[0]))
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
