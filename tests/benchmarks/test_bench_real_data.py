"""The real-data benchmark's pure parts (fold split, budget calibration, caching, tables): fast, no training.

The benchmark itself takes hours; these tests make sure the script still imports and its bookkeeping is
right, so it cannot rot between runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.benchmark_module import load_benchmark

REPO = Path(__file__).resolve().parents[2]
SHARED_REAL = REPO.parent / "shared" / "data" / "real"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_real_data")


def test_leave_one_out_folds(bench):
    folds = bench.fold_splits(["p19", "p01", "p12", "p03"], 1)
    assert [f["test"] for f in folds] == [["p01"], ["p03"], ["p12"], ["p19"]]
    assert folds[2]["train"] == ["p01", "p03", "p19"]
    assert all(f["val"] == [] for f in folds)
    for f in folds:  # no test scan is ever trained on
        assert not set(f["test"]) & set(f["train"])


def test_two_held_out_folds_cover_every_case_once(bench):
    cases = [f"c{i}" for i in range(6)]
    folds = bench.fold_splits(cases, 2)
    assert [f["test"] for f in folds] == [["c0", "c1"], ["c2", "c3"], ["c4", "c5"]]
    assert sorted(c for f in folds for c in f["test"]) == cases


def test_fold_split_rejects_zero_hold_out(bench):
    with pytest.raises(ValueError, match="hold_out"):
        bench.fold_splits(["a"], 0)


def test_nnunet_splits_train_on_ours_and_validate_on_a_training_case(bench):
    folds = bench.fold_splits(["a", "b", "c", "d"], 1)
    splits = bench.nnunet_splits(folds)
    assert splits[0] == {"train": ["b", "c", "d"], "val": ["b"]}
    for f, s in zip(folds, splits):
        assert s["train"] == f["train"]
        assert set(s["val"]) <= set(f["train"])  # never the test scan


def test_parse_folds(bench):
    assert bench.parse_folds("all", 3) == [0, 1, 2]
    assert bench.parse_folds("2,0", 4) == [0, 2]
    with pytest.raises(ValueError, match="0..3"):
        bench.parse_folds("4", 4)


def test_calibrated_steps_fit_the_budget(bench):
    assert bench.calibrated_steps(900, 0.5, 40) == (45, 40)  # 1,800 steps
    assert bench.calibrated_steps(60, 2.0, 40) == (1, 30)  # less than one epoch: one shorter epoch
    epochs, steps = bench.calibrated_steps(900, 0.37, 40)  # 2,432 steps -> 61 x 40 = 2,440 (rounded)
    assert (epochs, steps) == (61, 40)
    with pytest.raises(ValueError):
        bench.calibrated_steps(900, 0.0, 40)


def test_cache_roundtrip_and_invalidation(bench, tmp_path):
    key = bench.cache_key("ours", "ms", 0, ["patient01"], 15)
    path = tmp_path / "ours" / "fold0" / "result.json"
    assert bench.load_cached(path, key) is None  # nothing yet
    bench.save_result(path, {"key": key, "fold": 0, "metrics": {}})
    assert bench.load_cached(path, key)["fold"] == 0
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temporary file
    # another budget, another test scan, or another system: recomputed
    assert bench.load_cached(path, bench.cache_key("ours", "ms", 0, ["patient01"], 5)) is None
    assert bench.load_cached(path, bench.cache_key("ours", "ms", 0, ["patient03"], 15)) is None
    assert bench.load_cached(path, bench.cache_key("prev", "ms", 0, ["patient01"], 15)) is None
    path.write_text("{ truncated")
    assert bench.load_cached(path, key) is None


def test_cache_key_names_a_forced_spacing_only(bench, tmp_path):
    own_plan = bench.cache_key("ours", "brats", 0, ["a"], 5)
    assert "target_spacing_mm" not in own_plan  # results cached at each system's own plan keep their key
    at_2mm = bench.cache_key("ours", "brats", 0, ["a"], 5, [2, 2, 2])
    assert at_2mm["target_spacing_mm"] == [2.0, 2.0, 2.0]
    path = tmp_path / "result.json"
    bench.save_result(path, {"key": at_2mm, "fold": 0})
    assert bench.load_cached(path, own_plan) is None  # a 2 mm result never stands in for the full protocol
    assert bench.load_cached(path, bench.cache_key("ours", "brats", 0, ["a"], 5, [2.0, 2.0, 2.0]))["fold"] == 0


def test_metrics_summary_reads_evaluate_output(bench):
    metrics = {"cpm": 0.4, "cpm_ci95": [0.2, 0.6], "sensitivity_at_fp": {"0.125": 0.1, "1": 0.5, "8": 0.75},
               "dice": {"lesion": 0.61}, "lesions_total": 13, "scans_total": 1}
    assert bench.metrics_summary(metrics) == {"cpm": 0.4, "cpm_ci95": [0.2, 0.6], "sens_1fp": 0.5, "sens_8fp": 0.75,
                                              "dice": 0.61, "lesions": 13, "scans": 1}
    assert bench.metrics_summary({})["cpm"] is None


def _result(bench, system, fold, cpm, test):
    m = {"cpm": cpm, "cpm_ci95": [cpm / 2, min(1.0, cpm * 1.5)], "sens_1fp": cpm, "sens_8fp": 1.0, "dice": 0.5,
         "lesions": 10, "scans": 1}
    return {"key": bench.cache_key(system, "ms", fold, test, 15), "fold": fold, "system": system,
            "train_s": 900.0, "train_steps": 100, "predict_s": 20.0, "preprocess_s_per_case": 2.0,
            "patch_size": [80, 96, 16], "batch_size": 2, "parameters": 1000, "budget_method": "m",
            "metrics": {"lesion_change": m}}


def test_markdown_tables_means_and_section_replacement(bench, tmp_path):
    results = {
        "ours": [_result(bench, "ours", 0, 0.4, ["p01"]), _result(bench, "ours", 1, 0.6, ["p03"])],
        "nnunet": [_result(bench, "nnunet", 0, 0.2, ["p01"])],
    }
    pooled = {"ours": {"lesion_change": {"cpm": 0.55, "cpm_ci95": [0.4, 0.7], "sens_1fp": 0.5, "sens_8fp": 0.9,
                                         "dice": 0.5, "lesions": 20, "scans": 2}}}
    extras = {"nnunet_preprocess": {"seconds": 40.0, "cases": 4, "s_per_case": 10.0, "processes": 2}}
    text = bench.markdown("ms", results, pooled, extras, "CMD", "Machine: test")
    assert text.startswith("<!-- section:bench3-ms -->") and text.endswith("<!-- /section:bench3-ms -->")
    assert "| **ours** | **mean** | | 10.0 | 0.500 | 1.000 | **0.500** | 0.500 | 900 | |" in text
    assert "| ours | pooled | 2 scans | 20 | 0.500 | 0.900 | 0.550 [0.40, 0.70] | 0.500 | | |" in text
    assert "| nnunet | 0 | p01 | 10 | 0.200 |" in text
    assert "ours is 5.0x faster" in text  # 10 s/case (nnU-Net) vs 2 s/case (ours)
    assert "prev" not in text.split("| system | patch")[1]  # a system without results has no row
    assert "reduced protocol" not in text  # each system's own plan
    at_2mm = bench.markdown("ms", results, pooled, extras, "CMD", "Machine: test", [2.0, 2.0, 2.0])
    assert "reduced protocol: every system at 2 x 2 x 2 mm" in at_2mm.splitlines()[1]

    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\nintro\n")
    bench.write_section(out, "ms", text)
    bench.write_section(out, "brats", "<!-- section:bench3-brats -->\nB1\n<!-- /section:bench3-brats -->")
    bench.write_section(out, "ms", "<!-- section:bench3-ms -->\nNEW\n<!-- /section:bench3-ms -->")
    final = out.read_text()
    assert final.startswith("# Results\n\nintro\n")
    assert "NEW" in final and "CMD" not in final and "B1" in final
    assert final.count("section:bench3-ms -->") == 2  # one opening, one closing marker


def test_label_file_mapping_keeps_the_grid(bench, tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.zeros((4, 5, 6), np.float32)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2], data[3, 3, 3] = 1, 2, 3, 4
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    src = tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(src))
    whole = tmp_path / "whole.nii.gz"
    bench.write_label_file(src, whole, {1: 1, 2: 1, 3: 1, 4: 1})
    enh = tmp_path / "enh.nii.gz"
    bench.write_label_file(src, enh, {4: 1})
    w, e = nib.load(str(whole)), nib.load(str(enh))
    assert np.allclose(w.affine, affine) and w.get_data_dtype() == np.uint8
    assert int(np.asarray(w.dataobj).sum()) == 4 and int(np.asarray(e.dataobj).sum()) == 1
    assert np.asarray(e.dataobj)[3, 3, 3] == 1


def test_nnunet_probabilities_are_transposed_to_the_label_grid(bench, tmp_path):
    nib = pytest.importorskip("nibabel")
    shape_xyz = (3, 4, 5)
    ref = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape_xyz, np.uint8), np.diag([1.0, 1.0, 2.0, 1.0])), str(ref))
    probs = np.zeros((4,) + shape_xyz[::-1], np.float32)  # nnU-Net: (K, z, y, x)
    probs[0] = 1.0
    probs[0, 4, 3, 2], probs[3, 4, 3, 2] = 0.1, 0.9  # voxel x=2, y=3, z=4: enhancing
    probs[0, 0, 0, 1], probs[2, 0, 0, 1] = 0.3, 0.7  # voxel x=1, y=0, z=0: edema
    np.savez(tmp_path / "case.npz", probabilities=probs)
    defs = bench.DATASETS["brats"].lesion_defs
    outs = {d.name: tmp_path / d.name for d in defs}
    bench.nnunet_probabilities_to_maps(tmp_path / "case.npz", ref, defs, outs)
    enh = np.asarray(nib.load(str(outs["enhancing"] / "case.nii.gz")).dataobj)
    whole = np.asarray(nib.load(str(outs["whole_tumour"] / "case.nii.gz")).dataobj)
    assert enh.shape == shape_xyz
    assert enh[2, 3, 4] == pytest.approx(0.9) and enh[1, 0, 0] == 0
    assert whole[1, 0, 0] == pytest.approx(0.7) and whole[2, 3, 4] == pytest.approx(0.9)
    assert whole.sum() == pytest.approx(1.6)


def test_brats_lesion_definitions_match_the_remap(bench):
    spec = bench.DATASETS["brats"]
    remap = {v: spec.label_remap.get(v, v) for v in range(5)}
    for lesion in spec.lesion_defs:  # the classes of a definition are its on-disk labels after remapping
        assert sorted({remap[v] for v in lesion.gt_values}) == sorted(lesion.classes)


@pytest.mark.skipif(not SHARED_REAL.is_dir(), reason="shared real data absent")
def test_real_data_sets_have_the_expected_cases(bench):
    for name, n_cases, n_folds in (("ms", 4, 4), ("brats", 6, 3)):
        spec = bench.DATASETS[name]
        if not (SHARED_REAL / spec.folder).is_dir():
            pytest.skip(f"{spec.folder} absent")
        cases = bench.case_ids(SHARED_REAL, spec)
        assert len(cases) == n_cases
        assert len(bench.fold_splits(cases, spec.hold_out)) == n_folds
        for case in cases:
            for file_name, _ in spec.channels:
                assert (SHARED_REAL / spec.folder / case / file_name).is_file()


def test_cli_rejects_unknown_system(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--dataset", "ms", "--systems", "ours,nnunet2"])
    opts = bench.parse_args(["--dataset", "ms", "--systems", "nnunet", "--work", "rel"])
    assert opts.systems == ["nnunet"] and opts.work.is_absolute()


def test_nnunet_trainer_is_alone_in_its_search_folder():
    # nnU-Net imports every module of nnUNet_extTrainer when it looks a trainer up
    folder = REPO / "benchmarks" / "nnunet_ext" / "trainers"
    assert sorted(p.name for p in folder.glob("*.py")) == ["nnUNetTrainerBudget.py"]


def test_trainer_is_linked_into_the_installed_package(bench, tmp_path):
    opts = bench.parse_args(["--dataset", "ms", "--ref-venv", str(tmp_path / "venv")])
    with pytest.raises(RuntimeError, match="setup_reference_venv"):
        bench.ensure_nnunet_trainer(opts)
    pkg = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "nnunetv2" / "training" / "nnUNetTrainer"
    pkg.mkdir(parents=True)
    bench.ensure_nnunet_trainer(opts)
    bench.ensure_nnunet_trainer(opts)  # idempotent
    target = pkg / "nnUNetTrainerBudget.py"
    assert target.is_symlink() and target.resolve() == (
        REPO / "benchmarks" / "nnunet_ext" / "trainers" / "nnUNetTrainerBudget.py").resolve()


def test_brats_counts_lesions_from_50_mm3_and_ms_counts_all(bench):
    assert bench.scoring("brats") == {"enhancing": 50.0, "whole_tumour": 50.0}  # the BraTS 2023+ glioma rule
    assert bench.scoring("ms") == {"lesion_change": 0.0}


def test_results_scored_under_another_protocol_are_rescored_from_their_predictions(bench, tmp_path):
    nib = pytest.importorskip("nibabel")
    import argparse

    opts = argparse.Namespace(work=tmp_path)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    gt = np.zeros((16, 16, 16), np.uint8)
    gt[2, 2, 2] = 1  # a one-voxel fragment (1 mm^3): not counted from 50 mm^3 on
    gt[8:12, 8:12, 8:12] = 1  # 64 mm^3
    prob = np.zeros(gt.shape, np.float32)
    prob[8:12, 8:12, 8:12] = 0.9
    predictions = {}
    for name in ("enhancing", "whole_tumour"):
        (tmp_path / "brats" / "gt" / name / "fold0").mkdir(parents=True)
        nib.save(nib.Nifti1Image(gt, affine), str(tmp_path / "brats" / "gt" / name / "fold0" / "c.nii.gz"))
        (tmp_path / "pred" / name).mkdir(parents=True)
        nib.save(nib.Nifti1Image(prob, affine), str(tmp_path / "pred" / name / "c.nii.gz"))
        predictions[name] = str(tmp_path / "pred" / name)
    old = {"system": "ours", "predictions": predictions,
           "metrics": {n: {"cpm": 0.5, "lesions": 2} for n in predictions}}  # no "scoring": every lesion counted
    new = bench.rescore(old, "brats", 0, opts)
    assert new["scoring"] == bench.scoring("brats")
    for name in predictions:
        assert new["metrics"][name]["lesions"] == 1 and new["metrics"][name]["cpm"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "brats" / "ours" / "fold0" / "result.json").read_text())  # the cache, updated
    assert saved["scoring"] == bench.scoring("brats") and saved["metrics"] == new["metrics"]
    assert bench.rescore(new, "brats", 0, opts) is new  # already under this protocol: untouched
