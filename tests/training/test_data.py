"""pipeline/training/data.py: preprocessed-case loading and ``PatchBatches``, whose batch for step ``s``
depends only on ``(seed, epoch, rank, s)``: not on the number of loader workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig, SamplingConfig
from pipeline.training.data import PatchBatches, load_preprocessed, make_loader

from .tiny_data import LESION_LABEL, NO_AUGMENT, SHAPE, SPACING_MM


def test_load_preprocessed_reads_arrays_and_spacing(tiny_train_data):
    ids = tiny_train_data.splits["train"]
    cases = load_preprocessed(tiny_train_data.preprocessed, ids)
    assert [c.case_id for c in cases] == ids
    for c in cases:
        assert c.image.shape == (1, *SHAPE) and c.image.dtype == np.float32
        assert c.label.shape == SHAPE and c.label.dtype == np.uint8
        assert c.spacing_mm == SPACING_MM
        assert (c.label == LESION_LABEL).any()
    disk = load_preprocessed(tiny_train_data.preprocessed, ids[:1], cache="disk")
    assert isinstance(disk[0].image, np.memmap)
    np.testing.assert_array_equal(disk[0].image, cases[0].image)


def test_load_preprocessed_names_a_missing_case(tiny_train_data):
    with pytest.raises(FileNotFoundError, match=r"cases/ghost\.json: preprocessed case missing"):
        load_preprocessed(tiny_train_data.preprocessed, ["ghost"])


def batches(
    data, patch=(16, 16, 8), batch_size=2, seed=0, rank=0, sampling=None, augment=None
) -> PatchBatches:
    return PatchBatches(
        data.cases("train"),
        patch,
        batch_size,
        sampling or SamplingConfig(),
        augment or AugmentConfig(),
        [LESION_LABEL],
        seed=seed,
        rank=rank,
    )


def test_batch_layout(tiny_train_data):
    ds = batches(tiny_train_data, batch_size=3)
    ds.set_epoch(0, 1)
    batch = ds.make_batch(0)
    assert batch["image"].shape == (3, 1, 16, 16, 8) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (3, 1, 16, 16, 8) and batch["label"].dtype == torch.int64
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2}  # labels stay labels through rotation / zoom
    assert torch.isfinite(batch["image"]).all()


def test_batch_depends_only_on_seed_epoch_rank_and_step(tiny_train_data):
    ds = batches(tiny_train_data)
    ds.set_epoch(2, 5)
    first = [ds.make_batch(s) for s in (3, 1)]
    other = batches(tiny_train_data)  # a fresh object (another process) gives the same batches
    other.set_epoch(2, 5)
    again = [other.make_batch(s) for s in (1, 3)][::-1]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    ref = first[0]["image"]
    for changed in (dict(rank=1), dict(seed=1)):
        ds2 = batches(tiny_train_data, **changed)
        ds2.set_epoch(2, 5)
        assert not torch.equal(ds2.make_batch(3)["image"], ref), changed
    ds.set_epoch(3, 5)
    assert not torch.equal(ds.make_batch(3)["image"], ref)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_the_same_batches_in_step_order_whatever_the_workers(tiny_train_data, workers):
    ds = batches(tiny_train_data)
    ds.set_epoch(1, 5)
    expected = [ds.make_batch(s) for s in range(5)]
    got = list(make_loader(ds, workers, pin_memory=False))
    assert len(got) == 5
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    ds.set_epoch(1, 5, first_step=3)  # resuming mid-epoch replays the remaining steps exactly
    tail = list(make_loader(ds, workers, pin_memory=False))
    assert len(tail) == 2 and torch.equal(tail[0]["image"], expected[3]["image"])


def test_lesion_fraction_reaches_the_batches(tiny_train_data):
    """All patches centred on lesions with lesion_fraction 1 (no augmentation moves them away), far fewer
    with lesion_fraction 0: the lesions are ~0.2% of the voxels."""

    def lesion_patches(fraction: float) -> int:
        ds = batches(
            tiny_train_data,
            sampling=SamplingConfig(lesion_fraction=fraction),
            augment=AugmentConfig(**NO_AUGMENT),
        )
        ds.set_epoch(0, 10)
        return sum(int((lab == LESION_LABEL).any()) for s in range(10) for lab in ds.make_batch(s)["label"])

    assert lesion_patches(1.0) == 20
    assert lesion_patches(0.0) < 15


def test_patches_are_augment_patch_of_the_sampled_centres(tiny_train_data):
    """The batch is the sampler's centres through ``augment_patch``, drawn from one generator seeded by
    ``(seed, epoch, rank, step)``: replaying that by hand gives the same tensors."""
    from pipeline.data.augment import augment_patch

    ds = batches(tiny_train_data)
    ds.set_epoch(1, 3)
    batch = ds.make_batch(2)
    rng = np.random.default_rng([ds.seed, 1, ds.rank, 2])
    for b, (case_idx, centre, _) in enumerate(ds.sampler.batch(rng, ds.batch_size)):
        case = ds.cases[case_idx]
        image, label = augment_patch(case.image, case.label, centre, ds.patch_size, rng, ds.augment_cfg)
        assert torch.equal(batch["image"][b], image) and torch.equal(batch["label"][b, 0], label.to(torch.int64))


def test_build_augmentation_for_the_monai_baseline_rotates_in_plane_when_anisotropic():
    from pipeline.training.data import build_augmentation

    chain = build_augmentation(AugmentConfig(rotate_deg_anisotropic=170), anisotropic_axis=2)
    rot = next(t for t in chain.transforms if type(t).__name__ == "RandRotated").rand_rotate
    # range_z rotates in the plane of axes (0, 1), i.e. about the thick-slice axis 2
    assert rot.range_x == (0.0, 0.0) and rot.range_y == (0.0, 0.0)
    assert rot.range_z == pytest.approx((-np.deg2rad(170), np.deg2rad(170)))
