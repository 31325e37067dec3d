"""The pipeline on the real public scans in ``../shared/data/real`` (issue 8); skipped when they are absent.

1. Import + validation: for every shared data set, ``make-dataset`` (the CLI) writes a ``dataset.json`` that
   points at the scans where they are, and ``check-data`` accepts it, or rejects it with the expected
   message naming case and file (a CT/MR grid mismatch is reported, never resampled silently; undeclared
   label values are reported until they are remapped).
2. Geometry round trip: ``preprocess_case`` with a plan built from the data set's own fingerprint, then
   ``invert_case`` of the label map, restores shape and affine (1e-6) and the lesion classes (Dice >= 0.99
   where the plan does not coarsen the scan), for one case per modality (FLAIR, z-scored FLAIR, CT, T1,
   NRRD MR, PET).
3. Short end-to-end runs (slow) of the real CLI on downsampled copies (block-averaged, affine scaled, in
   ``tmp_path``): MS longitudinal with both visits as two channels (multi-channel real MRI) and BraTS FLAIR
   with two lesion classes after a label remap; predictions land in the input's exact geometry, metrics.json
   reports FROC / CPM (per lesion class for BraTS), and ``predict`` on a real NRRD writes NRRD on its grid.

BraTS label mapping used throughout (``data.label_remap: {3: 1, 4: 3}``): 0 background, 1 necrosis +
non-enhancing tumour (BraTS 1 and 3), 2 edema, 3 enhancing tumour (BraTS 4). Lesion classes: [1, 3] here
(two classes, to exercise per-class evaluation); the benchmark uses [3] (enhancing tumour).

BraTS here has FLAIR only (plus a brain mask). The brain mask as a second channel is used only to check
that a two-channel manifest validates (mechanics); the multi-channel training run is the MS one, whose two
visits are genuinely two images of the same grid.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.realdata.realdata_helpers import run_cli, write_downsampled

pytestmark = pytest.mark.realdata

MS = "ms_lesion_change_lit_longitudinal"
BRATS = "brats2015_deepmedic"
STS = "sts_softtissue_sarcoma_mirp"
IBSI = "ibsi1_ct_lung_tumour"
PYRAD = "pyradiomics_testcases"
QIN = "qin_headneck_pet_multilesion"
BRATS_LABELS = ("background", "necrosis_nonenhancing", "edema", "enhancing")
BRATS_REMAP = "{3: 1, 4: 3}"
QIN_REMAP = "{" + ", ".join(f"{v}: 1" for v in range(2, 12)) + "}"  # lesion instances 1..11 -> one class


@dataclass(frozen=True)
class Spec:
    """One manifest built from the shared scans; globs are relative to the real-data folder."""

    images: tuple[str, ...]  # one glob per channel
    labels: str
    channel_names: tuple[str, ...]
    label_names: tuple[str, ...]
    overrides: tuple[str, ...] = ("data.lesion_labels=[1]",)
    n_cases: int = 0
    # expected failure: a regex every reported problem matches ({root} = the real-data folder, escaped;
    # {case} = the case id), and the number of problems (one per case); None = check-data passes
    error: str | None = None


SPECS = {
    "ms_flair_visit2": Spec(
        (f"{MS}/*/study2_FLAIR_common.nii.gz",),
        f"{MS}/*/lesion_change_mask.nii.gz",
        ("FLAIR",),
        ("background", "lesion_change"),
        n_cases=4,
    ),
    "ms_flair_two_visits": Spec(
        (f"{MS}/*/study1_FLAIR_common.nii.gz", f"{MS}/*/study2_FLAIR_common.nii.gz"),
        f"{MS}/*/lesion_change_mask.nii.gz",
        ("FLAIR_visit1", "FLAIR_visit2"),
        ("background", "lesion_change"),
        n_cases=4,
    ),
    "brats_flair_remapped": Spec(
        (f"{BRATS}/*/Flair_subtrMeanDivStd.nii.gz",),
        f"{BRATS}/*/OTMultiClass.nii.gz",
        ("FLAIR",),
        BRATS_LABELS,
        ("data.lesion_labels=[1,3]", f"data.label_remap={BRATS_REMAP}"),
        n_cases=6,
    ),
    "brats_flair_not_remapped": Spec(
        (f"{BRATS}/*/Flair_subtrMeanDivStd.nii.gz",),
        f"{BRATS}/*/OTMultiClass.nii.gz",
        ("FLAIR",),
        BRATS_LABELS,
        ("data.lesion_labels=[3]",),
        n_cases=6,
        error=r"case {case}: {root}/" + BRATS + r"/{case}/OTMultiClass\.nii\.gz: label value\(s\) \[4\] not "
        r"declared in dataset\.json \(declared: \[0, 1, 2, 3\]\)",
    ),
    "brats_flair_brainmask_2ch": Spec(  # mechanics only: the mask is not an MR contrast
        (f"{BRATS}/*/Flair_subtrMeanDivStd.nii.gz", f"{BRATS}/*/brainmask.nii.gz"),
        f"{BRATS}/*/OTMultiClass.nii.gz",
        ("FLAIR", "noNorm"),
        BRATS_LABELS,
        ("data.lesion_labels=[3]", f"data.label_remap={BRATS_REMAP}"),
        n_cases=6,
    ),
    "sarcoma_ct": Spec(
        (f"{STS}/*/CT_image.nii.gz",), f"{STS}/*/CT_mask.nii.gz", ("CT",), ("background", "tumour"), n_cases=3
    ),
    "sarcoma_mr": Spec(
        (f"{STS}/*/MR_T1_image.nii.gz",),
        f"{STS}/*/MR_T1_mask.nii.gz",
        ("T1",),
        ("background", "tumour"),
        n_cases=3,
    ),
    "sarcoma_ct_mr_2ch": Spec(  # CT and MR are on different grids: reported, never resampled
        (f"{STS}/*/CT_image.nii.gz", f"{STS}/*/MR_T1_image.nii.gz"),
        f"{STS}/*/CT_mask.nii.gz",
        ("CT", "T1"),
        ("background", "tumour"),
        n_cases=3,
        error=r"case {case}: {root}/" + STS + r"/{case}/MR_T1_image\.nii\.gz: channel grid does not match "
        r"{root}/" + STS + r"/{case}/CT_image\.nii\.gz: shape \(\d+, \d+, \d+\) != \(\d+, \d+, \d+\); origin",
    ),
    "sarcoma_mr_with_ct_mask": Spec(
        (f"{STS}/*/MR_T1_image.nii.gz",),
        f"{STS}/*/CT_mask.nii.gz",
        ("T1",),
        ("background", "tumour"),
        n_cases=3,
        error=r"case {case}: {root}/" + STS + r"/{case}/CT_mask\.nii\.gz: label grid does not match image "
        r"{root}/" + STS + r"/{case}/MR_T1_image\.nii\.gz: shape",
    ),
    "ibsi_ct": Spec(
        (f"{IBSI}/image.nii.gz",), f"{IBSI}/mask.nii.gz", ("CT",), ("background", "tumour"), n_cases=1
    ),
    "pyradiomics_nrrd": Spec(
        (f"{PYRAD}/*_image.nrrd",), f"{PYRAD}/*_label.nrrd", ("MR",), ("background", "roi"), n_cases=3
    ),
    "qin_pet_instances": Spec(
        (f"{QIN}/pet_bqml.nii.gz",),
        f"{QIN}/lesion_instances.nii.gz",
        ("PET",),
        ("background", "lesion"),
        n_cases=1,
        error=r"case {case}: {root}/" + QIN + r"/lesion_instances\.nii\.gz: label value\(s\) "
        r"\[2, 3, 4, 5, 6, 7, 8, 9, 10, 11\] not declared",
    ),
    "qin_pet_one_class": Spec(
        (f"{QIN}/pet_bqml.nii.gz",),
        f"{QIN}/lesion_instances.nii.gz",
        ("PET",),
        ("background", "lesion"),
        ("data.lesion_labels=[1]", f"data.label_remap={QIN_REMAP}"),
        n_cases=1,
    ),
}
# single-scan folders have no wildcard to take a case id from
CASE_ID_REGEX = {"ibsi_ct": r"(ibsi1)_ct", "qin_pet_instances": r"(qin)_", "qin_pet_one_class": r"(qin)_"}


def make_dataset_cli(name: str, real: Path, out_dir: Path) -> Path:
    """``python -m pipeline make-dataset`` for ``SPECS[name]``; returns the dataset.json it wrote."""
    spec = SPECS[name]
    args = ["make-dataset"]
    for pattern in spec.images:
        args += ["--images", str(real / pattern)]
    args += [
        "--labels",
        str(real / spec.labels),
        "--channel-names",
        *spec.channel_names,
        "--label-names",
        *spec.label_names,
        "--output",
        str(out_dir / name / "dataset.json"),
    ]
    if name in CASE_ID_REGEX:
        args += ["--case-id-regex", CASE_ID_REGEX[name]]
    result = run_cli(*args, cwd=out_dir)
    assert result.returncode == 0, result.stderr
    return out_dir / name / "dataset.json"


def overrides(name: str) -> list[str]:
    return [arg for o in SPECS[name].overrides for arg in ("--set", o)]


# ----------------------------------------------------------------------------------------------- import


@pytest.mark.parametrize("name", sorted(SPECS))
def test_make_dataset_then_check_data(name, real_data_dir, tmp_path):
    spec = SPECS[name]
    manifest = make_dataset_cli(name, real_data_dir, tmp_path)

    # the manifest points at the shared scans: nothing is copied next to it, every path resolves there
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["dataset.json"]
    meta = json.loads(manifest.read_text())
    root = (manifest.parent / meta["root"]).resolve()
    entries = meta["training"]
    assert len(entries) == spec.n_cases
    for entry in entries:
        images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        assert len(images) == len(spec.channel_names)
        for rel in [*images, entry["label"]]:
            assert (root / rel).resolve().is_file() and real_data_dir in (root / rel).resolve().parents

    result = run_cli("check-data", "--dataset", str(manifest), *overrides(name), "-q", cwd=tmp_path)
    if spec.error is None:
        assert result.returncode == 0, result.stderr
        assert f"{spec.n_cases} training case(s) ({spec.n_cases} with lesions)" in result.stdout
        assert f"channels {list(spec.channel_names)}" in result.stdout
        return
    assert result.returncode == 3, (result.stdout, result.stderr)
    problems = result.stderr.strip().splitlines()
    assert problems[:2] == ["data error:", f"{spec.n_cases} problem(s) in the data set:"], result.stderr
    for entry, line in zip(entries, problems[2:], strict=True):
        expected = spec.error.format(root=re.escape(str(real_data_dir)), case=re.escape(entry["case_id"]))
        assert re.match(expected, line), f"{line!r} !~ {expected!r}"


# ----------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class RoundTrip:
    spec: str
    case_id: str
    lesion_labels: tuple[int, ...]
    remap: dict[int, int]
    resampled: bool  # the plan's spacing differs from the scan's (a real resampling in both directions)
    min_dice: float = 0.99


ROUND_TRIPS = {
    "mri_flair": RoundTrip("ms_flair_visit2", "patient01", (1,), {}, resampled=False),
    "mri_flair_zscored_multiclass": RoundTrip(
        "brats_flair_remapped", "brats_2013_pat0001_1", (1, 3), {3: 1, 4: 3}, resampled=False
    ),
    "ct_sarcoma": RoundTrip("sarcoma_ct", "STS_001", (1,), {}, resampled=False),
    "mri_t1_sarcoma": RoundTrip("sarcoma_mr", "STS_002", (1,), {}, resampled=False),
    "ct_lung": RoundTrip("ibsi_ct", "ibsi1", (1,), {}, resampled=False),
    # 6.5 mm slices, planned to ~3 mm (nnU-Net's anisotropy rule over brain1/brain2/breast1): upsampled and back
    "mri_nrrd_thick_slices": RoundTrip("pyradiomics_nrrd", "brain1", (1,), {}, resampled=True),
    # breast1 (0.66 x 0.66 x 2.1 mm) is planned coarser (0.78 x 0.78 x 2.98 mm): a 0.13 ml ROI loses detail on
    # the way down, which no inverse can restore; geometry is still exact
    "mri_nrrd_downsampled": RoundTrip("pyradiomics_nrrd", "breast1", (1,), {}, resampled=True, min_dice=0.7),
    "pet_multilesion": RoundTrip(
        "qin_pet_one_class", "qin", (1,), {v: 1 for v in range(2, 12)}, resampled=False
    ),
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


@pytest.mark.parametrize("modality", sorted(ROUND_TRIPS))
def test_preprocess_and_inverse_keep_geometry_exactly(modality, real_data_dir, tmp_path):
    from pipeline.config import config_from_dict
    from pipeline.io.dataset import load_dataset, read_case_image, read_case_label
    from pipeline.io.formats import image_suffix, read_volume, write_volume
    from pipeline.io.make_dataset import make_dataset
    from pipeline.preprocessing.fingerprint import compute_fingerprint
    from pipeline.preprocessing.plan import make_plan
    from pipeline.preprocessing.transform import invert_case, preprocess_case

    rt = ROUND_TRIPS[modality]
    spec = SPECS[rt.spec]
    manifest = make_dataset(
        [str(real_data_dir / p) for p in spec.images],
        str(real_data_dir / spec.labels),
        tmp_path / "ds" / "dataset.json",
        list(spec.channel_names),
        list(spec.label_names),
        case_id_regex=CASE_ID_REGEX.get(rt.spec),
    )
    cfg = config_from_dict(
        {
            "data": {
                "source": "msd",
                "dataset": str(manifest),
                "lesion_labels": list(rt.lesion_labels),
                "label_remap": rt.remap,
            }
        }
    )
    ds = load_dataset(cfg.data, cfg.paths.raw)
    fingerprint = compute_fingerprint(ds, [c.case_id for c in ds.training], cfg.data, workers=1)
    plan = make_plan(fingerprint, ds, cfg)

    case = ds.case(rt.case_id)
    image, label = read_case_image(case), read_case_label(case, rt.remap)
    img_out, lab_out, record = preprocess_case(image, label, plan, cfg.preprocess)
    assert lab_out is not None and img_out.shape == lab_out.shape == record.shape
    assert (record.resample.shape != record.crop.shape) == rt.resampled

    back = invert_case(lab_out, record, "label")
    assert back.shape == image.shape == label.shape
    np.testing.assert_allclose(back.affine, image.affine, rtol=0, atol=1e-6)
    for k in rt.lesion_labels:
        assert dice(back.data[0] == k, label.data[0] == k) >= rt.min_dice, f"lesion class {k}"
    if len(rt.lesion_labels) > 1:  # the union, as evaluated lesion by lesion
        union = list(rt.lesion_labels)
        assert dice(np.isin(back.data[0], union), np.isin(label.data[0], union)) >= rt.min_dice
    if not rt.resampled:  # nothing interpolated: every label value comes back exactly
        np.testing.assert_array_equal(back.data[0], label.data[0])

    # probabilities (here: the preprocessed image itself) come back on the same grid too, and writing the
    # result in the scan's own format (NIfTI or NRRD) keeps its geometry
    prob = invert_case(img_out, record, "prob")
    assert prob.shape == image.shape and np.allclose(prob.affine, image.affine, rtol=0, atol=1e-6)
    written = read_volume(write_volume(tmp_path / f"back{image_suffix(case.label)}", back))
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, read_volume(case.label).affine, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- end to end

TINY_RUN = [
    "tracking.enabled=false",
    "train.epochs=1",
    "train.steps_per_epoch=3",
    "train.model.base_filters=4",
    "train.num_workers=0",
    "train.device=cpu",
    "inference.device=cpu",
    "preprocess.workers=1",
    "data.val_fraction=0.25",
    "data.test_fraction=0.25",
    "evaluation.bootstrap=20",
]


def _sets(items: list[str]) -> list[str]:
    return [arg for o in items for arg in ("--set", o)]


def _run_stages(work: Path, settings: list[str]) -> None:
    for command in ("prepare-data", "preprocess", "train", "evaluate"):
        result = run_cli(command, *_sets(settings), "-q", cwd=work, timeout=600)
        assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"


def _lesion_count(label: np.ndarray, values) -> int:
    import cc3d

    return int(
        cc3d.connected_components(np.isin(label, list(values)).astype(np.uint8), connectivity=26).max()
    )


def _assert_predictions_on_input_grid(work: Path, manifest: Path) -> list[str]:
    """Every test scan has a probability and a label map with the shape and affine of its input file."""
    from pipeline.io.dataset import load_msd
    from pipeline.io.formats import read_volume

    ds = load_msd(manifest)
    test_ids = json.loads((work / "data" / "splits.json").read_text())["test"]
    assert test_ids
    for cid in test_ids:
        source = read_volume(ds.case(cid).images[0])
        for kind in ("probabilities", "labels"):
            pred = read_volume(work / "results" / "predictions" / kind / f"{cid}.nii.gz")
            assert pred.shape == source.shape, (cid, kind)
            np.testing.assert_allclose(pred.affine, source.affine, rtol=0, atol=1e-6)
    return test_ids


def _assert_lesion_metrics(metrics: dict, n_lesions: int) -> None:
    assert 0.0 <= metrics["cpm"] <= 1.0
    assert {"1", "8"} <= set(metrics["sensitivity_at_fp"])
    assert metrics["lesions_total"] == n_lesions


@pytest.mark.slow
def test_ms_longitudinal_two_visits_end_to_end(real_data_dir, tmp_path):
    """4 patients downsampled 5 x 5 x 2 (about 65 x 67 x 26 voxels at 3.6 x 3.6 x 6 mm), both visits as two
    channels, lesion changes as the lesion class: the whole CLI runs, predictions are on each input's grid."""
    from pipeline.io.formats import read_volume

    scans = tmp_path / "scans"
    for patient in sorted((real_data_dir / MS).glob("patient*")):
        for visit in ("study1", "study2"):
            write_downsampled(
                patient / f"{visit}_FLAIR_common.nii.gz",
                scans / patient.name / f"{visit}_FLAIR.nii.gz",
                (5, 5, 2),
                "image",
            )
        write_downsampled(
            patient / "lesion_change_mask.nii.gz", scans / patient.name / "lesion.nii.gz", (5, 5, 2), "label"
        )
    work = tmp_path / "work"
    work.mkdir()
    manifest = work / "manifest" / "dataset.json"
    made = run_cli(
        "make-dataset",
        "--images",
        str(scans / "*/study1_FLAIR.nii.gz"),
        "--images",
        str(scans / "*/study2_FLAIR.nii.gz"),
        "--labels",
        str(scans / "*/lesion.nii.gz"),
        "--channel-names",
        "FLAIR_visit1",
        "FLAIR_visit2",
        "--label-names",
        "background",
        "lesion_change",
        "--output",
        str(manifest),
        cwd=work,
    )
    assert made.returncode == 0, made.stderr

    _run_stages(work, ["data.source=msd", f"data.dataset={manifest}", "data.lesion_labels=[1]", *TINY_RUN])

    plan = json.loads((work / "data" / "preprocessed" / "plan.json").read_text())
    assert plan["channel_names"] == ["FLAIR_visit1", "FLAIR_visit2"] and plan["n_classes"] == 2
    test_ids = _assert_predictions_on_input_grid(work, manifest)
    metrics = json.loads((work / "results" / "evaluation" / "metrics.json").read_text())
    n_lesions = sum(
        _lesion_count(read_volume(scans / cid / "lesion.nii.gz").data[0], [1]) for cid in test_ids
    )
    _assert_lesion_metrics(metrics, n_lesions)
    assert set(metrics["dice"]) == {"lesion_change"}
    assert metrics["lesion_classes"] == {"1": "lesion_change"} and "per_class" not in metrics


@pytest.mark.slow
def test_brats_two_lesion_classes_end_to_end_and_predict_nrrd(real_data_dir, tmp_path):
    """4 BraTS cases downsampled 4 x 4 x 5 (60 x 60 x 31 voxels at 4 x 4 x 5 mm), FLAIR, BraTS labels remapped on
    read, lesion classes [1, 3]: FROC / CPM for their union and per class; then ``predict`` on a real NRRD
    MR (pyradiomics brain1) writes NRRD maps on that scan's grid."""
    from pipeline.io.dataset import remap_labels
    from pipeline.io.formats import read_volume

    scans = tmp_path / "scans"
    for case in sorted((real_data_dir / BRATS).glob("brats_*"))[:4]:
        write_downsampled(
            case / "Flair_subtrMeanDivStd.nii.gz", scans / case.name / "flair.nii.gz", (4, 4, 5), "image"
        )
        write_downsampled(
            case / "OTMultiClass.nii.gz", scans / case.name / "label.nii.gz", (4, 4, 5), "label"
        )
    work = tmp_path / "work"
    work.mkdir()
    manifest = work / "manifest" / "dataset.json"
    made = run_cli(
        "make-dataset",
        "--images",
        str(scans / "*/flair.nii.gz"),
        "--labels",
        str(scans / "*/label.nii.gz"),
        "--channel-names",
        "FLAIR",
        "--label-names",
        *BRATS_LABELS,
        "--output",
        str(manifest),
        cwd=work,
    )
    assert made.returncode == 0, made.stderr

    settings = [
        "data.source=msd",
        f"data.dataset={manifest}",
        "data.lesion_labels=[1,3]",
        f"data.label_remap={BRATS_REMAP}",
        *TINY_RUN,
    ]
    _run_stages(work, settings)

    test_ids = _assert_predictions_on_input_grid(work, manifest)
    metrics = json.loads((work / "results" / "evaluation" / "metrics.json").read_text())
    truth = {
        cid: remap_labels(read_volume(scans / cid / "label.nii.gz").data[0], {3: 1, 4: 3}) for cid in test_ids
    }
    _assert_lesion_metrics(metrics, sum(_lesion_count(t, [1, 3]) for t in truth.values()))
    assert metrics["lesion_classes"] == {"1": "necrosis_nonenhancing", "3": "enhancing"}
    assert set(metrics["dice"]) == {"necrosis_nonenhancing", "edema", "enhancing"}
    assert set(metrics["per_class"]) == {"necrosis_nonenhancing", "enhancing"}
    for k, name in ((1, "necrosis_nonenhancing"), (3, "enhancing")):
        per = metrics["per_class"][name]
        assert per["lesions_total"] == sum(_lesion_count(t, [k]) for t in truth.values())
        assert 0.0 <= per["cpm"] <= 1.0 and {"1", "8"} <= set(per["sensitivity_at_fp"])
        assert (work / "results" / "evaluation" / "per_class" / name / "froc.csv").is_file()

    nrrd = real_data_dir / PYRAD / "brain1_image.nrrd"
    result = run_cli(
        "predict",
        "--model",
        "models/best.pt",
        "--input",
        str(nrrd),
        "--output",
        "nrrd_out",
        *_sets(["inference.device=cpu"]),
        "-q",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    source = read_volume(nrrd)
    for kind in ("probabilities", "labels"):
        out = work / "nrrd_out" / kind / "brain1_image.nrrd"
        assert out.is_file(), sorted(p.name for p in (work / "nrrd_out").rglob("*"))
        pred = read_volume(out)
        assert pred.shape == source.shape
        np.testing.assert_allclose(pred.affine, source.affine, rtol=0, atol=1e-6)
    labels = read_volume(work / "nrrd_out" / "labels" / "brain1_image.nrrd").data
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
