"""run_preprocess: outputs, atomic writes, skip / resume, kill + resume byte-identical, clear errors."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import config_from_dict
from pipeline.io.dataset import load_msd
from pipeline.io.volume import Volume, make_affine
from pipeline.preprocessing.parallel import resolve_workers
from pipeline.stages.preprocess import PreprocessError, run_preprocess
from tests.preprocessing.phantoms import oblique_affine, phantom, write_msd

REPO = Path(__file__).resolve().parents[2]


def make_dataset(root: Path, n: int = 8, shape=(32, 30, 12)):
    """``n`` CT-like cases, spacings varying around (0.85, 0.85, 2.5) mm (so cases are resampled), every
    third one oblique and LPS-stored, all with a zero border to crop; splits 5 train / 1 val / rest test."""
    cases = []
    for i in range(n):
        spacing = (0.8 + 0.05 * (i % 3), 0.85, 2.0 + 0.5 * (i % 2) + 0.5 * (i % 3 == 1))
        affine = oblique_affine(spacing) if i % 3 == 0 else make_affine(spacing, (float(i), 2.0, -3.0))
        image, label = phantom(
            shape, affine, organ_radii_mm=(9, 8, 10), lesions=(((2, 1, 2), 3.0),), zero_border=2, seed=i
        )
        cases.append((f"case_{i:02d}", image, label))
    ds = load_msd(write_msd(root, cases))
    ids = [c.case_id for c in ds.training]
    return ds, {"train": ids[:5], "val": ids[5:6], "test": ids[6:]}


def files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".preprocess.lock"
    }


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("stage") / "raw")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run with 2 worker processes."""
    ds, splits = data
    out = tmp_path_factory.mktemp("reference")
    summary = run_preprocess(config_from_dict({}), ds, splits, out, workers=2)
    return out, summary


def test_outputs_records_and_no_temp_files(data, reference):
    _, splits = data
    out, summary = reference
    all_ids = splits["train"] + splits["val"] + splits["test"]
    assert summary["processed"] == sorted(all_ids) and summary["skipped"] == [] and summary["workers"] == 2
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert fingerprint["case_ids"] == sorted(splits["train"] + splits["val"])  # never the test cases
    plan = json.loads((out / "plan.json").read_text())
    for cid in all_ids:
        record = json.loads((out / "cases" / f"{cid}.json").read_text())
        image = np.load(out / "cases" / f"{cid}_image.npy")
        label = np.load(out / "cases" / f"{cid}_label.npy")
        assert record["plan_hash"] == summary["plan_hash"] and record["case_id"] == cid
        assert image.dtype == np.float32 and image.flags.c_contiguous and image.shape == (1, *record["shape"])
        assert label.dtype == np.uint8 and label.shape == tuple(record["shape"])
        assert record["resample"]["target_spacing_mm"] == plan["target_spacing_mm"]
        assert record["source"]["images"] == [f"imagesTr/{cid}.nii.gz"]
    assert temp_files(out) == []


def test_rerun_skips_finished_cases_and_changes_nothing(data, reference, tmp_path):
    ds, splits = data
    out, _ = reference
    before = files(out)
    summary = run_preprocess(config_from_dict({}), ds, splits, out, workers=1)
    assert summary["processed"] == [] and len(summary["skipped"]) == 8
    assert files(out) == before


def test_changed_settings_recompute_every_case(data, tmp_path):
    ds, splits = data
    run_preprocess(config_from_dict({}), ds, splits, tmp_path, workers=1)
    first = json.loads((tmp_path / "cases" / "case_00.json").read_text())["plan_hash"]
    summary = run_preprocess(
        config_from_dict({"preprocess": {"image_order": 1}}), ds, splits, tmp_path, workers=1
    )
    assert len(summary["processed"]) == 8 and summary["plan_hash"] != first


def test_changed_source_file_recomputes_that_case_only(data, tmp_path):
    """A test-split scan replaced on disk (same name) is recomputed; changing only the batch size (not a
    per-case setting) recomputes nothing."""
    import shutil

    ds, splits = data
    root = tmp_path / "raw"
    shutil.copytree(ds.root, root)
    ds = load_msd(root)
    run_preprocess(config_from_dict({}), ds, splits, tmp_path / "out", workers=1)
    summary = run_preprocess(
        config_from_dict({"preprocess": {"batch_size": 5}}), ds, splits, tmp_path / "out", workers=1
    )
    assert summary["processed"] == []
    changed = splits["test"][0]
    image, label = phantom((32, 30, 12), oblique_affine(), zero_border=3, seed=99)
    from pipeline.io.formats import write_volume

    write_volume(ds.case(changed).images[0], image)
    write_volume(ds.case(changed).label, label)
    summary = run_preprocess(config_from_dict({}), ds, splits, tmp_path / "out", workers=1)
    assert summary["processed"] == [changed] and len(summary["skipped"]) == 7


def records(out: Path) -> list[Path]:
    """The case records in ``out/cases``: not the hidden temporary file of a record being written
    (``.case_03.json.<random>.tmp.json``), which ``Path.glob("*.json")`` also matches."""
    return [p for p in (out / "cases").glob("*.json") if not p.name.startswith(".")]


def test_records_ignore_a_record_being_written(tmp_path):
    """Regression: the kill test counted a record's temporary file as a finished case (flaky failure)."""
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "case_00.json").write_text("{}")
    (tmp_path / "cases" / ".case_01.json.x1y2.tmp.json").write_text("{")
    assert [p.name for p in records(tmp_path)] == ["case_00.json"]


def test_kill_then_resume_is_byte_identical(data, reference, tmp_path):
    """SIGKILL a run (its whole process group) after its first finished cases, add the debris a kill can leave
    (a temp file, an array without its record), re-run: the same bytes as the uninterrupted run."""
    ds, splits = data
    ref_out, _ = reference
    out = tmp_path / "killed"
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    script = (
        "import json, sys\n"
        "from pipeline.config import config_from_dict\n"
        "from pipeline.io.dataset import load_msd\n"
        "from pipeline.stages.preprocess import run_preprocess\n"
        "if __name__ == '__main__':\n"
        f"    splits = json.loads(open({str(tmp_path / 'splits.json')!r}).read())\n"
        f"    dataset = load_msd({str(ds.root)!r})\n"
        f"    run_preprocess(config_from_dict({{}}), dataset, splits, {str(out)!r}, workers=1)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(records(out)) >= 2:
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    finished = len(records(out))
    assert 0 < finished < 8
    # debris of a kill mid-write: a temp file, and arrays of a case whose record was never written
    (out / "cases" / ".case_07_image.npy.x1y2.tmp.npy").write_bytes(b"\x93NUMPY half")
    (out / "cases" / "case_07_image.npy").write_bytes(b"\x93NUMPY half-written")
    (out / "cases" / "case_07.json").unlink(missing_ok=True)

    left = len(records(out))

    summary = run_preprocess(config_from_dict({}), ds, splits, out, workers=2)
    assert len(summary["skipped"]) == left and len(summary["processed"]) == 8 - left
    assert files(out) == files(ref_out)
    assert temp_files(out) == []


def test_bad_case_error_names_case_and_file(tmp_path):
    ds, splits = make_dataset(tmp_path / "raw", n=4, shape=(24, 22, 10))
    label_path = ds.case("case_03").label
    from pipeline.io.formats import read_volume, write_volume

    label = read_volume(label_path)
    write_volume(label_path, Volume(label.data[:, :, :, :-1], label.affine))  # one slice short
    splits = {"train": ["case_00", "case_01"], "val": ["case_02"], "test": ["case_03"]}
    with pytest.raises(
        PreprocessError, match=r"case case_03: .*labelsTr/case_03.nii.gz.*label grid does not match.*shape"
    ):
        run_preprocess(config_from_dict({}), ds, splits, tmp_path / "out", workers=1)
    splits = {"train": ["case_00", "case_03"], "val": ["case_02"], "test": []}
    with pytest.raises(ValueError, match=r"case case_03: .*label grid does not match"):
        run_preprocess(config_from_dict({}), ds, splits, tmp_path / "out", workers=2)


def test_bad_splits(data, tmp_path):
    ds, splits = data
    with pytest.raises(PreprocessError, match=r"does not have.*nope"):
        run_preprocess(config_from_dict({}), ds, {**splits, "test": ["nope"]}, tmp_path, workers=1)
    with pytest.raises(PreprocessError, match="both train/val and test"):
        run_preprocess(config_from_dict({}), ds, {**splits, "test": splits["train"][:1]}, tmp_path, workers=1)
    with pytest.raises(PreprocessError, match="no 'val' list"):
        run_preprocess(config_from_dict({}), ds, {"train": splits["train"], "test": []}, tmp_path, workers=1)


def test_one_run_at_a_time(data, tmp_path):
    ds, splits = data
    with open(tmp_path / ".preprocess.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(PreprocessError, match="another preprocess run"):
            run_preprocess(config_from_dict({}), ds, splits, tmp_path, workers=1)


def test_workers_default_is_cpu_count():
    assert resolve_workers(0) == os.cpu_count()
    assert resolve_workers(None, default=3) == 3 and resolve_workers(None) == os.cpu_count()


def mr_dataset(root: Path, offset: float = 0.0):
    """Four MR-like cases (``FLAIR``: a shaded two-tissue head in zero air, see
    tests/preprocessing/test_bias_field.py), ``offset`` added to every voxel (negative: pre-normalised)."""
    from tests.preprocessing.test_bias_field import two_tissue_head

    cases = []
    for i in range(4):
        scan, tissue, _ = two_tissue_head((32, 30, 12), seed=i)
        affine = make_affine((1.5, 1.5, 3.0), (float(i), 0.0, 0.0))
        cases.append((f"case_{i:02d}", Volume((scan + offset)[None], affine), Volume(tissue[None], affine)))
    ds = load_msd(write_msd(root, cases, channel_names=("FLAIR",)))
    return ds, {"train": ["case_00", "case_01"], "val": ["case_02"], "test": ["case_03"]}


def test_n4_through_the_stage_is_recorded_per_case(tmp_path):
    ds, splits = mr_dataset(tmp_path / "raw")
    cfg = config_from_dict({"preprocess": {"intensity": {"bias_field": ["n4"]}}})
    summary = run_preprocess(cfg, ds, splits, tmp_path / "out", workers=1)
    assert len(summary["processed"]) == 4
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["intensity"][0]["bias_field"] == {"method": "n4", "grid_mm": 4.0, "iterations": [50, 50, 50, 50]}
    record = json.loads((tmp_path / "out" / "cases" / "case_03.json").read_text())
    applied = record["intensity"][0]["bias_field"]
    assert applied["method"] == "n4" and applied["field_range"][0] < 1 < applied["field_range"][1]
    plain = run_preprocess(config_from_dict({}), ds, splits, tmp_path / "plain", workers=1)
    assert plain["plan_hash"] != summary["plan_hash"]  # the correction is part of every case's bytes


def test_n4_on_normalised_scans_names_case_and_file(tmp_path):
    ds, splits = mr_dataset(tmp_path / "raw", offset=-3.6)
    cfg = config_from_dict({"preprocess": {"intensity": {"bias_field": ["n4"]}}})
    with pytest.raises(PreprocessError, match=r"case case_0\d \(.*imagesTr/case_0\d.nii.gz\): N4 .*non-negative"):
        run_preprocess(cfg, ds, splits, tmp_path / "out", workers=1)
    assert not list((tmp_path / "out" / "cases").glob("*.npy"))  # nothing half-written
