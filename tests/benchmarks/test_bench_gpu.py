"""benchmarks/bench_gpu.py still runs: the ``--device cpu --tiny`` smoke run writes a sane JSON (no timing
asserted beyond "positive"), and the device peak table picks the right entry for real device names."""

from __future__ import annotations

import json
import math

import pytest

from tests.benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_gpu")


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10", 125.0),  # not A100's entry
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", None),  # not L4's entry: unknown
        ("Tesla V100-SXM2-32GB", 125.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_tflops_table(bench, name, tflops):
    peak, source = bench.peak_tflops(name)
    assert peak == tflops
    assert (source == "peak unknown") == (tflops is None)


def test_bench_gpu_cpu_tiny_smoke(bench, tmp_path, capsys):
    out = tmp_path / "bench_gpu.json"
    assert bench.main(["--device", "cpu", "--tiny", "--peak-tflops", "0.5", "--max-seconds", "60",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    train, inference = result["train"], result["inference"]

    assert result["tiny"] is True and result["device"]["type"] == "cpu"
    assert result["plan"]["budget"]["kind"] == "gpu"  # the GPU plan, whatever machine plans it
    assert result["plan"]["n_params"] > 0 and len(result["plan"]["filters"]) == len(result["plan"]["strides"])
    assert train["steps_timed"] >= 1 and train["step_time_s"] > 0 and train["flops_per_step"] > 0
    assert 0.0 <= train["data_wait_fraction"] <= 1.0 and 0.0 <= train["data_wait_fraction_second_half"] <= 1.0
    assert train["workers"] >= 0 and train["patches_per_s"] > 0
    assert result["device"]["peak_tflops"] == 0.5 and result["device"]["peak_source"] == "--peak-tflops"
    assert result["share_of_peak"] == pytest.approx(train["achieved_tflops"] / 0.5)
    assert 0 < result["share_of_peak"] < 1  # a 2-core CPU does not reach 0.5 TFLOP/s on this network

    assert inference["tta_mirror"] is False and inference["blend"] == "gaussian"
    assert inference["ours"]["voxels_per_s"] > 0 and inference["monai"]["voxels_per_s"] > 0
    assert math.isfinite(inference["ours_vs_monai"]) and inference["ours_vs_monai"] > 0
    assert "ours_device_out" not in inference  # CUDA only

    assert "peak_gpu_memory_gb" in result and result["peak_gpu_memory_gb"] is None  # CPU: no GPU memory
    assert result["wall_s"] > 0
    table = capsys.readouterr().out
    assert "| share of device peak |" in table and "| ours / MONAI (voxels/s) |" in table
