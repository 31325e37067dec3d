"""Training data: preprocessed cases in memory (or memory-mapped), lesion-aware patch batches, nnU-Net-strength
augmentation (:mod:`pipeline.data.augment`), and a DataLoader whose batch for step ``s`` of epoch ``e`` depends only on
``(seed, epoch, rank, s)`` — not on the number of workers — so runs are deterministic and resumable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import AugmentConfig
from pipeline.data.augment import augment_patch
from pipeline.data.sampling import LesionIndex, PatchSampler, index_lesions


@dataclass
class PreprocessedCase:
    case_id: str
    image: np.ndarray  # (C, X, Y, Z) float32
    label: np.ndarray  # (X, Y, Z) uint8
    spacing_mm: tuple[float, float, float]


def load_preprocessed(folder: str | Path, case_ids: list[str], cache: str = "memory") -> list[PreprocessedCase]:
    """Read the preprocess stage's arrays; ``cache="disk"`` memory-maps them instead of loading."""
    folder = Path(folder) / "cases"
    mmap = "r" if cache == "disk" else None
    out = []
    for cid in case_ids:
        record_path = folder / f"{cid}.json"
        if not record_path.is_file():
            raise FileNotFoundError(f"{record_path}: preprocessed case missing; run the preprocess stage")
        record = json.loads(record_path.read_text())
        image = np.load(folder / f"{cid}_image.npy", mmap_mode=mmap)
        label = np.load(folder / f"{cid}_label.npy", mmap_mode=mmap)
        spacing = tuple(record.get("target_spacing_mm") or record.get("spacing_mm") or (1.0, 1.0, 1.0))
        out.append(PreprocessedCase(cid, image, label, spacing))  # type: ignore[arg-type]
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
                                    sampler_cfg.lesion_weighting, sampler_cfg.class_balance)
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
