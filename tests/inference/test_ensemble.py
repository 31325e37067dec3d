"""pipeline/inference/ensemble.py and mirror TTA: an ensemble's probabilities are the mean of its members',
``predict --model a --model b`` writes that mean, incompatible checkpoints are refused, and mirror TTA of a
flip-equivariant network changes nothing (of one that is not, it does)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.config import Config, InferenceConfig, config_from_dict
from pipeline.contracts import OperatingPoint, Plan
from pipeline.inference.ensemble import load_ensemble, mean_operating_point
from pipeline.inference.loaded_model import load_model
from pipeline.inference.sliding_window import predict_probabilities
from pipeline.io import Volume, make_affine, read_volume, write_volume
from pipeline.model.checkpoint import CheckpointError

from .tiny_model import random_checkpoint, tiny_plan

TINY = {"data": {"synthetic": {"n_cases": 3, "shape": [40, 36, 12], "lesion_free_fraction": 0.0}},
        "train": {"model": {"name": "unet", "base_filters": 4, "max_filters": 16, "num_res_units": 0}},
        "tracking": {"enabled": False}, "inference": {"overlap": 0.25, "tta_mirror": False}}


def _checkpoint(path: Path, seed: int, threshold: float | None, plan: Plan) -> Path:
    return random_checkpoint(path, config_from_dict(TINY), plan, seed, threshold)


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Plan:
    """A real plan (fingerprint + planner) of a tiny synthetic data set: predict preprocesses with it."""
    root = tmp_path_factory.mktemp("ensemble_data")
    return tiny_plan(config_from_dict({**TINY, "paths": {"raw": str(root / "raw")}}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, plan) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ensemble")
    return _checkpoint(root / "a.pt", 0, 0.4, plan), _checkpoint(root / "b.pt", 1, 0.6, plan)


def _image(shape=(20, 18, 10), seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(1, *shape)).astype(np.float32))


def test_ensemble_probabilities_are_the_mean_of_the_members(checkpoints, plan):
    a, b = checkpoints
    inference = InferenceConfig(tta_mirror=False, overlap=0.25)
    image = _image()
    pa = load_model(a, "cpu").probabilities(image, inference)
    pb = load_model(b, "cpu").probabilities(image, inference)
    assert not torch.allclose(pa, pb)  # two different networks
    ensemble = load_ensemble([a, b], "cpu")
    torch.testing.assert_close(ensemble.probabilities(image, inference), (pa + pb) / 2, rtol=0, atol=1e-7)
    assert ensemble.operating_point.threshold == pytest.approx(0.5)
    assert ensemble.plan == plan and ensemble.lesion_labels == [2]
    assert ensemble.patch_size == plan.patch_size


def _op(threshold, fps=1.0, sensitivity=0.5) -> OperatingPoint:
    return OperatingPoint(target_fp_rate=1.0, threshold=threshold, fps_per_scan=fps, sensitivity=sensitivity)


def test_mean_operating_point_skips_members_without_a_threshold():
    """Mean threshold, FP rate and sensitivity over the members with a finite threshold."""
    mean = mean_operating_point([_op(0.2, 0.5, 0.6), None, _op(float("inf")), _op(0.4, 1.5, 0.8)])
    assert mean.threshold == pytest.approx(0.3) and mean.fps_per_scan == 1.0 and mean.sensitivity == pytest.approx(0.7)
    assert mean.target_fp_rate == 1.0 and mean.tp is None
    assert mean_operating_point([None, _op(float("nan"))]) is None


def test_checkpoints_of_another_plan_cannot_be_ensembled(checkpoints, plan, tmp_path):
    a, _ = checkpoints
    other = _checkpoint(tmp_path / "other.pt", 2, 0.5, plan.model_copy(update={"target_spacing_mm": (1.1, 1.2, 3.3)}))
    with pytest.raises(CheckpointError, match=r"other\.pt cannot be ensembled with .*a\.pt: preprocessing plans "
                                              r"differ \(target_spacing_mm\)"):
        load_ensemble([a, other], "cpu")


def test_predict_cli_with_two_models_writes_the_mean_probability_map(checkpoints, tmp_path):
    a, b = checkpoints
    rng = np.random.default_rng(4)
    scan = Volume(rng.normal(0, 1, size=(1, 22, 19, 9)).astype(np.float32),
                  make_affine((1.0, 1.0, 2.0), (3.0, -4.0, 5.0), np.eye(3)))
    src = write_volume(tmp_path / "scan.nii.gz", scan)
    maps = {}
    for name, models in (("a", [a]), ("b", [b]), ("ab", [a, b])):
        args = ["predict", "--input", str(src), "--output", str(tmp_path / name), "-q",
                "--set", "inference.tta_mirror=false", "--set", "inference.device=cpu"]
        for m in models:
            args += ["--model", str(m)]
        assert cli_main(args) == 0
        maps[name] = read_volume(tmp_path / name / "probabilities" / "scan.nii.gz")
        assert (tmp_path / name / "labels" / "scan.nii.gz").is_file()
    assert maps["ab"].shape == scan.shape and np.allclose(maps["ab"].affine, scan.affine)
    assert not np.allclose(maps["a"].data, maps["b"].data, atol=1e-4)
    np.testing.assert_allclose(maps["ab"].data, (maps["a"].data + maps["b"].data) / 2, atol=1e-6)


class _Pointwise(torch.nn.Module):
    """1x1x1 convolution: each voxel's output depends on that voxel only, so it commutes with flips."""

    def __init__(self, kernel: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 3, kernel, padding=kernel // 2)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_mirror_tta_of_a_flip_equivariant_network_equals_no_tta(mode):
    image = _image((21, 17, 11))
    plain = predict_probabilities(_Pointwise(), image, (16, 16, 8), InferenceConfig(tta_mirror=False), mode,
                                  torch.device("cpu"))
    mirrored = predict_probabilities(_Pointwise(), image, (16, 16, 8), InferenceConfig(tta_mirror=True), mode,
                                     torch.device("cpu"))
    torch.testing.assert_close(mirrored, plain, rtol=0, atol=1e-6)
    # a 3x3x3 kernel with random (asymmetric) weights is not flip-equivariant: TTA changes the result
    plain3 = predict_probabilities(_Pointwise(3), image, (16, 16, 8), InferenceConfig(tta_mirror=False), mode,
                                   torch.device("cpu"))
    mirrored3 = predict_probabilities(_Pointwise(3), image, (16, 16, 8), InferenceConfig(tta_mirror=True), mode,
                                      torch.device("cpu"))
    assert (mirrored3 - plain3).abs().max() > 1e-3


def test_mirror_tta_is_on_by_default():
    assert InferenceConfig().tta_mirror is True and Config().inference.checkpoints == ()
