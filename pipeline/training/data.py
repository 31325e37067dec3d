"""Training data: preprocessed cases in memory (or memory-mapped), lesion-aware patch batches, nnU-Net-strength
augmentation (:mod:`pipeline.data.augment`), and a DataLoader whose batch for step ``s`` of epoch ``e`` depends only on
``(seed, epoch, rank, s)`` — not on the number of workers — so runs are deterministic and resumable.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import AugmentConfig
from pipeline.contracts import CaseRecord
from pipeline.data.augment import augment_patch
from pipeline.data.sampling import LesionIndex, PatchSampler, index_lesions
from pipeline.preprocessing.layout import case_paths, cases_dir

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ loading and cache

# ``train.cache`` spellings: ``disk`` (the old name) and ``memmap`` mean ``mmap``
CACHE_ALIASES = {"memory": "memory", "mmap": "mmap", "memmap": "mmap", "disk": "mmap", "auto": "auto"}


@dataclass
class PreprocessedCase:
    """One preprocessed scan. ``image`` / ``label`` are in-memory arrays, or read-only memory maps of the
    preprocess stage's ``.npy`` files; then ``image_path`` / ``label_path`` name those files, and pickling
    (a spawn-started loader worker, a DDP rank) sends the paths, not the data: the receiver maps the files
    again and shares their pages through the page cache."""

    case_id: str
    image: np.ndarray  # (C, X, Y, Z) float32
    label: np.ndarray  # (X, Y, Z) uint8
    spacing_mm: tuple[float, float, float]
    image_path: Path | None = None  # set when ``image`` is a memory map of this file
    label_path: Path | None = None  # set when ``label`` is a memory map of this file

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("image", "label"):
            if state[f"{key}_path"] is not None and isinstance(state[key], np.memmap):
                state[key] = None  # re-mapped from the path by __setstate__
        return state

    def __setstate__(self, state: dict) -> None:
        for key in ("image", "label"):
            if state[key] is None:
                state[key] = load_array(state[f"{key}_path"], mmap=True)
        self.__dict__.update(state)


def load_array(path: str | Path, mmap: bool) -> np.ndarray:
    """``np.load`` of one preprocessed array (``mmap``: a read-only memory map, no data read yet).

    Raises:
        FileNotFoundError / ValueError naming ``path`` when the file is missing, truncated or not a .npy
        array (``np.load``'s own messages do not say which file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: preprocessed array missing; run the preprocess stage")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: unreadable preprocessed array ({exc}); re-run the preprocess stage") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise ValueError(f"{path}: not a single .npy array; re-run the preprocess stage")
    return array


def npy_nbytes(path: str | Path) -> int:
    """Bytes of the array in a ``.npy`` file, read through a memory map (the header only; no data read)."""
    return int(load_array(path, mmap=True).nbytes)


def cgroup_headroom_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"),
                          root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit (a container's, a Slurm job's), or None if none.

    cgroup v2 (``0::<path>``): ``memory.max - memory.current``; v1 (``<n>:memory:<path>``):
    ``memory.limit_in_bytes - memory.usage_in_bytes``. Usage counts the group's page cache too, so this errs
    low (towards memory-mapping).
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    headroom = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, path = parts[1], parts[2].lstrip("/")
        if controllers == "":
            limit_file, used_file = root / path / "memory.max", root / path / "memory.current"
        elif "memory" in controllers.split(","):
            v1 = root / "memory" / path
            limit_file, used_file = v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes"
        else:
            continue
        try:
            limit, used = limit_file.read_text().strip(), int(used_file.read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a huge number
            continue
        left = max(0, int(limit) - used)
        headroom = left if headroom is None else min(headroom, left)
    return headroom


def available_ram_bytes() -> int:
    """RAM this process can still fill without swapping or being killed, in bytes.

    ``MemAvailable`` of ``/proc/meminfo`` (free + reclaimable page cache), lowered to the headroom under the
    cgroup's memory limit (:func:`cgroup_headroom_bytes`). Where ``/proc`` is absent: free physical pages
    (``os.sysconf``), which leaves out the page cache and so errs towards memory-mapping.
    """
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # no sysconf name: assume plenty
            return 2**62
    headroom = cgroup_headroom_bytes()
    return int(avail if headroom is None else min(avail, headroom))


def resolve_cache(cache: str, data_bytes: int, ram_fraction: float, available_bytes: int) -> str:
    """``"memory"`` or ``"mmap"`` for a ``train.cache`` setting.

    ``auto``: memory-map when ``data_bytes > ram_fraction * available_bytes`` (the arrays would take more
    than that share of the free RAM), else load into memory. ``memory`` / ``mmap`` (or ``disk`` / ``memmap``)
    are kept as given.
    """
    if cache not in CACHE_ALIASES:
        raise ValueError(f"unknown train.cache {cache!r}: one of {sorted(CACHE_ALIASES)}")
    mode = CACHE_ALIASES[cache]
    if mode != "auto":
        return mode
    return "mmap" if data_bytes > ram_fraction * available_bytes else "memory"


def load_preprocessed(folder: str | Path, case_ids: list[str], cache: str = "auto", ram_fraction: float = 0.5,
                      available_bytes: int | None = None,
                      processes_per_machine: int = 1) -> list[PreprocessedCase]:
    """Read the preprocess stage's arrays into memory or as read-only memory maps (``train.cache``).

    Memory maps let the training set exceed RAM: a patch read touches only the pages under the patch, and
    the pages live in the page cache, shared by the loader workers (forked or spawned, see
    :class:`PreprocessedCase`) and evicted under memory pressure instead of the process being killed.

    Args:
        folder: the preprocess stage's output (``<folder>/cases/<id>.json``, ``<id>_image.npy``, ...).
        case_ids: cases to read, in order.
        cache: ``memory``, ``mmap`` (aliases ``disk``, ``memmap``) or ``auto`` (see :func:`resolve_cache`).
        ram_fraction: ``auto``'s share of the available RAM (``train.cache_ram_fraction``).
        available_bytes: the available RAM; None: measured now (:func:`available_ram_bytes`).
        processes_per_machine: training processes on this machine that each load these cases (DDP ranks):
            in memory each holds its own copy, so ``auto`` weighs ``processes_per_machine`` x the arrays.
    """
    folder = cases_dir(folder)
    files = [case_paths(folder, cid) for cid in case_ids]
    for f in files:
        if not f["record"].is_file():
            raise FileNotFoundError(f"{f['record']}: preprocessed case missing; run the preprocess stage")
    paths = [(f["image"], f["label"]) for f in files]
    mode = CACHE_ALIASES.get(cache, cache)
    if mode == "auto":
        data_bytes = sum(npy_nbytes(p) for pair in paths for p in pair) * max(1, processes_per_machine)
        avail = available_ram_bytes() if available_bytes is None else int(available_bytes)
        mode = resolve_cache(cache, data_bytes, ram_fraction, avail)
        log.info("train.cache auto: %d cases x %d process(es), %.2f GB of arrays vs %.2f x %.2f GB available "
                 "RAM -> %s", len(case_ids), max(1, processes_per_machine), data_bytes / 1e9, ram_fraction,
                 avail / 1e9, "memory-mapped" if mode == "mmap" else "in memory")
    else:
        mode = resolve_cache(cache, 0, ram_fraction, 0)  # validates the name
    mmap = mode == "mmap"
    out = []
    for cid, (image_path, label_path) in zip(case_ids, paths, strict=True):
        record = CaseRecord.load(case_paths(folder, cid)["record"])  # invalid / no spacing: ContractError
        image = load_array(image_path, mmap)
        label = load_array(label_path, mmap)
        spacing = record.spacing_mm  # the preprocessed grid's (mm)
        out.append(PreprocessedCase(cid, image, label, spacing,  # type: ignore[arg-type]
                                    image_path if mmap else None, label_path if mmap else None))
    return out


def build_augmentation(cfg: AugmentConfig, anisotropic_axis: int | None):
    """A MONAI dictionary-transform approximation of ``cfg`` over ``{"image", "label"}``, for the MONAI
    tutorial baseline of benchmarks/bench_training.py only: training uses :mod:`pipeline.data.augment`
    (one spatial transform read from the scan, per-channel intensity transforms; docs/augmentation.md)."""
    from monai import transforms as T

    keys = ["image", "label"]
    rot = np.deg2rad(cfg.rotate_deg)
    ranges = [rot, rot, rot]
    if anisotropic_axis is not None:
        # MONAI: range_x rotates in the plane of axes (1, 2), range_y (0, 2), range_z (0, 1)
        aniso = np.deg2rad(cfg.rotate_deg_anisotropic)
        ranges = [aniso if a == anisotropic_axis else 0.0 for a in range(3)]
    chain = [T.RandFlipd(keys, prob=cfg.mirror_prob, spatial_axis=a) for a in range(3)]
    chain += [
        T.RandRotated(keys, range_x=ranges[0], range_y=ranges[1], range_z=ranges[2], prob=cfg.rotate_prob,
                      mode=("bilinear", "nearest"), padding_mode="zeros", keep_size=True),
        T.RandZoomd(keys, prob=cfg.scale_prob, min_zoom=1 / cfg.scale_range[1], max_zoom=1 / cfg.scale_range[0],
                    mode=("trilinear", "nearest"), keep_size=True),
        T.RandGaussianNoised("image", std=cfg.noise_std[1], prob=cfg.noise_prob),
        T.RandGaussianSmoothd("image", sigma_x=cfg.blur_sigma_vox, sigma_y=cfg.blur_sigma_vox,
                              sigma_z=cfg.blur_sigma_vox, prob=cfg.blur_prob),
        T.RandScaleIntensityd("image", factors=(cfg.brightness_range[0] - 1, cfg.brightness_range[1] - 1),
                              prob=cfg.brightness_prob),
        T.RandAdjustContrastd("image", gamma=cfg.gamma_range, prob=cfg.gamma_prob),
    ]
    return T.Compose(chain)


class PatchBatches(IterableDataset):
    """Yields ``steps`` batches ``{"image": (B, C, *patch) float32, "label": (B, 1, *patch) int64}``."""

    def __init__(self, cases: list[PreprocessedCase], patch_size, batch_size: int, sampler_cfg, augment_cfg,
                 lesion_labels, seed: int, rank: int = 0, anisotropic_axis: int | None = None):
        self.cases = cases
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.augment_cfg = augment_cfg
        self.seed, self.rank = seed, rank
        self.anisotropic_axis = anisotropic_axis
        indices: list[LesionIndex] = [index_lesions(c.label, lesion_labels) for c in cases]
        self.sampler = PatchSampler([c.label.shape for c in cases], indices, sampler_cfg.lesion_fraction,
                                    sampler_cfg.lesion_weighting, sampler_cfg.class_balance,
                                    sampler_cfg.lesion_count)
        self.epoch, self.steps, self.first_step = 0, 0, 0
        self.stream: tuple[int, int, int] = (1, 0, 0)  # (steps per epoch, first, end global step)

    def set_epoch(self, epoch: int, steps: int, first_step: int = 0) -> None:
        """Iterate steps ``first_step .. steps - 1`` of ``epoch`` (one epoch of ``steps`` steps)."""
        self.epoch, self.steps, self.first_step = epoch, steps, first_step
        self.set_stream(steps, epoch * steps + first_step, (epoch + 1) * steps)

    def set_stream(self, steps_per_epoch: int, first: int, end: int) -> None:
        """Iterate global steps ``first .. end - 1`` across epochs: global step g is step
        ``g % steps_per_epoch`` of epoch ``g // steps_per_epoch``, the same batch :meth:`set_epoch` gives.
        One iterator then serves a whole run, so loader workers start once, not once per epoch."""
        self.stream = (steps_per_epoch, first, end)

    def make_batch(self, step: int) -> dict[str, torch.Tensor]:
        """Batch ``step`` of the current epoch: centres from the lesion-aware sampler, then one augmented
        patch per centre (:func:`pipeline.data.augment.augment_patch`), all drawn from one generator seeded by
        ``(seed, epoch, rank, step)``."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, step])
        images, labels = [], []
        for case_idx, centre, _ in self.sampler.batch(rng, self.batch_size):
            case = self.cases[case_idx]
            image, label = augment_patch(case.image, case.label, centre, self.patch_size, rng, self.augment_cfg,
                                         self.anisotropic_axis)
            images.append(image)
            labels.append(label[None].to(torch.int64))
        return {"image": torch.stack(images), "label": torch.stack(labels)}

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        # the DataLoader takes one batch from each worker in turn, starting with worker 0: worker w
        # must own global steps first + w, first + w + nw, ... for the batches to arrive in step order
        per_epoch, first, end = self.stream
        for g in range(first + wid, end, nw):
            self.epoch = g // per_epoch  # this process's copy (a worker's, or the main one with no workers)
            yield self.make_batch(g % per_epoch)


def resolve_num_workers(setting: int | str, processes_per_machine: int = 1) -> int:
    """Loader worker processes: an explicit count as is; ``"auto"``: min(cores - 1, 8) per training process.

    One core stays with the training process itself (its forward / backward, or feeding the GPU); with one
    core per process that means 0 workers (batches made in the training process), on 2 cores 1 worker.
    Cores are those this process may run on (``os.sched_getaffinity``: a container's or ``taskset``'s
    limit), shared by the ``processes_per_machine`` ranks of a multi-GPU run.
    """
    if setting != "auto":
        return int(setting)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(0, min(cores // max(1, processes_per_machine) - 1, 8))


def make_loader(dataset: PatchBatches, num_workers: int, pin_memory: bool) -> DataLoader:
    """A loader over ``dataset``'s stream, each worker keeping 4 batches ready.

    The training loop iterates it once for the whole run (:meth:`PatchBatches.set_stream`), so its workers
    start once and live until the last step. ``persistent_workers=True`` would not add to that, and would
    keep workers' stale copies of the dataset across a later ``set_stream`` / ``set_epoch``.
    """
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)
