"""Benchmark ``train.cache``: training patches from preprocessed arrays held in memory vs memory-mapped, on a
data set larger than the configured cache limit.

Data: ``--cases`` synthetic scans of ``--shape`` voxels (float32 image with 1 channel, uint8 label with a few
lesion spheres), written in the preprocess stage's layout (``cases/<id>_image.npy``, ``<id>_label.npy``,
``<id>.json``) into ``--work`` once and reused (not timed). The defaults make 1.5 GB of arrays against a
cache limit of ``--limit-gb 0.5``: ``train.cache: auto`` is checked to choose memory-mapping for it.

Each configuration (cache ``memory`` / ``mmap`` x loader workers 0 / 1) runs in a fresh child process,
after the data files were dropped from the page cache (``posix_fadvise(DONTNEED)``: cold start, as for a
data set that does not fit in RAM), and once more with workers 0 right after (warm: the page cache holds
what the cold runs read):

* ``load_s``: ``load_preprocessed`` (memory: reads every array; mmap: maps the files, reads nothing) plus
  ``PatchBatches`` (which labels the lesions of every label array once, in both modes);
* ``patches/s``: batches through the real loader (``make_loader``, default augmentation, lesion-aware
  sampling) after ``--warmup`` batches, nothing else running (no network: the loader alone);
* memory: peak ``VmHWM`` of the main process and of its loader worker (RSS counts the shared pages in each
  process), and the peak over time of the summed PSS of main + worker (shared pages split between them:
  the physical memory the run holds), with its anonymous part (``Pss_Anon``: memory that cannot be
  dropped; file pages of a memory map are page cache the kernel evicts under pressure), sampled every
  0.05 s from ``/proc/<pid>/smaps_rollup`` (Linux only).

Usage::

    .venv/bin/python benchmarks/bench_cache.py                     # ~2 min on 2 CPU cores, 1.5 GB in /tmp
    .venv/bin/python benchmarks/bench_cache.py --markdown /tmp/results_cache.md
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
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LESION_LABEL = 2
SPACING_MM = (1.0, 1.0, 1.0)


# ------------------------------------------------------------------------------------------------ data


def write_dataset(root: Path, n_cases: int, shape: tuple[int, int, int], seed: int = 0) -> list[str]:
    """``n_cases`` scans in the preprocessed layout under ``root`` (reused when already complete)."""
    cases = root / "cases"
    ids = [f"case_{i:03d}" for i in range(n_cases)]
    done = root / "ids.json"
    if done.is_file() and json.loads(done.read_text()) == {"ids": ids, "shape": list(shape)}:
        return ids
    cases.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    for cid in ids:
        image = rng.standard_normal((1, *shape), dtype=np.float32)
        label = np.zeros(shape, np.uint8)
        label[shape[0] // 8: -shape[0] // 8, shape[1] // 8: -shape[1] // 8] = 1  # an "organ"
        for _ in range(4):  # lesion spheres of radius 2-6 voxels
            centre = [int(rng.integers(min(8, n // 4), n - min(8, n // 4))) for n in shape]
            radius = float(rng.uniform(2, 6))
            label[sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2] = LESION_LABEL
        image[0][label == LESION_LABEL] += 3.0
        np.save(cases / f"{cid}_image.npy", image)
        np.save(cases / f"{cid}_label.npy", label)
        (cases / f"{cid}.json").write_text(json.dumps(case_record(cid, shape)))
    done.write_text(json.dumps({"ids": ids, "shape": list(shape)}))  # last: marks the data set complete
    return ids


def case_record(case_id: str, shape: tuple[int, int, int]) -> dict:
    """The preprocess stage's record of a scan already on the target grid (identity affine, nothing cropped or
    resampled, no normalisation), checked against :class:`pipeline.contracts.CaseRecord`."""
    from pipeline.contracts import CaseRecord
    from pipeline.preprocessing.transform import LABEL_METHOD, RECORD_VERSION

    affine = np.diag([*SPACING_MM, 1.0]).tolist()
    grid = {"shape": list(shape), "affine": affine}
    record = {
        "case_id": case_id, "version": RECORD_VERSION,
        "original": {**grid, "spacing_mm": list(SPACING_MM), "axcodes": "RAS", "n_channels": 1},
        "orientation": {**grid, "ornt": [[0, 1], [1, 1], [2, 1]], "axcodes": "RAS",
                        "spacing_mm": list(SPACING_MM)},
        "crop": {**grid, "box": [[0, n] for n in shape], "label_voxels_outside": 0},
        "resample": {"target_spacing_mm": list(SPACING_MM), "spacing_mm": list(SPACING_MM), "shape": list(shape),
                     "image_orders": [3, 3, 3], "lowres_axis": None, "label_method": LABEL_METHOD},
        "intensity": [{"scheme": "none", "clip": None, "mean": None, "std": None}],
        "n_classes": 3, "has_label": True, **grid, "spacing_mm": list(SPACING_MM),
    }
    return CaseRecord.from_dict(record, f"bench_cache {case_id}").to_dict()


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache (a cold start; no root needed for clean pages)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------- memory


def _pss_kb(pid: int) -> tuple[int, int]:
    """(Pss, Pss_Anon) of a process in kB, 0 when it is gone."""
    pss = anon = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Pss_Anon:"):
                    anon = int(line.split()[1])
    except OSError:
        pass
    return pss, anon


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


class PssSampler(threading.Thread):
    """Peak over time of the summed PSS (and Pss_Anon) of this process and its children, in MB."""

    def __init__(self, every_s: float = 0.05):
        super().__init__(daemon=True)
        self.every_s, self.stop = every_s, threading.Event()
        self.peak_pss_mb = self.peak_anon_mb = 0.0

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            pss = anon = 0
            for pid in [me, *_children(me)]:
                p, a = _pss_kb(pid)
                pss, anon = pss + p, anon + a
            self.peak_pss_mb = max(self.peak_pss_mb, pss / 1024)
            self.peak_anon_mb = max(self.peak_anon_mb, anon / 1024)
            self.stop.wait(self.every_s)


# --------------------------------------------------------------------------------------------- child


def run_child(opts: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process; returns its measurements."""
    import torch

    from pipeline.config import AugmentConfig, SamplingConfig
    from pipeline.training.data import PatchBatches, load_preprocessed, make_loader

    torch.set_num_threads(1)
    root = Path(opts.work)
    ids = json.loads((root / "ids.json").read_text())["ids"]
    sampler = PssSampler()
    sampler.start()
    t0 = time.perf_counter()
    cases = load_preprocessed(root, ids, opts.child)
    ds = PatchBatches(cases, opts.patch, opts.batch, SamplingConfig(), AugmentConfig(), [LESION_LABEL], seed=0)
    load_s = time.perf_counter() - t0
    total = opts.warmup + opts.steps
    ds.set_stream(total, 0, total)
    it = iter(make_loader(ds, opts.child_workers, pin_memory=False))
    for _ in range(opts.warmup):
        next(it)
    t1 = time.perf_counter()
    n = 0
    for batch in it:
        n += batch["image"].shape[0]
    seconds = time.perf_counter() - t1
    del it
    sampler.stop.set()
    sampler.join()
    return {
        "cache": opts.child, "workers": opts.child_workers, "mapped": type(cases[0].image).__name__ == "memmap",
        "load_s": load_s, "patches_per_s": n / seconds,
        "peak_rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "peak_pss_mb": sampler.peak_pss_mb, "peak_pss_anon_mb": sampler.peak_anon_mb,
    }


# -------------------------------------------------------------------------------------------- parent


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}, load average {load[0]:.2f} after")


def summarise(rows: list[dict]) -> list[dict]:
    """One row per configuration over the rounds: median load time and patches/s (with each round's), the
    largest memory peaks."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["cache"], r["workers"], r["page_cache"])
        agg = out.setdefault(key, {"cache": key[0], "workers": key[1], "page_cache": key[2], "runs": []})
        agg["runs"].append(r)
    for agg in out.values():
        runs = agg.pop("runs")
        agg["load_s"] = statistics.median(r["load_s"] for r in runs)
        agg["patches_per_s"] = statistics.median(r["patches_per_s"] for r in runs)
        agg["patches_per_s_rounds"] = [r["patches_per_s"] for r in runs]
        for k in ("peak_rss_main_mb", "peak_rss_worker_mb", "peak_pss_mb", "peak_pss_anon_mb"):
            agg[k] = max(r[k] for r in runs)
    return list(out.values())


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        f"Data: {info['cases']} scans of {info['shape']} voxels, {info['data_gb']:.2f} GB of arrays; cache limit "
        f"{info['limit_gb']} GB -> `train.cache: auto` chose **{info['auto']}**. Patch {info['patch']}, batch "
        f"{info['batch']}, default augmentation, {info['steps']} timed batches after {info['warmup']}, "
        f"{info['rounds']} round(s) (median, each round's in brackets; memory: the largest peak); cold: page "
        f"cache dropped before the run, warm: right after the cold runs. Machine: {info['machine']}.",
        "",
        "| cache | workers | page cache | load + index (s) | patches/s | peak RSS main (MB) "
        "| peak RSS worker (MB) | peak PSS main + worker (MB) | of it anonymous (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summarise(rows):
        rounds = ", ".join(f"{v:.0f}" for v in r["patches_per_s_rounds"])
        lines.append(f"| {r['cache']} | {r['workers']} | {r['page_cache']} | {r['load_s']:.1f} | "
                     f"{r['patches_per_s']:.1f} ({rounds}) | {r['peak_rss_main_mb']:.0f} | "
                     f"{r['peak_rss_worker_mb']:.0f} | {r['peak_pss_mb']:.0f} | {r['peak_pss_anon_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/bench_cache", help="data set folder (written once, reused)")
    p.add_argument("--cases", type=int, default=36)
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 128])
    p.add_argument("--limit-gb", type=float, default=0.5, help="cache limit: cache_ram_fraction x available RAM")
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="timed batches per configuration")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=2, help="repeats of every configuration, alternating")
    p.add_argument("--no-warm", dest="warm", action="store_false", help="skip the warm page-cache runs")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-workers", type=int, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:
        print(json.dumps(run_child(opts)))
        return

    from pipeline.training.data import load_preprocessed

    root = Path(opts.work)
    t0 = time.perf_counter()
    ids = write_dataset(root, opts.cases, tuple(opts.shape))
    files = [root / "cases" / f"{cid}_{kind}.npy" for cid in ids for kind in ("image", "label")]
    data_gb = sum(f.stat().st_size for f in files) / 1e9
    print(f"data set: {len(ids)} cases, {data_gb:.2f} GB in {root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    # auto with the configured limit: cache_ram_fraction 1 of an "available RAM" of --limit-gb
    probe = load_preprocessed(root, ids, "auto", 1.0, available_bytes=int(opts.limit_gb * 1e9))
    auto = "mmap" if type(probe[0].image).__name__ == "memmap" else "memory"
    del probe
    rows = []
    # cold: files dropped from the page cache first; warm (workers 0 only, right after the cold run): the
    # page cache holds what the cold run read (a data set larger than the process's share of RAM that still
    # fits in the page cache)
    runs = [(cache, w, "cold") for cache in ("memory", "mmap") for w in opts.workers]
    runs += [(cache, 0, "warm") for cache in ("memory", "mmap") if opts.warm]
    runs.sort(key=lambda r: ("memory", "mmap").index(r[0]))
    load_before = os.getloadavg()[0]
    for cache, workers, page_cache in runs * opts.rounds:  # rounds alternate memory and mmap (shared machine)
        if page_cache == "cold":
            evict(files)
        cmd = [sys.executable, __file__, "--child", cache, "--child-workers", str(workers), "--work", str(root),
               "--patch", *map(str, opts.patch), "--batch", str(opts.batch), "--steps", str(opts.steps),
               "--warmup", str(opts.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{cache} workers {workers} failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout
        rows.append({**json.loads(out.strip().splitlines()[-1]), "page_cache": page_cache})
        r = rows[-1]
        print(f"{cache:6s} workers {workers} {page_cache}: load {r['load_s']:.1f} s, {r['patches_per_s']:.1f} "
              f"patches/s, "
              f"peak RSS main {r['peak_rss_main_mb']:.0f} MB worker {r['peak_rss_worker_mb']:.0f} MB, "
              f"peak PSS {r['peak_pss_mb']:.0f} MB (anon {r['peak_pss_anon_mb']:.0f})", flush=True)
    info = {"cases": len(ids), "shape": "x".join(map(str, opts.shape)), "data_gb": data_gb,
            "limit_gb": opts.limit_gb, "auto": auto, "patch": "x".join(map(str, opts.patch)), "batch": opts.batch,
            "steps": opts.steps, "warmup": opts.warmup, "rounds": opts.rounds,
            "machine": f"{machine()} (load average {load_before:.2f} before the runs)"}
    table = markdown(rows, info)
    print(table)
    if opts.markdown:
        opts.markdown.write_text(table)


if __name__ == "__main__":
    main()
