"""make_plan: target spacing (anisotropy rule), patch / batch within budget, topology, intensity, checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import config_from_dict
from pipeline.io.dataset import Dataset
from pipeline.preprocessing.fingerprint import QUANTILE_GRID
from pipeline.preprocessing.plan import (
    PlanError,
    make_plan,
    network_topology,
    plan_hash,
    resolve_budget_kind,
    target_spacing,
)

LABELS = {0: "background", 1: "liver", 2: "lesion"}


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    """``memory_budget: auto`` (the default) asks torch for CUDA: plan as on a CPU-only machine."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def dataset(labels=None, channels=("CT",)) -> Dataset:
    return Dataset(
        Path("/nowhere"), Path("/nowhere/dataset.json"), "t", labels or LABELS, tuple(channels), ()
    )


def fingerprint(spacings, shapes, n_channels=1) -> dict:
    """A hand-built fingerprint: cases with RAS spacings / shapes after crop; foreground HU quantiles of a
    uniform -100..200 distribution (so the 0.5 / 99.5 percentiles are -98.5 / 198.5), mean 50, std 80."""
    ids = [f"c{i:02d}" for i in range(len(spacings))]
    quantiles = list(-100 + 3.0 * QUANTILE_GRID)
    return {
        "case_ids": ids,
        "cases": {
            cid: {"spacing_ras_mm": list(sp), "shape_after_crop": list(sh), "n_channels": n_channels}
            for cid, sp, sh in zip(ids, spacings, shapes, strict=True)
        },
        "foreground_intensity": [{"mean": 50.0, "std": 80.0, "quantiles": quantiles}] * n_channels,
    }


def default_like(n=30):
    """The default synthetic data: 128 x 128 x 40 at 0.8 x 0.8 x 2.5 mm, ~30 CT cases."""
    return fingerprint([(0.8, 0.8, 2.5)] * n, [(128, 128, 40)] * n)


def planned(*args) -> dict:
    """make_plan's Plan as the JSON dict plan.json holds."""
    return make_plan(*args).to_dict()


def test_target_spacing_anisotropic_axis_uses_10th_percentile():
    """Median z 5.0 mm > 3 x 0.8 mm: z takes the 10th percentile of [3, 4, 5 x 9] = 4.0 mm."""
    spacings = [(0.8, 0.8, 3.0), (0.8, 0.8, 4.0)] + [(0.8, 0.8, 5.0)] * 9
    assert target_spacing(np.array(spacings)) == pytest.approx([0.8, 0.8, 4.0])
    plan = planned(fingerprint(spacings, [(128, 128, 30)] * 11), dataset(), config_from_dict({}))
    assert plan["target_spacing_mm"] == pytest.approx([0.8, 0.8, 4.0]) and plan["anisotropic"]


def test_target_spacing_isotropic_enough_uses_median():
    """Max/min = 2 <= 3: plain per-axis median."""
    spacings = [(0.7, 0.8, 1.4), (0.9, 0.8, 1.6), (0.8, 0.8, 2.0)]
    assert target_spacing(np.array(spacings)) == pytest.approx([0.8, 0.8, 1.6])


def test_target_spacing_never_finer_than_the_other_axes():
    """Median z 6 mm; the 10th percentile of [0.5, 0.5, 6 x 9] is 0.5 mm < 1.0 mm in-plane: clamp to 1 mm."""
    spacings = [(1.0, 1.0, 0.5)] * 2 + [(1.0, 1.0, 6.0)] * 9
    assert target_spacing(np.array(spacings)) == pytest.approx([1.0, 1.0, 1.0])


def test_default_data_cpu_budget():
    """CPU budget 0.25 M voxels: patch 64 x 80 x 24 (median 128 x 128 x 40), batch 2, 5 stages, 8..128 filters."""
    plan = planned(default_like(), dataset(), config_from_dict({}))
    assert plan["budget"]["kind"] == "cpu" and plan["budget"]["requested"] == "auto"
    assert plan["target_spacing_mm"] == pytest.approx([0.8, 0.8, 2.5])
    assert plan["median_shape"] == [128, 128, 40]
    assert plan["patch_size"] == [64, 80, 24] and plan["batch_size"] == 2
    assert np.prod(plan["patch_size"]) * plan["batch_size"] <= 0.25e6
    net = plan["network"]
    assert net["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert net["kernel_sizes"][0] == [3, 3, 1]  # z is > 2x coarser than x, y at full resolution
    assert net["filters"] == [8, 16, 32, 64, 128]
    pools = np.sum(np.log2(net["strides"]), axis=0).astype(int)
    assert all(p % 2**k == 0 for p, k in zip(plan["patch_size"], pools, strict=True))
    assert plan["n_classes"] == 3 and plan["labels"] == {"0": "background", "1": "liver", "2": "lesion"}
    assert plan["lesion_labels"] == [2] and plan["orientation"] == "RAS" and plan["channel_names"] == ["CT"]


def test_gpu_budget_takes_the_whole_median_shape():
    cfg = config_from_dict({"preprocess": {"memory_budget": "gpu", "gpu_budget_gb": 10}})
    plan = planned(default_like(), dataset(), cfg)
    assert plan["patch_size"] == [128, 128, 40] and plan["batch_size"] >= 2
    assert np.prod(plan["patch_size"]) * plan["batch_size"] <= plan["budget"]["voxels"]
    assert plan["network"]["filters"] == [32, 64, 128, 256, 320, 320]  # nnU-Net's width, 6 stages


def test_auto_budget_plans_for_the_gpu_when_cuda_is_present(monkeypatch):
    import torch

    assert resolve_budget_kind("auto", cuda_available=True) == "gpu"
    assert resolve_budget_kind("auto", cuda_available=False) == "cpu"
    assert resolve_budget_kind("cpu", cuda_available=True) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plan = planned(default_like(), dataset(), config_from_dict({}))
    assert plan["budget"] == {"kind": "gpu", "requested": "auto", "voxels": pytest.approx(10e9 / (64 * 32)),
                              "patch_voxels_x_batch": 128 * 128 * 40 * 2}
    assert plan["network"]["filters"] == [32, 64, 128, 256, 320, 320]


def test_gpu_plan_for_1mm_brain_mri_is_nnunet_sized():
    """1 mm isotropic scans of 160 x 192 x 160 voxels (MS FLAIR): nnU-Net v2 plans 112 x 160 x 128, batch 2,
    6 stages, 32..320 filters for them (its VRAM model). Ours: the same number of voxels within 25 %, same
    depth and width."""
    fp = fingerprint([(1.0, 1.0, 1.0)] * 4, [(160, 192, 160)] * 4)
    plan = planned(fp, dataset(channels=("FLAIR",)), config_from_dict({"preprocess": {"memory_budget": "gpu"}}))
    assert abs(np.prod(plan["patch_size"]) / (112 * 160 * 128) - 1) < 0.25, plan["patch_size"]
    assert plan["batch_size"] == 2
    assert plan["network"]["filters"] == [32, 64, 128, 256, 320, 320]
    assert plan["network"]["strides"][0] == [1, 1, 1]


def test_cpu_width_and_config_override():
    cfg = config_from_dict({"preprocess": {"cpu_base_filters": 16, "cpu_max_filters": 64}})
    assert planned(default_like(), dataset(), cfg)["network"]["filters"] == [16, 32, 64, 64, 64]
    cfg = config_from_dict({"preprocess": {"memory_budget": "gpu"}, "train": {"model": {"base_filters": 4,
                                                                                         "max_filters": 16}}})
    plan = planned(default_like(), dataset(), cfg)
    assert plan["network"]["filters"] == [4, 8, 16, 16, 16, 16]  # 128 x 128 x 40: 6 stages
    assert plan["budget"]["voxels"] == pytest.approx(10e9 / (64 * 4))  # the GPU budget follows the width


@pytest.mark.parametrize("budget", [0.05, 0.25, 1.0, 4.0])
def test_patch_within_budget_and_median_shape(budget):
    fp = fingerprint([(0.7, 0.7, 1.5)] * 5, [(512, 512, 300)] * 5)
    cfg = config_from_dict(
        {"preprocess": {"target_spacing_mm": [1.5, 1.5, 1.5], "cpu_budget_mvoxels": budget}}
    )
    plan = planned(fp, dataset(), cfg)
    assert plan["median_shape"] == [239, 239, 300]
    patch = plan["patch_size"]
    assert all(16 <= p <= m for p, m in zip(patch, plan["median_shape"], strict=True))
    assert np.prod(patch) * plan["batch_size"] <= budget * 1e6 and plan["batch_size"] >= 2


def test_patch_never_exceeds_a_tiny_median_shape():
    """Scans of 12 x 12 x 8 voxels: the patch is the whole scan (below 16 where the image is smaller)."""
    plan = planned(fingerprint([(1.0, 1.0, 1.0)] * 3, [(12, 12, 8)] * 3), dataset(), config_from_dict({}))
    assert plan["patch_size"] == [12, 12, 8]


def test_overrides():
    cfg = config_from_dict(
        {"preprocess": {"target_spacing_mm": [1.0, 1.0, 2.0], "patch_size": [96, 96, 200], "batch_size": 3}}
    )
    plan = planned(default_like(), dataset(), cfg)
    assert plan["target_spacing_mm"] == [1.0, 1.0, 2.0]
    assert plan["median_shape"] == [102, 102, 50]
    assert plan["patch_size"] == [96, 96, 48]  # z clipped to the median 50, then divisible by 2**3
    assert plan["patch_size_requested"] == [96, 96, 200] and plan["batch_size"] == 3


def test_depth_from_config_limits_the_stages():
    plan = planned(default_like(), dataset(), config_from_dict({"train": {"model": {"depth": 3}}}))
    assert len(plan["network"]["strides"]) == 3 and len(plan["network"]["filters"]) == 3


def test_intensity_ct_and_zscore():
    """CT: clip at the pooled foreground 0.5 / 99.5 percentiles (-98.5 / 198.5 HU), mean 50, std 80."""
    plan = planned(default_like(), dataset(), config_from_dict({}))
    assert plan["intensity"] == [
        {"scheme": "ct", "clip": pytest.approx([-98.5, 198.5]), "mean": 50.0, "std": 80.0}
    ]
    fp = fingerprint([(1.0, 1.0, 1.0)] * 3, [(64, 64, 64)] * 3, n_channels=2)
    plan = planned(fp, dataset(channels=("T2", "ADC")), config_from_dict({}))
    assert [c["scheme"] for c in plan["intensity"]] == ["zscore", "zscore"]
    assert plan["intensity"][0]["clip"] is None and plan["intensity"][0]["mean"] is None


def test_non_consecutive_labels_are_refused_with_a_hint():
    with pytest.raises(PlanError, match=r"consecutive 0..K-1, got \[0, 1, 4\].*data.label_remap.*\{4: 2\}"):
        make_plan(default_like(), dataset({0: "bg", 1: "liver", 4: "lesion"}), config_from_dict({}))


def test_channel_count_mismatch():
    with pytest.raises(PlanError, match="1 channels but the data set names 2"):
        make_plan(default_like(), dataset(channels=("T2", "ADC")), config_from_dict({}))


def test_topology_spacing_rule():
    """At (0.8, 0.8, 2.5) mm z is not pooled until x and y have been (spacing within 2x of the finest)."""
    topo = network_topology([64, 64, 32], [0.8, 0.8, 2.5], max_stages=6)
    assert topo["strides"][1] == [2, 2, 1] and topo["strides"][2] == [2, 2, 2]
    assert topo["pools"] == [4, 4, 3]


def test_plan_is_deterministic_and_hash_tracks_settings():
    cfg = config_from_dict({})
    a, b = make_plan(default_like(), dataset(), cfg), make_plan(default_like(), dataset(), cfg)
    assert a == b and plan_hash(a, cfg.preprocess) == plan_hash(b, cfg.preprocess)
    other = config_from_dict({"preprocess": {"image_order": 1}})
    assert plan_hash(a, other.preprocess) != plan_hash(a, cfg.preprocess)
    assert plan_hash(a, config_from_dict({"preprocess": {"workers": 7}}).preprocess) == plan_hash(
        a, cfg.preprocess
    )
