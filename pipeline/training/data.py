"""Training data: preprocessed cases in memory (or memory-mapped), lesion-aware patch batches, MONAI
augmentation, and a DataLoader whose batch for step ``s`` of epoch ``e`` depends only on
``(seed, epoch, rank, s)`` — not on the number of workers — so runs are deterministic and resumable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import AugmentConfig
from pipeline.data.sampling import LesionIndex, PatchSampler, crop_box, crop_patch, index_lesions


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
    """MONAI dictionary transforms over ``{"image", "label"}``; labels always nearest-neighbour."""
    from monai import transforms as T

    keys = ["image", "label"]
    # rotate in the plane that excludes a thick-slice axis (rotating through 3-5 mm slices smears them)
    rot = np.deg2rad(cfg.rotate_deg)
    ranges = [rot, rot, rot]
    if anisotropic_axis is not None:
        # MONAI: range_x rotates in the plane of axes (1, 2), range_y (0, 2), range_z (0, 1)
        ranges = [rot if a == anisotropic_axis else 0.0 for a in range(3)]
    chain = [T.RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=a) for a in range(3)]
    chain += [
        T.RandRotated(keys, range_x=ranges[0], range_y=ranges[1], range_z=ranges[2], prob=cfg.rotate_prob,
                      mode=("bilinear", "nearest"), padding_mode="border", keep_size=True),
        T.RandZoomd(keys, prob=cfg.scale_prob, min_zoom=1 - cfg.scale_range, max_zoom=1 + cfg.scale_range,
                    mode=("trilinear", "nearest"), keep_size=True),
    ]
    if cfg.elastic_prob > 0:
        chain.append(T.Rand3DElasticd(keys, sigma_range=(5, 8), magnitude_range=(50, 150), prob=cfg.elastic_prob,
                                      mode=("bilinear", "nearest"), padding_mode="border"))
    chain += [
        T.RandScaleIntensityd("image", factors=0.25, prob=cfg.intensity_scale_prob),
        T.RandShiftIntensityd("image", offsets=0.1, prob=cfg.intensity_shift_prob),
        T.RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=cfg.gamma_prob),
        T.RandGaussianNoised("image", std=0.1, prob=cfg.noise_prob),
        T.RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=cfg.blur_prob),
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
        self._augment = None

    def set_epoch(self, epoch: int, steps: int, first_step: int = 0) -> None:
        self.epoch, self.steps, self.first_step = epoch, steps, first_step

    def make_batch(self, step: int) -> dict[str, torch.Tensor]:
        from monai.data import set_track_meta

        set_track_meta(False)
        if self._augment is None:
            self._augment = build_augmentation(self.augment_cfg, self.anisotropic_axis)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, step])
        self._augment.set_random_state(seed=int(rng.integers(2**31 - 1)))
        images, labels = [], []
        for case_idx, centre, _ in self.sampler.batch(rng, self.batch_size):
            case = self.cases[case_idx]
            start, stop = crop_box(case.label.shape, centre, self.patch_size)
            # pad with 0: the normalised intensity of an average foreground voxel, as nnU-Net does
            item = {"image": crop_patch(case.image, start, stop, 0.0),
                    "label": crop_patch(case.label[None], start, stop, 0)}
            item = self._augment(item)
            images.append(torch.as_tensor(item["image"], dtype=torch.float32))
            labels.append(torch.as_tensor(item["label"]).round().to(torch.int64))
        return {"image": torch.stack(images), "label": torch.stack(labels)}

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        # the DataLoader takes one batch from each worker in turn, starting with worker 0: worker w
        # must own steps first_step + w, first_step + w + nw, ... for the batches to arrive in step order
        for step in range(self.first_step, self.steps):
            if (step - self.first_step) % nw == wid:
                yield self.make_batch(step)


def make_loader(dataset: PatchBatches, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)
