"""pipeline/training/data.py, ``train.cache``: in memory, memory-mapped, or ``auto`` (memory-mapped when the
arrays exceed ``cache_ram_fraction`` of the available RAM); memory-mapped cases give the same patches, pickle
as paths, and read only the pages under a patch."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.config import AugmentConfig, SamplingConfig, TrainConfig
from pipeline.data.augment import augment_patch
from pipeline.training.data import (
    PatchBatches,
    PreprocessedCase,
    available_ram_bytes,
    cgroup_headroom_bytes,
    load_preprocessed,
    make_loader,
    resolve_cache,
)

from .tiny_data import LESION_LABEL, SHAPE

# one tiny case: image (1, 32, 32, 16) float32 + label (32, 32, 16) uint8
CASE_BYTES = 4 * int(np.prod(SHAPE)) + int(np.prod(SHAPE))


def _batches(cases, seed=0) -> PatchBatches:
    return PatchBatches(cases, (16, 16, 8), 2, SamplingConfig(), AugmentConfig(), [LESION_LABEL], seed=seed)


def test_resolve_cache_auto_compares_the_arrays_with_the_ram_share():
    assert resolve_cache("auto", 100, 0.5, 201) == "memory"  # 100 <= 0.5 x 201
    assert resolve_cache("auto", 100, 0.5, 200) == "memory"  # at the limit: still fits
    assert resolve_cache("auto", 101, 0.5, 200) == "mmap"
    assert resolve_cache("auto", 100, 1.0, 99) == "mmap"
    # explicit settings whatever the sizes; disk (the old name) and memmap are mmap
    assert resolve_cache("memory", 10**15, 0.5, 1) == "memory"
    for name in ("mmap", "memmap", "disk"):
        assert resolve_cache(name, 0, 0.5, 10**15) == "mmap"
    with pytest.raises(ValueError, match="unknown train.cache 'ram'"):
        resolve_cache("ram", 0, 0.5, 1)


def test_config_defaults_to_auto_and_accepts_every_name():
    assert TrainConfig().cache == "auto" and TrainConfig().cache_ram_fraction == 0.5
    for name in ("auto", "memory", "mmap", "memmap", "disk"):
        assert TrainConfig(cache=name).cache == name
    with pytest.raises(ValueError):
        TrainConfig(cache_ram_fraction=0)


@pytest.mark.skipif(not hasattr(os, "sysconf"), reason="no os.sysconf")
def test_available_ram_is_positive_and_at_most_the_machine():
    avail = available_ram_bytes()
    assert 0 < avail <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_headroom_reads_the_limit_of_this_process_group(tmp_path, version):
    proc = tmp_path / "cgroup"
    if version == "v2":
        proc.write_text("0::/job/42\n")
        group = tmp_path / "job" / "42"
        group.mkdir(parents=True)
        (group / "memory.max").write_text("1000000\n")
        (group / "memory.current").write_text("300000\n")
    else:
        proc.write_text("7:cpu,cpuacct:/x\n4:memory:/job/42\n")
        group = tmp_path / "memory" / "job" / "42"
        group.mkdir(parents=True)
        (group / "memory.limit_in_bytes").write_text("1000000\n")
        (group / "memory.usage_in_bytes").write_text("300000\n")
    assert cgroup_headroom_bytes(proc, tmp_path) == 700_000
    (group / ("memory.max" if version == "v2" else "memory.limit_in_bytes")).write_text(
        "max\n" if version == "v2" else "9223372036854771712\n")  # no limit
    assert cgroup_headroom_bytes(proc, tmp_path) is None
    assert cgroup_headroom_bytes(tmp_path / "absent", tmp_path) is None


def test_auto_loads_a_small_set_and_maps_one_over_the_limit(tiny_train_data, caplog):
    ids = tiny_train_data.splits["train"]  # 3 cases
    total = len(ids) * CASE_BYTES
    caplog.set_level(logging.INFO, logger="pipeline.training.data")
    small = load_preprocessed(tiny_train_data.preprocessed, ids, "auto", 0.5, available_bytes=2 * total)
    assert not any(isinstance(c.image, np.memmap) or isinstance(c.label, np.memmap) for c in small)
    assert all(c.image_path is None for c in small)
    assert "-> in memory" in caplog.text and f"{total / 1e9:.2f} GB" in caplog.text
    caplog.clear()
    big = load_preprocessed(tiny_train_data.preprocessed, ids, "auto", 0.5, available_bytes=2 * total - 2)
    assert all(isinstance(c.image, np.memmap) and isinstance(c.label, np.memmap) for c in big)
    assert not big[0].image.flags.writeable
    assert big[0].image_path == tiny_train_data.preprocessed / "cases" / f"{ids[0]}_image.npy"
    assert "-> memory-mapped" in caplog.text
    # three DDP ranks on the machine would each hold a copy: 3 x total > 0.5 x 2 x total
    ranks = load_preprocessed(tiny_train_data.preprocessed, ids, "auto", 0.5, 2 * total, processes_per_machine=3)
    assert isinstance(ranks[0].image, np.memmap)
    for a, b in zip(small, big, strict=True):
        assert a.spacing_mm == b.spacing_mm
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)


def test_mapped_patches_equal_in_memory_patches_bit_for_bit(tiny_train_data):
    ids = tiny_train_data.splits["train"]
    memory = _batches(load_preprocessed(tiny_train_data.preprocessed, ids, "memory"))
    mapped = _batches(load_preprocessed(tiny_train_data.preprocessed, ids, "mmap"))
    for ds in (memory, mapped):
        ds.set_epoch(1, 6)
    for step in range(6):  # default augmentation: rotations, scaling, elastic fields, intensity
        a, b = memory.make_batch(step), mapped.make_batch(step)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    got = list(make_loader(mapped, 1, pin_memory=False))  # a forked worker reads the same maps
    for step, batch in enumerate(got):
        assert torch.equal(batch["image"], memory.make_batch(step)["image"])


def test_a_mapped_case_pickles_as_its_paths(tiny_train_data):
    ids = tiny_train_data.splits["train"]
    memory = load_preprocessed(tiny_train_data.preprocessed, ids, "memory")
    mapped = load_preprocessed(tiny_train_data.preprocessed, ids, "mmap")
    blob = pickle.dumps(mapped[0])
    assert len(blob) < 1000 < CASE_BYTES  # paths, not 80 kB of voxels
    assert len(pickle.dumps(memory[0])) > CASE_BYTES  # in memory: the data travels
    back = pickle.loads(blob)
    assert isinstance(back.image, np.memmap) and back.image_path == mapped[0].image_path
    np.testing.assert_array_equal(back.image, memory[0].image)
    np.testing.assert_array_equal(back.label, memory[0].label)
    # the whole data set (cases + lesion index) stays small: what a spawn-started worker receives
    assert len(pickle.dumps(_batches(mapped))) < 10_000 < len(pickle.dumps(_batches(memory)))
    # a case built from arrays (not from files) still pickles its data
    plain = PreprocessedCase("x", np.ones((1, 2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8),
                             (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(plain)).image, plain.image)


def test_spawned_loader_workers_map_the_files_and_give_the_same_batches(tiny_train_data):
    ids = tiny_train_data.splits["train"]
    ds = _batches(load_preprocessed(tiny_train_data.preprocessed, ids, "mmap"))
    ds.set_epoch(0, 2)
    expected = [ds.make_batch(s) for s in range(2)]
    loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    got = list(loader)
    assert len(got) == 2
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def _mapped_rss_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def _evict(path: Path) -> None:
    """Drop ``path`` from the page cache, so that the next reads fault in pages at read-ahead size (a file
    just written sits in large page-cache folios, and a fault maps a whole folio: megabytes at a time)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
@pytest.mark.parametrize("spatial", [False, True], ids=["crop", "rotated"])
def test_a_patch_from_a_map_reads_only_the_pages_under_it(tmp_path, spatial):
    shape = (128, 128, 128)  # 8 MB of float32 image, 2 MB of labels; the patch is 16 x 16 x 8
    image_path, label_path = tmp_path / "c_image.npy", tmp_path / "c_label.npy"
    np.save(image_path, np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape))
    np.save(label_path, (np.arange(np.prod(shape)) % 3).astype(np.uint8).reshape(shape))
    _evict(image_path), _evict(label_path)
    case = load_preprocessed_pair(image_path, label_path)
    cfg = AugmentConfig(rotate_prob=1.0 if spatial else 0.0, scale_prob=0.0, elastic_prob=0.0)
    rng = np.random.default_rng(0)
    image, label = augment_patch(case.image, case.label, (64, 64, 64), (16, 16, 8), rng, cfg)
    assert image.shape == (1, 16, 16, 8) and label.shape == (16, 16, 8)
    # a patch spans 16 (rotated: ~20) x-planes of 64 kB (labels 16 kB), each read at read-ahead granularity
    # (measured: 1.0-1.4 MB of image, 0.26-0.39 MB of labels); a whole-volume read would map all of it
    assert _mapped_rss_bytes(image_path) < image_path.stat().st_size / 4
    assert _mapped_rss_bytes(label_path) < label_path.stat().st_size / 4


def load_preprocessed_pair(image_path: Path, label_path: Path) -> PreprocessedCase:
    from pipeline.training.data import load_array

    return PreprocessedCase("c", load_array(image_path, True), load_array(label_path, True), (1.0, 1.0, 1.0),
                            image_path, label_path)


@pytest.mark.parametrize("cache", ["memory", "mmap"])
def test_a_missing_or_corrupt_array_is_named(tiny_train_data, cache):
    ids = tiny_train_data.splits["train"]
    cases = tiny_train_data.preprocessed / "cases"
    label = cases / f"{ids[1]}_label.npy"
    label.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{ids[1]}_label\.npy: preprocessed array missing"):
        load_preprocessed(tiny_train_data.preprocessed, ids, cache)
    image = cases / f"{ids[0]}_image.npy"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # truncated (a killed copy)
    with pytest.raises(ValueError, match=rf"{ids[0]}_image\.npy: unreadable preprocessed array"):
        load_preprocessed(tiny_train_data.preprocessed, ids, cache)
    image.write_bytes(b"not an array at all")
    with pytest.raises(ValueError, match=rf"{ids[0]}_image\.npy: unreadable preprocessed array"):
        load_preprocessed(tiny_train_data.preprocessed, ids, cache)


def test_auto_names_a_missing_array_before_loading_anything(tiny_train_data):
    ids = tiny_train_data.splits["train"]
    (tiny_train_data.preprocessed / "cases" / f"{ids[2]}_image.npy").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{ids[2]}_image\.npy"):
        load_preprocessed(tiny_train_data.preprocessed, ids, "auto")
