"""End-to-end evaluation of hand-built scans: in memory and from folders of tiny NIfTI files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import EvaluationConfig
from pipeline.evaluation import EvaluationInputError, evaluate_cases, evaluate_folders
from pipeline.evaluation.report import write_report
from pipeline.io import Volume, write_volume
from pipeline.io.volume import make_affine

S = (16, 16, 16)
SPACING = (1.0, 1.0, 2.0)


def box(lo, hi, value, out):
    out[tuple(slice(x, y) for x, y in zip(lo, hi))] = value
    return out


def scans():
    """Four scans, five lesions, with the LUNA16 answer worked out in ``test_evaluate_cases_by_hand``."""
    out = []
    # a: two lesions, both found (0.9 and 0.6), FP 0.7
    gt, p = np.zeros(S, np.uint8), np.zeros(S, np.float32)
    box((1, 1, 1), (4, 4, 4), 1, gt), box((1, 1, 1), (4, 4, 4), 0.9, p)
    box((8, 8, 8), (12, 12, 12), 1, gt), box((8, 8, 8), (12, 12, 12), 0.6, p)
    box((13, 1, 1), (15, 3, 3), 0.7, p)
    out.append(("a", p, gt))
    # b: one lesion touching the border found at 0.8 by two candidates (0.8 and 0.3: one ignored)
    gt, p = np.zeros(S, np.uint8), np.zeros(S, np.float32)
    box((0, 0, 0), (6, 3, 3), 1, gt)
    box((0, 0, 0), (2, 3, 3), 0.8, p), box((4, 0, 0), (6, 3, 3), 0.3, p)
    out.append(("b", p, gt))
    # c: two lesions, one missed, one found at 0.5; FPs 0.95 and 0.4
    gt, p = np.zeros(S, np.uint8), np.zeros(S, np.float32)
    box((2, 2, 2), (5, 5, 5), 1, gt)
    box((10, 10, 10), (13, 13, 13), 1, gt), box((10, 10, 10), (13, 13, 13), 0.5, p)
    box((2, 10, 2), (4, 12, 4), 0.95, p), box((12, 2, 12), (14, 4, 14), 0.4, p)
    out.append(("c", p, gt))
    # d: no lesion, nothing predicted
    out.append(("d", np.zeros(S, np.float32), np.zeros(S, np.uint8)))
    return out


def test_evaluate_cases_by_hand():
    # lesion scores 0.9, 0.6, 0.8, NaN, 0.5 (5 lesions); FPs 0.95, 0.7, 0.4 (4 scans)
    # vertices (fps, sens): (0,0) 0.95 (.25, 0) 0.9 (.25, .2) 0.8 (.25, .4) 0.7 (.5, .4) 0.6 (.5, .6)
    #                       0.5 (.5, .8) 0.4 (.75, .8)
    # at 1/8: between (0, 0) and (.25, 0) -> 0; 1/4 -> .4; 1/2 -> .8; 1..8 -> .8
    # the worked answer is the static one (every box is a candidate at the fixed 0.1 level)
    cfg = EvaluationConfig(bootstrap=200, bootstrap_seed=3, extraction="static")
    r = evaluate_cases([(n, p, g, make_affine(SPACING)) for n, p, g in scans()], cfg, lesion_label=1)
    np.testing.assert_allclose(r.sensitivity_at_fp, [0.0, 0.4, 0.8, 0.8, 0.8, 0.8, 0.8])
    assert r.cpm == pytest.approx((0 + 0.4 + 5 * 0.8) / 7)
    m = r.to_metrics()
    assert m["lesions_total"] == 5 and m["scans_total"] == 4 and m["lesions_detected"] == 4
    assert m["false_positives_total"] == 3 and m["candidates_ignored"] == 1 and m["scans_with_lesions"] == 3
    assert list(m["sensitivity_at_fp"]) == ["0.125", "0.25", "0.5", "1", "2", "4", "8"]
    lo, hi = m["cpm_ci95"]
    assert 0 <= lo <= hi <= 1
    assert m["operating_point"]["target_fp_rate"] == 1.0
    assert m["operating_point"]["threshold"] == pytest.approx(0.4)
    assert m["operating_point"]["precision"] == pytest.approx(4 / 7)
    assert set(m["by_size"]) == {"<5mm", "5-10mm", ">=10mm"}
    assert sum(b["lesions"] for b in m["by_size"].values()) == 5
    assert 0 < m["dice"]["lesion"] < 1 and m["hd95_mm"]["lesion"] >= 0
    assert m["voxel_metrics"]["lesion"]["scans_evaluated"] == 3  # d: both empty, not applicable
    json.dumps(m, allow_nan=False)


def test_evaluate_cases_label_map_predictions_and_perfect_case():
    gt = box((2, 2, 2), (6, 6, 6), 1, np.zeros(S, np.uint8))
    box((9, 9, 9), (12, 12, 12), 2, gt)
    r = evaluate_cases([("x", gt.copy(), gt, make_affine(SPACING))], EvaluationConfig(bootstrap=0))
    assert r.cpm == 1.0 and r.curve.n_lesions == 2
    assert r.to_metrics()["dice"]["lesion"] == 1.0 and r.to_metrics()["cpm_ci95"] is None
    # lesion label 2 only: one lesion; the label-1 region of the prediction is not a candidate
    r2 = evaluate_cases([("x", gt.copy(), gt, make_affine(SPACING))], EvaluationConfig(bootstrap=0), lesion_label=2,
                        class_labels={1: "organ", 2: "lesion"})
    m = r2.to_metrics()
    assert m["lesions_total"] == 1 and m["false_positives_total"] == 0
    assert m["dice"] == {"organ": 1.0, "lesion": 1.0}


def _write(folder: Path, name: str, data: np.ndarray, spacing=SPACING) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.nii.gz"
    write_volume(path, Volume(data[None] if data.ndim == 3 else data, make_affine(spacing, (-10, 5, 3))))
    return path


def test_evaluate_folders_writes_all_outputs(tmp_path):
    for n, p, g in scans():
        _write(tmp_path / "pred", n, p)
        _write(tmp_path / "lab", n, g)
    (tmp_path / "pred" / "plans.json").write_text("{}")  # non-image files are ignored
    out = tmp_path / "out"
    cfg = EvaluationConfig(bootstrap=50, extraction="static")  # the worked static answer above
    m = evaluate_folders(tmp_path / "pred", tmp_path / "lab", out, cfg, lesion_label=1)
    assert m["cpm"] == pytest.approx((0 + 0.4 + 5 * 0.8) / 7)
    assert json.loads((out / "metrics.json").read_text())["cpm"] == pytest.approx(m["cpm"])
    rows = list(csv.DictReader((out / "froc.csv").open()))
    assert list(rows[0]) == ["threshold", "fps_per_scan", "sensitivity"]
    # the curve's corners: vertices (FP, TP) (0,0) (1,0) [(1,1)] (1,2) (2,2) [(2,3)] (2,4) (3,4), the
    # bracketed ones inside vertical runs left out (froc_corners)
    assert [(r["fps_per_scan"], r["sensitivity"]) for r in rows] == [
        ("0.0", "0.0"), ("0.25", "0.0"), ("0.25", "0.4"), ("0.5", "0.4"), ("0.5", "0.8"), ("0.75", "0.8")]
    assert rows[0]["threshold"] == "inf" and float(rows[2]["threshold"]) == pytest.approx(0.8)
    lesions = list(csv.DictReader((out / "lesions.csv").open()))
    assert sum(r["kind"] == "lesion" for r in lesions) == 5
    assert sum(r["kind"] == "candidate" for r in lesions) == 8
    outcomes = sorted(r["outcome"] for r in lesions)
    assert outcomes.count("missed") == 1 and outcomes.count("ignored") == 1 and outcomes.count("fp") == 3
    b = next(r for r in lesions if r["scan"] == "b" and r["kind"] == "lesion")
    # world centroid: origin (-10, 5, 3) + voxel centroid (2.5, 1, 1) * spacing (1, 1, 2)
    assert [float(b[k]) for k in ("centroid_x_mm", "centroid_y_mm", "centroid_z_mm")] == [-7.5, 6.0, 5.0]
    # 6 x 3 x 3 voxels of 2 mm^3 = 108 mm^3, equivalent diameter (6 * 108 / pi)^(1/3) = 5.9 mm
    assert float(b["volume_mm3"]) == 108.0 and b["matched_id"] == "1" and b["size_bucket"] == "5-10mm"
    assert (out / "froc.png").stat().st_size > 1000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_evaluate_folders_label_maps_and_multichannel(tmp_path):
    gt = box((2, 2, 2), (6, 6, 6), 1, np.zeros(S, np.uint8))
    _write(tmp_path / "lab", "x", gt)
    _write(tmp_path / "seg", "x", gt.astype(np.int16))  # e.g. an nnU-Net segmentation
    prob = box((2, 2, 2), (6, 6, 6), 0.8, np.zeros(S, np.float32))
    _write(tmp_path / "soft", "x", np.stack([1 - prob, prob]))
    cfg = EvaluationConfig(bootstrap=0)
    m = evaluate_folders(tmp_path / "seg", tmp_path / "lab", tmp_path / "o1", cfg, lesion_label=1)
    assert m["cpm"] == 1.0 and m["operating_point"]["threshold"] == 1.0
    m = evaluate_folders(tmp_path / "soft", tmp_path / "lab", tmp_path / "o2", cfg, lesion_label=1)
    assert m["cpm"] == 1.0 and m["operating_point"]["threshold"] == pytest.approx(0.8)


def test_problems_are_all_reported_with_file_names_and_nothing_written(tmp_path):
    gt = box((2, 2, 2), (6, 6, 6), 1, np.zeros(S, np.uint8))
    prob = gt.astype(np.float32)
    pred, lab, out = tmp_path / "pred", tmp_path / "lab", tmp_path / "out"
    _write(pred, "ok", prob), _write(lab, "ok", gt)
    bad_grid = _write(pred, "grid", prob)
    _write(lab, "grid", gt, spacing=(1.0, 1.0, 3.0))
    lonely = _write(pred, "lonely", prob)
    orphan = _write(lab, "orphan", gt)
    broken = pred / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    _write(lab, "broken", gt)
    with pytest.raises(EvaluationInputError) as info:
        evaluate_folders(pred, lab, out, EvaluationConfig(bootstrap=0), lesion_label=1)
    msg = str(info.value)
    assert len(info.value.problems) == 4
    assert str(lonely) in msg and "no label file" in msg
    assert str(orphan) in msg and "no prediction file" in msg
    assert str(broken) in msg
    assert str(bad_grid) in msg and "spacing" in msg
    assert not out.exists()


def test_missing_folder_and_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationInputError, match="folder not found") as info:
        evaluate_folders(tmp_path / "nope", tmp_path / "empty", tmp_path / "o", EvaluationConfig(bootstrap=0))
    assert "no image files" in str(info.value)


def test_bad_lesion_channel_names_the_file(tmp_path):
    gt = np.zeros(S, np.uint8)
    p = _write(tmp_path / "pred", "x", np.zeros((2,) + S, np.float32))
    _write(tmp_path / "lab", "x", gt)
    with pytest.raises(EvaluationInputError, match="no channel") as info:
        evaluate_folders(tmp_path / "pred", tmp_path / "lab", tmp_path / "o", EvaluationConfig(bootstrap=0),
                         lesion_label=3)
    assert str(p) in str(info.value)


def test_dynamic_extraction_finds_a_haloed_lesion_that_static_misses_and_metrics_record_it():
    """A lesion (5^3) predicted in place with a 0.2 halo 4 voxels wide: the 0.1-level blob (13^3) has IoU
    125 / 2197 < 0.1 (a miss plus a false positive); grown from its peak (0.9 / 2.5 = 0.36) it is exact."""
    gt = np.zeros((24, 24, 24), np.uint8)
    gt[10:15, 10:15, 10:15] = 1
    prob = np.zeros(gt.shape, np.float32)
    prob[6:19, 6:19, 6:19] = 0.2
    prob[10:15, 10:15, 10:15] = 0.9
    static = evaluate_cases([("a", prob, gt, np.eye(4))],
                            EvaluationConfig(bootstrap=0, extraction="static"))
    dynamic = evaluate_cases([("a", prob, gt, np.eye(4))],
                             EvaluationConfig(bootstrap=0, extraction="dynamic"))
    assert static.cpm == 0.0 and dynamic.cpm == 1.0
    assert dynamic.cases[0].lesion_iou.tolist() == [1.0]
    m = dynamic.to_metrics()
    assert m["extraction"] == {"mode": "dynamic", "score": "max", "threshold_factor": 2.5, "min_voxels": 0,
                               "max_lesions": 100, "round_decimals": None, "hit_criterion": "iou",
                               "iou_threshold": 0.1, "max_candidates_per_scan": 10000}
    assert static.to_metrics()["extraction"]["threshold"] == 0.1
    assert EvaluationConfig().extraction == "dynamic"  # the default (evidence: benchmarks/RESULTS.md)


def test_dynamic_extraction_needs_peak_scores():
    with pytest.raises(ValueError, match="score 'mean' needs extraction 'static'"):
        EvaluationConfig(extraction="dynamic", score="mean")


@pytest.mark.parametrize("workers", [1, 3])
def test_evaluate_folders_in_threads_equals_in_memory(tmp_path, workers):
    """Reading and evaluating pairs in worker threads changes nothing: the same metrics, in scan order, as
    evaluate_cases on the arrays; and every problem is still reported when pairs run concurrently."""
    affine = make_affine(SPACING, (-10, 5, 3))  # as _write
    rng = np.random.default_rng(5)
    cases = []
    for k, (n, p, g) in enumerate(scans() * 2):
        name = f"{n}{k}"
        p = np.clip(p + rng.uniform(0, 0.2, p.shape).astype(np.float32) * (rng.random(p.shape) < 0.02), 0, 1)
        _write(tmp_path / "pred", name, p)
        _write(tmp_path / "lab", name, g)
        cases.append((name, p, g, affine))
    cfg = EvaluationConfig(bootstrap=20)
    in_memory = evaluate_cases(sorted(cases, key=lambda c: c[0]), cfg, lesion_label=1)
    write_report(tmp_path / "in_memory", in_memory)  # lesions.csv rendered in one thread, after the fact
    m = evaluate_folders(tmp_path / "pred", tmp_path / "lab", tmp_path / "out", cfg, lesion_label=1,
                         workers=workers)
    assert m["settings"].pop("predictions") and m["settings"].pop("labels")
    assert m == in_memory.to_metrics()
    lesions_csv = (tmp_path / "out" / "lesions.csv").read_bytes()
    assert lesions_csv == (tmp_path / "in_memory" / "lesions.csv").read_bytes()
    lesions = list(csv.DictReader((tmp_path / "out" / "lesions.csv").open()))
    assert len(lesions) > 8 and [r["scan"] for r in lesions] == sorted(r["scan"] for r in lesions)
    # two broken pairs among good ones: both named, whatever the threads' timing
    (tmp_path / "pred" / "c2.nii.gz").write_bytes(b"not a nifti file")
    (tmp_path / "lab" / "b5.nii.gz").write_bytes(b"nor this")
    with pytest.raises(EvaluationInputError) as info:
        evaluate_folders(tmp_path / "pred", tmp_path / "lab", tmp_path / "out2", cfg, lesion_label=1,
                         workers=workers)
    assert len(info.value.problems) == 2 and "c2.nii.gz" in str(info.value) and "b5.nii.gz" in str(info.value)
    assert not (tmp_path / "out2").exists()


def test_min_lesion_volume_changes_the_count_and_is_recorded():
    # lesions: a 27 (found 0.9) and 64 (0.6) voxels, b 54 (0.8; second candidate 0.3), c 27 (missed) and 27
    # (0.5). At 30 voxels the three 27-voxel lesions are excluded: a's 0.9 and c's 0.5 candidates touch
    # them and are ignored, not false positives; the FPs 0.95, 0.7, 0.4 stay.
    vox_mm3 = float(np.prod(SPACING))
    cases = [(n, p, g, make_affine(SPACING)) for n, p, g in scans()]
    cfg = EvaluationConfig(bootstrap=0, extraction="static", min_lesion_mm3=30 * vox_mm3)
    r = evaluate_cases(cases, cfg, lesion_label=1)
    m = r.to_metrics()
    assert m["lesions_total"] == 2 and m["lesions_excluded"] == 3 and m["lesions_detected"] == 2
    assert m["false_positives_total"] == 3 and m["candidates_ignored"] == 3
    # lesion scores 0.6, 0.8; FPs 0.95, 0.7, 0.4 over 4 scans: (0.25, 0) (0.25, 0.5) (0.5, 0.5) (0.5, 1) ...
    np.testing.assert_allclose(r.sensitivity_at_fp, [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert m["settings"]["min_lesion_mm3"] == pytest.approx(30 * vox_mm3)
    base = evaluate_cases(cases, EvaluationConfig(bootstrap=0, extraction="static"), lesion_label=1).to_metrics()
    assert base["lesions_total"] == 5 and base["lesions_excluded"] == 0
