"""`predict` writes probability and label maps in the input's exact geometry, for every format.

A tiny model is planned on a tiny synthetic data set (real fingerprint + plan) and saved untrained: the
geometry contract does not depend on the weights. Each input is an oblique, anisotropic scan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from pipeline.config import Config, EvaluationConfig, config_from_dict
from pipeline.inference.label_map import candidate_label_map
from pipeline.inference.loaded_model import load_model
from pipeline.io import Volume, make_affine, read_volume, write_volume
from pipeline.model.checkpoint import CheckpointError
from pipeline.stages.predict import run as predict_paths

from .tiny_model import random_checkpoint, tiny_plan

TINY = {"data": {"synthetic": {"n_cases": 4, "shape": [40, 36, 12], "lesion_free_fraction": 0.0}},
        "train": {"model": {"base_filters": 4, "max_filters": 16}}, "tracking": {"enabled": False},
        "inference": {"overlap": 0.25}}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    cfg = config_from_dict({**TINY, "paths": {"raw": str(root / "raw")}})
    return random_checkpoint(root / "best.pt", cfg, tiny_plan(cfg))


def _oblique_scan(shape=(45, 38, 13), spacing=(0.7, 0.9, 2.7)) -> Volume:
    rng = np.random.default_rng(3)
    direction = Rotation.from_euler("xyz", [12, -7, 20], degrees=True).as_matrix()
    data = rng.normal(40, 30, size=(1, *shape)).astype(np.int16)
    return Volume(data, make_affine(spacing, (-31.37, 12.9, -80.123), direction))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_predict_keeps_input_geometry_and_format(model_path, tmp_path, suffix):
    scan = _oblique_scan()
    src = write_volume(tmp_path / "in" / f"case{suffix}", scan)
    predict_paths(Config(**{"inference": {"overlap": 0.25}}), model_path, src, tmp_path / "out", progress=False)
    for kind in ("probabilities", "labels"):
        out = read_volume(tmp_path / "out" / kind / f"case{suffix}")
        assert out.shape == scan.shape
        np.testing.assert_allclose(out.affine, scan.affine, atol=1e-6)
    prob = read_volume(tmp_path / "out" / "probabilities" / f"case{suffix}").data
    assert prob.dtype == np.float32 and 0.0 <= prob.min() and prob.max() <= 1.0


def test_predict_dicom_series_writes_nifti_on_its_grid(model_path, tmp_path):
    scan = _oblique_scan(shape=(30, 28, 6))
    img = sitk.GetImageFromArray(scan.data[0].T)
    lps = np.diag([-1.0, -1.0, 1.0])
    m = lps @ scan.affine[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((m / spacing).ravel().tolist())
    img.SetOrigin((lps @ scan.affine[:3, 3]).tolist())
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = img.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (direction[0], direction[3], direction[6],
                                                   direction[1], direction[4], direction[7]))
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        sl.SetMetaData("0020|0037", orientation)
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.10f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        sl.SetMetaData("0020|0013", str(k))
        sl.SetMetaData("0028|0030", f"{spacing[1]:.10f}\\{spacing[0]:.10f}")
        sl.SetMetaData("0018|0050", f"{spacing[2]:.10f}")
        sl.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    source = read_volume(folder)
    predict_paths(Config(), model_path, folder, tmp_path / "out", progress=False)
    out = read_volume(tmp_path / "out" / "labels" / "dicom.nii.gz")
    assert out.shape == source.shape
    np.testing.assert_allclose(out.affine, source.affine, atol=1e-6)


def test_predict_rejects_wrong_channel_count_naming_the_problem(model_path, tmp_path):
    scan = _oblique_scan()
    two = Volume(np.concatenate([scan.data, scan.data]), scan.affine)
    src = write_volume(tmp_path / "two.nii.gz", two)
    with pytest.raises(ValueError, match="2 channel"):
        predict_paths(Config(), model_path, src, tmp_path / "out", progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_model(bad, "cpu")


def test_postprocessing_removes_small_and_low_score_candidates_but_keeps_every_other_lesion():
    """Three lesion components: big and confident (kept), big but below the score threshold (removed),
    confident but below the minimum volume (removed). Never 'largest component only'."""
    labels = np.zeros((20, 20, 20), np.uint8)
    probs = np.zeros((3, 20, 20, 20), np.float32)
    probs[0] = 1.0
    lesion = np.zeros((20, 20, 20), np.float32)
    for box, score in (((slice(1, 5),) * 3, 0.9), ((slice(8, 12),) * 3, 0.3), ((slice(15, 16),) * 3, 0.95)):
        labels[box] = 2
        lesion[box] = score
        probs[:, box[0], box[1], box[2]] = np.array([1 - score, 0, score])[:, None, None, None]
    second = labels.copy()
    second[1:5, 15:19, 15:19] = 2  # another confident lesion: both big ones must survive
    lesion[1:5, 15:19, 15:19] = 0.9
    out = candidate_label_map(probs, lesion, [2], EvaluationConfig(extraction="static"), threshold=0.5,
                              voxel_volume_mm3=1.0, min_volume_mm3=8.0)
    assert (out[1:5, 1:5, 1:5] == 2).all() and (out[1:5, 15:19, 15:19] == 2).all()
    assert (out[8:12, 8:12, 8:12] != 2).all()  # score 0.3 < 0.5
    assert (out[15, 15, 15] != 2)  # 1 mm^3 < 8 mm^3
