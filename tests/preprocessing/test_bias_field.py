"""N4 bias-field correction: removes a smooth multiplicative field, keeps zeros, refuses normalised data; its
plan entry, its place in preprocess_case and its record."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import PreprocessConfig, config_from_dict
from pipeline.contracts import ContractError
from pipeline.io.volume import Volume, make_affine
from pipeline.preprocessing.bias_field import n4_correct, shrink_factors
from pipeline.preprocessing.normalize import resolve_bias_field
from pipeline.preprocessing.transform import invert_case, preprocess_case
from tests.contract_examples import plan_with

from .test_plan import dataset, fingerprint, planned

SPACING = (1.5, 1.5, 3.0)
N4 = {"method": "n4", "grid_mm": 4.0, "iterations": [50, 50, 50, 50]}
ZSCORE = {"scheme": "zscore", "clip": None, "mean": None, "std": None}


def two_tissue_head(shape=(48, 48, 20), seed=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An MR-like ``(X, Y, Z)`` scan: an ellipsoid 'head' of two tissues (300 inside a 'white matter'
    core, 200 around it; noise sd 5) in zero air, times a smooth field rising 0.7 -> 1.3 along X and
    0.85 -> 1.15 along Y. Returns ``(scan, tissue label 0/1/2, field)``."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = x**2 + y**2 + (z / 1.2) ** 2
    tissue = np.where(radius < 0.35, 2, np.where(radius < 0.8, 1, 0)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    clean = np.where(tissue == 2, 300.0, np.where(tissue == 1, 200.0, 0.0)) + rng.normal(0, 5, shape) * (tissue > 0)
    field = (1.0 + 0.3 * x) * (1.0 + 0.15 * y)
    return (clean * field).astype(np.float32), tissue, field


def cv(values: np.ndarray) -> float:
    """Coefficient of variation (sd / mean, unitless)."""
    return float(values.std() / values.mean())


def test_n4_removes_a_smooth_field_and_keeps_the_tissue_contrast():
    """Inside each tissue the field makes the intensity vary by up to +-30 %; N4 brings the coefficient of
    variation down to a third or less and keeps the core / rim ratio near 1.5 (measured: rim 0.151 -> 0.026,
    core 0.090 -> 0.018, ratio 1.49, field 0.72-1.30 against the true 0.60-1.50 over the box)."""
    scan, tissue, _ = two_tissue_head()
    corrected, info = n4_correct(scan, SPACING)
    assert corrected.shape == scan.shape and corrected.dtype == np.float32
    for t in (1, 2):
        before, after = cv(scan[tissue == t]), cv(corrected[tissue == t])
        assert before > 0.08 and after <= before / 3, (t, before, after)
    ratio = corrected[tissue == 2].mean() / corrected[tissue == 1].mean()
    assert ratio == pytest.approx(1.5, rel=0.1)
    assert info["method"] == "n4" and info["shrink"] == [3, 3, 1] and info["iterations"] == [50, 50, 50, 50]
    lo, hi = info["field_range"]
    assert lo < 0.9 and hi > 1.1 and info["mask_voxels"] > 0


def test_n4_keeps_zeros_the_level_and_is_deterministic():
    scan, tissue, _ = two_tissue_head()
    first, _ = n4_correct(scan, SPACING)
    second, _ = n4_correct(scan.astype(np.float64), SPACING)
    assert np.array_equal(first, second)  # same bytes on every run (and from any input dtype)
    assert np.all(first[scan == 0] == 0) and np.all(first[scan > 0] > 0)
    # the field is centred on the head: the corrected mean inside it stays near the uncorrected one
    assert first[tissue > 0].mean() == pytest.approx(scan[tissue > 0].mean(), rel=0.1)


def test_n4_without_a_field_changes_little():
    """A scan with no field comes back within 5 % voxel by voxel, 2 % on average (N4 finds next to nothing to
    remove; measured 3.7 % at most)."""
    scan, tissue, field = two_tissue_head()
    flat = (scan / field).astype(np.float32)
    corrected, _ = n4_correct(flat, SPACING)
    inside = tissue > 0
    change = np.abs(corrected[inside] / flat[inside] - 1)
    assert change.max() < 0.05 and change.mean() < 0.02


def test_n4_refuses_negative_and_non_finite_values_and_passes_constant_scans():
    scan, _, _ = two_tissue_head()
    with pytest.raises(ValueError, match=r"non-negative MRI magnitudes.*minimum is -3\.6.*bias_field to none"):
        n4_correct(scan - 3.6, SPACING)
    bad = scan.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        n4_correct(bad, SPACING)
    with pytest.raises(ValueError, match="3-D channel"):
        n4_correct(scan[None], SPACING)
    constant = np.full((8, 8, 8), 5.0, np.float32)
    out, info = n4_correct(constant, SPACING)
    assert np.array_equal(out, constant) and info["method"] == "none"


def test_shrink_factors_follow_the_grid_and_keep_four_voxels():
    assert shrink_factors((0.72, 0.72, 3.0), 4.0, (300, 300, 50)) == [6, 6, 1]
    assert shrink_factors((1.0, 1.0, 1.0), 4.0, (12, 100, 100)) == [3, 4, 4]
    assert shrink_factors((5.0, 5.0, 5.0), 4.0, (30, 30, 30)) == [1, 1, 1]


def test_resolve_bias_field_per_channel_and_refused_on_ct():
    pre = PreprocessConfig(intensity={"bias_field": ["n4"], "n4_grid_mm": 5.0, "n4_iterations": [20, 10]})
    assert resolve_bias_field(["FLAIR", "T1"], ["zscore", "zscore"], pre.intensity) == [
        {"method": "n4", "grid_mm": 5.0, "iterations": [20, 10]}] * 2
    mixed = PreprocessConfig(intensity={"bias_field": ["none", "n4"]}).intensity
    assert resolve_bias_field(["CT", "T1"], ["ct", "zscore"], mixed)[0] is None
    with pytest.raises(ValueError, match="n4 on the CT channel 'CT'.*no bias field"):
        resolve_bias_field(["CT"], ["ct"], pre.intensity)
    with pytest.raises(ValueError, match="3 entries but the data set has 2 channels"):
        resolve_bias_field(["a", "b"], ["zscore"] * 2,
                           PreprocessConfig(intensity={"bias_field": ["n4"] * 3}).intensity)


def test_config_refuses_empty_entries():
    with pytest.raises(ValueError, match="bias_field needs one entry"):
        PreprocessConfig(intensity={"bias_field": []})
    with pytest.raises(ValueError, match="n4_iterations"):
        PreprocessConfig(intensity={"n4_iterations": [0]})


def test_plan_names_the_correction_only_when_asked():
    """Without correction the plan's intensity entries keep their keys (old plans, same hash); with it each
    MRI channel's entry carries the method, grid and iterations."""
    fp = fingerprint([(1.0, 1.0, 1.0)] * 3, [(64, 64, 64)] * 3, n_channels=2)
    plain = planned(fp, dataset(channels=("FLAIR_1", "FLAIR_2")), config_from_dict({}))
    assert all("bias_field" not in c for c in plain["intensity"])
    cfg = config_from_dict({"preprocess": {"intensity": {"bias_field": ["n4"]}}})
    corrected = planned(fp, dataset(channels=("FLAIR_1", "FLAIR_2")), cfg)
    assert [c["bias_field"] for c in corrected["intensity"]] == [N4, N4]
    with pytest.raises(ValueError, match="CT channel"):
        planned(fp, dataset(channels=("CT", "T1")), cfg)


def test_plan_contract_refuses_an_unknown_method():
    with pytest.raises(ContractError, match="intensity.0.bias_field.method"):
        plan_with(intensity=[{**ZSCORE, "bias_field": {**N4, "method": "n3"}}])


def test_preprocess_case_corrects_before_normalising_and_records_it():
    """Through preprocess_case (no resampling): the corrected channel is flatter inside each tissue than the
    uncorrected run's, the other channel is untouched, the record says what was done, and a label still
    comes back in the input's geometry."""
    scan, tissue, _ = two_tissue_head()
    affine = make_affine(SPACING)
    image = Volume(np.stack([scan, scan]), affine)
    label = Volume(tissue[None].astype(np.uint8), affine)
    plain_plan = plan_with(n_classes=3, target_spacing_mm=list(SPACING), intensity=[ZSCORE, ZSCORE])
    plan = plan_with(n_classes=3, target_spacing_mm=list(SPACING), intensity=[{**ZSCORE, "bias_field": N4}, ZSCORE])
    plain, _, _ = preprocess_case(image, label, plain_plan, PreprocessConfig())
    img, lab, record = preprocess_case(image, label, plan, PreprocessConfig())
    box = tuple(slice(lo, hi) for lo, hi in record.crop.box)
    core = tissue[box] == 2
    assert img.data[0][core].std() < 0.5 * plain.data[0][core].std()
    np.testing.assert_array_equal(img.data[1], plain.data[1])
    assert record.intensity[0].bias_field.method == "n4" and record.intensity[1].bias_field is None
    assert record.to_dict()["intensity"][0]["bias_field"]["shrink"] == [3, 3, 1]
    assert "bias_field" not in record.to_dict()["intensity"][1]
    back = invert_case(lab, record, "label")
    assert np.array_equal(back.affine, affine) and np.array_equal(back.data[0], tissue)


def test_preprocess_case_names_the_problem_for_normalised_input():
    scan, _, _ = two_tissue_head()
    plan = plan_with(n_classes=3, target_spacing_mm=list(SPACING), intensity=[{**ZSCORE, "bias_field": N4}])
    with pytest.raises(ValueError, match="non-negative MRI magnitudes"):
        preprocess_case(Volume((scan - 100)[None], make_affine(SPACING)), None, plan, PreprocessConfig())
