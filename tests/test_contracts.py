"""pipeline/contracts.py: Plan, CaseRecord and OperatingPoint round-trip through JSON, are frozen, and
refuse unknown / missing / mistyped keys naming the key (and the file)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydantic
import pytest

from pipeline.config import PreprocessConfig, config_from_dict
from pipeline.contracts import CaseRecord, ContractError, NetworkPlan, OperatingPoint, Plan
from pipeline.io.volume import Volume, make_affine
from tests.contract_examples import PLAN_JSON

# plan_hash of PLAN_JSON with the default preprocess settings, computed by the dict-based code: outputs
# preprocessed before the Plan type keep their hash, so the stage does not recompute them
OLD_PLAN_HASH = "f18f92784f96bb64"


def _roundtrip(obj):
    back = type(obj).from_json(obj.to_json())
    assert back == obj and back.to_dict() == obj.to_dict()
    return back


# ------------------------------------------------------------------------------------------------- plan


def test_plan_round_trips_and_keeps_the_file_layout():
    plan = Plan.from_dict(PLAN_JSON)
    assert plan.to_dict() == PLAN_JSON  # same keys and values as plan.json before the type
    _roundtrip(plan)
    assert plan.network.strides[1] == (2, 2, 1) and plan.intensity[0].clip == (-98.5, 198.5)
    assert plan.n_channels == 1 and plan.anisotropic_axis == 2


def test_plan_anisotropic_axis():
    """The thick-slice axis of the target grid by the one rule (pipeline/spacing.py): the unique coarsest axis
    when max / min spacing > the plan's anisotropy ratio (3)."""
    assert Plan.from_dict({**PLAN_JSON, "target_spacing_mm": [5.0, 1.0, 1.0]}).anisotropic_axis == 0
    assert Plan.from_dict({**PLAN_JSON, "target_spacing_mm": [1.0, 1.0, 2.9]}).anisotropic_axis is None
    assert Plan.from_dict({**PLAN_JSON, "target_spacing_mm": [2.5, 2.5, 0.8]}).anisotropic_axis is None  # a tie


def test_plan_is_frozen():
    plan = Plan.from_dict(PLAN_JSON)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        plan.batch_size = 4
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        plan.network.strides = ()


@pytest.mark.parametrize("change, key, message", [
    ({"patch_sise": [1, 2, 3]}, "patch_sise", "Extra inputs are not permitted"),
    ({"n_classes": "three"}, "n_classes", "valid integer"),
    ({"network": {**PLAN_JSON["network"], "strides": [[1, 1]]}}, "network.strides.0.2", "Field required"),
    ({"intensity": [{"scheme": "hu", "clip": None, "mean": None, "std": None}]}, "intensity.0.scheme", "'ct'"),
])
def test_plan_errors_name_the_key(change, key, message):
    with pytest.raises(ContractError, match=rf"plan\.json: {key}: .*{message}"):
        Plan.from_dict({**PLAN_JSON, **change}, "plan.json")


def test_plan_missing_key_is_named():
    broken = {k: v for k, v in PLAN_JSON.items() if k != "target_spacing_mm"}
    with pytest.raises(ContractError, match="plan.json: target_spacing_mm: Field required"):
        Plan.from_dict(broken, "plan.json")


def test_plan_loader_names_the_file(tmp_path):
    from pipeline.preprocessing.plan import load_plan

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(PLAN_JSON))
    assert load_plan(path) == Plan.from_dict(PLAN_JSON)
    path.write_text(json.dumps({**PLAN_JSON, "batch_size": "many"}))
    with pytest.raises(ContractError, match=rf"{path}: batch_size: "):
        load_plan(path)
    path.write_text("{not json")
    with pytest.raises(ContractError, match=rf"{path}: not valid JSON"):
        load_plan(path)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'none.json'}: Plan file not found"):
        load_plan(tmp_path / "none.json")  # a ContractError too; the CLI exits 3 (missing input)
    with pytest.raises(ContractError, match=rf"{tmp_path}: cannot read the Plan"):
        load_plan(tmp_path)  # a folder


def test_plan_hash_is_unchanged_for_the_same_plan():
    from pipeline.preprocessing.plan import plan_hash

    assert plan_hash(Plan.from_dict(PLAN_JSON), PreprocessConfig()) == OLD_PLAN_HASH
    # the hash ignores what does not change a case's bytes, and sees what does
    assert plan_hash(Plan.from_dict({**PLAN_JSON, "batch_size": 7}), PreprocessConfig()) == OLD_PLAN_HASH
    assert plan_hash(Plan.from_dict({**PLAN_JSON, "target_spacing_mm": [1, 1, 2.5]}),
                     PreprocessConfig()) != OLD_PLAN_HASH


def test_make_plan_returns_the_plan_with_the_old_hash():
    from pipeline.preprocessing.plan import make_plan, plan_hash
    from tests.preprocessing.test_plan import dataset, default_like

    cfg = config_from_dict({"preprocess": {"memory_budget": "cpu"}})  # no CUDA question
    plan = make_plan(default_like(), dataset(), cfg)
    assert isinstance(plan, Plan)
    assert plan.to_dict() == {**PLAN_JSON, "budget": {**PLAN_JSON["budget"], "requested": "cpu"}}
    assert plan_hash(plan, cfg.preprocess) == OLD_PLAN_HASH


def test_network_plan_without_filters_keeps_its_layout():
    """Plans before version 2 have no filters: read and written back, the key stays absent."""
    old = {"strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2}
    net = NetworkPlan.from_dict(old)
    assert net.filters is None and net.to_dict() == old


# ------------------------------------------------------------------------------------------ case record


@pytest.fixture(scope="module")
def preprocessed():
    """A one-channel CT scan in LPS axes with a border to crop, preprocessed to 1 x 1 x 2.5 mm."""
    from pipeline.preprocessing.transform import preprocess_case

    rng = np.random.default_rng(0)
    data = np.zeros((1, 20, 18, 8), np.float32)
    data[:, 2:18, 3:15, 1:7] = rng.normal(40, 10, (1, 16, 12, 6))
    label = np.zeros((1, 20, 18, 8), np.uint8)
    label[0, 8:12, 6:10, 3:5] = 2
    affine = make_affine((0.9, 0.8, 3.0), (10.0, -5.0, 2.0), np.diag([-1.0, -1.0, 1.0]))
    plan = Plan.from_dict({**PLAN_JSON, "target_spacing_mm": [1.0, 1.0, 2.5]})
    return preprocess_case(Volume(data, affine), Volume(label, affine), plan, PreprocessConfig())


def test_preprocess_case_returns_volumes_on_the_records_grid(preprocessed):
    image, label, record = preprocessed
    assert isinstance(record, CaseRecord) and isinstance(image, Volume) and isinstance(label, Volume)
    assert image.shape == label.shape == record.shape and label.n_channels == 1
    np.testing.assert_array_equal(image.affine, record.affine_array)
    np.testing.assert_array_equal(label.affine, record.affine_array)
    assert image.spacing == pytest.approx(record.spacing_mm)
    assert record.original.axcodes == "LPS" and record.orientation.axcodes == "RAS"


def test_case_record_round_trips(preprocessed):
    _, _, record = preprocessed
    back = _roundtrip(record)
    assert back.crop.box == record.crop.box and back.intensity[0].scheme == "ct"
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        record.spacing_mm = (1.0, 1.0, 1.0)


def test_invert_case_takes_the_record_read_back_from_json(preprocessed):
    from pipeline.preprocessing.transform import invert_case

    _, label, record = preprocessed
    back = invert_case(label, CaseRecord.from_json(record.to_json()), "label")
    assert back.shape == tuple(record.original.shape)
    np.testing.assert_array_equal(back.affine, record.original_affine)


def test_stage_record_file_keeps_its_layout(preprocessed, tmp_path):
    """cases/<id>.json: the stage's fields first, then preprocess_case's, the keys they always had."""
    from pipeline.contracts import CaseFiles, CaseSource

    _, _, record = preprocessed
    stored = record.stored("a", "f18f92784f96bb64", CaseSource(images=("imagesTr/a.nii.gz",), label=None,
                                                              sha256="00"), CaseFiles(image="a_image.npy", label=None))
    assert list(stored.to_dict()) == [
        "case_id", "plan_hash", "source", "files", "version", "original", "orientation", "crop", "resample",
        "intensity", "n_classes", "has_label", "shape", "spacing_mm", "affine"]
    assert list(record.to_dict())[0] == "version"  # preprocess_case's record has no stage fields
    path = tmp_path / "a.json"
    path.write_text(stored.to_json())
    assert CaseRecord.load(path) == stored


def test_record_without_spacing_is_an_error_naming_the_file(preprocessed, tmp_path):
    """The old reader fell back to 1 mm when ``spacing_mm`` was missing; now the record is refused."""
    from pipeline.training.data import load_preprocessed

    _, _, record = preprocessed
    cases = tmp_path / "cases"
    cases.mkdir()
    np.save(cases / "a_image.npy", np.zeros((1, 4, 4, 4), np.float32))
    np.save(cases / "a_label.npy", np.zeros((4, 4, 4), np.uint8))
    broken = {k: v for k, v in record.to_dict().items() if k != "spacing_mm"}
    (cases / "a.json").write_text(json.dumps(broken))
    with pytest.raises(ContractError, match=rf"{cases / 'a.json'}: spacing_mm: Field required"):
        load_preprocessed(tmp_path, ["a"])
    (cases / "a.json").write_text(json.dumps({"case_id": "a", "target_spacing_mm": [1, 1, 1]}))
    with pytest.raises(ContractError, match=r"a\.json: target_spacing_mm: Extra inputs"):
        load_preprocessed(tmp_path, ["a"])
    (cases / "a.json").write_text(record.to_json())
    (case,) = load_preprocessed(tmp_path, ["a"])
    assert case.spacing_mm == record.spacing_mm


# -------------------------------------------------------------------------------------- operating point


def test_evaluation_operating_point_round_trips_with_its_counts():
    op = OperatingPoint(target_fp_rate=1.0, threshold=0.4, fps_per_scan=0.75, sensitivity=0.8, precision=4 / 7,
                        tp=4, fp=3)
    assert op.to_dict() == {"target_fp_rate": 1.0, "threshold": 0.4, "fps_per_scan": 0.75, "sensitivity": 0.8,
                            "precision": 4 / 7, "tp": 4, "fp": 3}
    _roundtrip(op)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        op.threshold = 0.1


def test_validation_operating_point_has_no_counts():
    """What training stores (checkpoints, train_summary.json): four keys, as before the type."""
    op = OperatingPoint(target_fp_rate=1.0, threshold=0.3, fps_per_scan=1.0, sensitivity=0.5)
    assert set(op.to_dict()) == {"target_fp_rate", "threshold", "sensitivity", "fps_per_scan"}
    assert _roundtrip(op).tp is None


def test_operating_point_without_candidates_is_null_in_json_and_applies_no_filter():
    op = OperatingPoint(target_fp_rate=1.0, threshold=math.inf, fps_per_scan=0.0, sensitivity=math.nan,
                        precision=math.nan, tp=0, fp=0)
    data = op.to_dict()
    assert data["threshold"] is None and data["sensitivity"] is None and data["precision"] is None
    json.dumps(data, allow_nan=False)  # strict JSON
    back = OperatingPoint.from_dict(json.loads(json.dumps(data)))
    assert back.threshold == math.inf and math.isnan(back.sensitivity) and back.score_threshold is None
    assert OperatingPoint(target_fp_rate=1.0, threshold=0.2, fps_per_scan=0, sensitivity=1).score_threshold == 0.2


def test_operating_point_errors_name_the_key():
    with pytest.raises(ContractError, match="best.pt: fps_per_scan: Field required"):
        OperatingPoint.from_dict({"target_fp_rate": 1.0, "threshold": 0.5, "sensitivity": 1.0}, "best.pt")
    with pytest.raises(ContractError, match="best.pt: members: Extra inputs"):
        OperatingPoint.from_dict({"target_fp_rate": 1, "threshold": 0.5, "fps_per_scan": 1, "sensitivity": 1,
                                  "members": 2}, "best.pt")
    with pytest.raises(ContractError, match="threshold: Input should be a valid number"):
        OperatingPoint.from_dict({"target_fp_rate": 1, "threshold": "high", "fps_per_scan": 1, "sensitivity": 1})


def test_froc_operating_points_are_the_contract_type():
    from pipeline.evaluation.froc import froc_curve, operating_points

    (op,) = operating_points(froc_curve(np.array([0.9, 0.4]), np.array([0.5]), n_scans=1), [1.0])
    assert isinstance(op, OperatingPoint)
    assert op.to_dict() == {"target_fp_rate": 1.0, "threshold": 0.4, "fps_per_scan": 1.0, "sensitivity": 1.0,
                            "precision": pytest.approx(2 / 3), "tp": 2, "fp": 1}


def test_contracts_module_sits_at_the_bottom():
    """contracts imports nothing of the pipeline but the spacing rule (so every layer may use it)."""
    import ast

    tree = ast.parse((Path(__file__).parents[1] / "pipeline" / "contracts.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("pipeline")} == {"pipeline.spacing"}


def test_checkpoint_plan_and_operating_point_are_validated_on_load(tmp_path):
    """Checkpoints hold plain dicts (weights_only loading); loading validates them back into their types."""
    from pipeline.config import Config
    from pipeline.inference.loaded_model import load_model
    from pipeline.model.checkpoint import CheckpointError, save_checkpoint

    path = tmp_path / "best.pt"
    broken = {k: v for k, v in PLAN_JSON.items() if k != "n_classes"}
    save_checkpoint(path, {"model": {}, "config": Config().to_dict(), "plan": broken, "operating_point": None})
    with pytest.raises(CheckpointError, match=r"best\.pt \(plan saved in the checkpoint\): n_classes: Field required"):
        load_model(path, "cpu")
    save_checkpoint(path, {"model": {}, "config": Config().to_dict(), "plan": PLAN_JSON,
                           "operating_point": {"threshold": 0.5}})
    with pytest.raises(CheckpointError, match=r"operating point saved in the checkpoint\): target_fp_rate: Field"):
        load_model(path, "cpu")


def test_grid_record_inverts_to_the_same_array():
    """The record of a scan left on its grid maps a prediction back unchanged (identity geometry)."""
    from pipeline.preprocessing.transform import grid_record, invert_case

    labels = np.random.default_rng(0).integers(0, 3, (6, 5, 4)).astype(np.uint8)
    record = grid_record(labels.shape, (1.5, 1.5, 3.0), n_classes=3, case_id="a")
    back = invert_case(labels, CaseRecord.from_json(record.to_json()), "label")
    np.testing.assert_array_equal(back.data[0], labels)
    np.testing.assert_array_equal(back.affine, np.diag([1.5, 1.5, 3.0, 1.0]))
    assert record.case_id == "a" and record.spacing_mm == (1.5, 1.5, 3.0)
