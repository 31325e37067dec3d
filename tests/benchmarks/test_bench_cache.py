"""benchmarks/bench_cache.py on a tiny data set, in process (no child processes): its data set loads through
``load_preprocessed`` (records valid for the current contract), ``auto`` picks memory-mapping over the limit,
one configuration runs, and the table is built. Keeps the benchmark from rotting; it measures nothing."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pytest

from tests.benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_cache")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/smaps_rollup")
def test_one_configuration_on_a_tiny_data_set(bench, tmp_path):
    from pipeline.training.data import load_preprocessed

    ids = bench.write_dataset(tmp_path, 2, (32, 32, 16))
    assert bench.write_dataset(tmp_path, 2, (32, 32, 16)) == ids  # complete: reused
    mapped = load_preprocessed(tmp_path, ids, "auto", 1.0, available_bytes=1000)
    assert isinstance(mapped[0].image, np.memmap) and mapped[0].image.shape == (1, 32, 32, 16)
    assert (mapped[0].label == bench.LESION_LABEL).any()
    bench.evict([tmp_path / "cases" / f"{ids[0]}_image.npy"])
    opts = argparse.Namespace(work=str(tmp_path), child="mmap", child_workers=0, patch=[16, 16, 8], batch=2,
                              steps=2, warmup=1)
    row = bench.run_child(opts)
    assert row["mapped"] and row["patches_per_s"] > 0 and row["peak_pss_mb"] > 0
    rows = [{**row, "page_cache": "cold"}, {**row, "page_cache": "cold", "patches_per_s": 2 * row["patches_per_s"]}]
    table = bench.markdown(rows, {"cases": 2, "shape": "32x32x16", "data_gb": 0.0, "limit_gb": 0.5, "auto": "mmap",
                                  "patch": "16x16x8", "batch": 2, "steps": 2, "warmup": 1, "rounds": 2,
                                  "machine": "test"})
    assert table.count("| mmap | 0 | cold |") == 1  # the two rounds are one row (median)
