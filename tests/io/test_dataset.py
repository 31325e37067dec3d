"""pipeline/io/dataset.py: MSD and nnU-Net v2 dataset.json, CSV manifests, paths kept inside the root."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.io.dataset import (
    DatasetError,
    load_csv,
    load_dataset,
    load_msd,
    read_case_image,
    read_case_label,
    remap_labels,
)
from pipeline.io.formats import write_volume
from pipeline.io.volume import Volume

SHAPE = (10, 9, 8)


def _vol(affine: np.ndarray, value: float = 0.0, dtype=np.float32) -> Volume:
    data = np.full((1, *SHAPE), value, dtype=dtype)
    data[0, 1, 2, 3] = value + 1
    return Volume(data, affine)


def _manifest(root: Path, meta: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dataset.json"
    path.write_text(json.dumps(meta))
    return path


# ----------------------------------------------------------------------------------------------- MSD


def test_msd_dataset(tiny_msd_dataset):
    root = tiny_msd_dataset(n_cases=3)
    ds = load_msd(root)  # the folder or the file
    assert ds == load_msd(root / "dataset.json")
    assert ds.root == root and ds.manifest == root / "dataset.json" and ds.name == "tiny"
    assert ds.labels == {0: "background", 1: "organ", 2: "lesion"}
    assert ds.channel_names == ("CT",)
    assert [c.case_id for c in ds.training] == ["case_000", "case_001", "case_002"]
    assert ds.training[1].images == (root / "imagesTr" / "case_001.nii.gz",)
    assert ds.training[1].label == root / "labelsTr" / "case_001.nii.gz"
    assert ds.test == ()
    assert ds.case("case_002") is ds.training[2]
    with pytest.raises(KeyError, match="case_009"):
        ds.case("case_009")


def test_msd_reads_case_image_and_label(tiny_msd_dataset, oblique_affine):
    ds = load_msd(tiny_msd_dataset(n_cases=2))
    image = read_case_image(ds.training[0])
    label = read_case_label(ds.training[0])
    assert image.data.shape == (1, 16, 16, 16) and image.data.dtype == np.float32
    np.testing.assert_allclose(image.affine, oblique_affine, atol=1e-6)
    assert np.issubdtype(label.data.dtype, np.integer)
    assert set(np.unique(label.data)) == {0, 1, 2}  # case_000 has a lesion
    assert int((label.data == 2).sum()) == 8  # the 2x2x2 lesion cube of the fixture
    assert set(np.unique(read_case_label(ds.training[1]).data)) == {0, 1}  # case_001 is lesion-free


def test_msd_4d_multichannel_image(tiny_msd_dataset):
    ds = load_msd(tiny_msd_dataset(n_cases=2, channels=2))
    assert ds.channel_names == ("MR0", "MR1")
    image = read_case_image(ds.training[0])
    assert image.data.shape == (2, 16, 16, 16)
    np.testing.assert_allclose(image.data[1] - image.data[0], 10.0, atol=1e-4)  # channel c = base + 10 c


def test_msd_one_file_per_channel_nnunet_v2_labels_and_test_list(tmp_path, oblique_affine):
    root = tmp_path / "ds"
    for c in range(2):
        write_volume(root / "imagesTr" / f"a_{c:04d}.nii.gz", _vol(oblique_affine, value=100.0 * c))
        write_volume(root / "imagesTs" / f"b_{c:04d}.nii.gz", _vol(oblique_affine, value=100.0 * c))
    write_volume(root / "labelsTr" / "a.nii.gz", _vol(oblique_affine, dtype=np.uint8))
    _manifest(
        root,
        {
            "channel_names": {"1": "T1", "0": "FLAIR"},  # key order must not matter
            "labels": {"background": 0, "lesion": 1},  # nnU-Net v2 style: name -> value
            "training": [
                {
                    "image": ["./imagesTr/a_0000.nii.gz", "./imagesTr/a_0001.nii.gz"],
                    "label": "./labelsTr/a.nii.gz",
                }
            ],
            "test": [["./imagesTs/b_0000.nii.gz", "./imagesTs/b_0001.nii.gz"]],
        },
    )
    ds = load_msd(root)
    assert ds.channel_names == ("FLAIR", "T1")
    assert ds.labels == {0: "background", 1: "lesion"}
    assert [c.case_id for c in ds.training] == ["a"] and [c.case_id for c in ds.test] == ["b"]
    assert ds.test[0].label is None
    image = read_case_image(ds.training[0])
    assert image.data.shape == (2, *SHAPE)
    assert image.data[0, 0, 0, 0] == 0.0 and image.data[1, 0, 0, 0] == 100.0


def test_channel_files_on_different_grids_are_rejected(tmp_path, oblique_affine):
    root = tmp_path / "ds"
    moved = oblique_affine.copy()
    moved[:3, 3] += 2.0
    write_volume(root / "imagesTr" / "a_0000.nii.gz", _vol(oblique_affine))
    write_volume(root / "imagesTr" / "a_0001.nii.gz", _vol(moved))
    write_volume(root / "labelsTr" / "a.nii.gz", _vol(oblique_affine, dtype=np.uint8))
    _manifest(
        root,
        {
            "labels": {"0": "bg", "1": "x"},
            "modality": {"0": "A", "1": "B"},
            "training": [
                {"image": ["imagesTr/a_0000.nii.gz", "imagesTr/a_0001.nii.gz"], "label": "labelsTr/a.nii.gz"}
            ],
        },
    )
    with pytest.raises(ValueError, match=r"case a: .*a_0001\.nii\.gz: channel grid differs .*origin"):
        read_case_image(load_msd(root).training[0])


def test_nnunet_v2_raw_layout_is_discovered_from_file_ending(tmp_path, oblique_affine):
    root = tmp_path / "Dataset501_Lesions"
    for case in ("BRATS_002", "BRATS_001"):
        for c in range(2):
            write_volume(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", _vol(oblique_affine, value=10.0 * c))
        write_volume(root / "labelsTr" / f"{case}.nii.gz", _vol(oblique_affine, dtype=np.uint8))
    _manifest(
        root,
        {
            "channel_names": {"0": "FLAIR", "1": "T1"},
            "labels": {"background": 0, "lesion": 1},
            "numTraining": 2,
            "file_ending": ".nii.gz",
        },
    )
    ds = load_msd(root)
    assert ds.name == "Dataset501_Lesions"
    assert [c.case_id for c in ds.training] == ["BRATS_001", "BRATS_002"]
    case = ds.training[0]
    assert case.images == (
        root / "imagesTr" / "BRATS_001_0000.nii.gz",
        root / "imagesTr" / "BRATS_001_0001.nii.gz",
    )
    assert case.label == root / "labelsTr" / "BRATS_001.nii.gz"
    assert read_case_image(case).data.shape == (2, *SHAPE)


def test_nnunet_v2_layout_without_images(tmp_path):
    root = tmp_path / "Dataset502_Empty"
    (root / "imagesTr").mkdir(parents=True)
    manifest = _manifest(
        root,
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"},
    )
    with pytest.raises(DatasetError, match=rf"{manifest}: no training images match .*imagesTr/\*\.nii\.gz"):
        load_msd(root)


def test_region_based_labels_are_not_supported(tmp_path):
    manifest = _manifest(
        tmp_path,
        {
            "labels": {"background": 0, "whole_tumour": [1, 2]},
            "training": [{"image": "a.nii.gz", "label": "b.nii.gz"}],
        },
    )
    with pytest.raises(DatasetError, match=rf"{manifest}: region-based label 'whole_tumour'"):
        load_msd(tmp_path)


# ----------------------------------------------------------------------------------------------- bad manifests


def test_dataset_json_that_is_not_valid_json(tmp_path):
    manifest = tmp_path / "dataset.json"
    manifest.write_text('{"labels": {"0": "background"}, "training": [')
    with pytest.raises(DatasetError, match=rf"^{manifest}: not valid JSON") as info:
        load_msd(tmp_path)
    assert info.value.problems == [str(info.value)]


def test_dataset_json_that_is_not_an_object(tmp_path):
    manifest = _manifest(tmp_path, ["a", "b"])  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match=rf"^{manifest}: top level must be a JSON object"):
        load_msd(manifest)


def test_missing_dataset_json(tmp_path):
    with pytest.raises(DatasetError, match=rf"^{tmp_path / 'dataset.json'}: dataset.json not found"):
        load_msd(tmp_path)


def test_empty_training_list(tmp_path):
    manifest = _manifest(tmp_path, {"labels": {"0": "bg", "1": "lesion"}, "training": []})
    with pytest.raises(DatasetError, match=rf"^{manifest}: the training list is empty") as info:
        load_msd(tmp_path)
    assert len(info.value.problems) == 1


def test_empty_training_list_is_reported_with_other_problems(tmp_path):
    # the folder name contains "training": an earlier version used that word to decide what to report
    root = tmp_path / "training_data"
    manifest = _manifest(root, {"labels": {}, "training": []})
    with pytest.raises(DatasetError) as info:
        load_msd(root)
    assert info.value.problems == [
        f"{manifest}: 'labels' must be a non-empty mapping",
        f"{manifest}: the training list is empty; at least one labelled case is needed",
    ]


def test_no_training_key(tmp_path):
    manifest = _manifest(tmp_path, {"labels": {"0": "bg"}})
    with pytest.raises(DatasetError, match=rf"{manifest}: no 'training' list"):
        load_msd(tmp_path)


def test_training_entry_without_label_is_rejected(tmp_path):
    manifest = _manifest(
        tmp_path,
        {
            "labels": {"0": "bg", "1": "x"},
            "training": [{"image": "a.nii.gz", "label": "la.nii.gz"}, {"image": "b.nii.gz"}],
        },
    )
    with pytest.raises(DatasetError) as info:
        load_msd(tmp_path)
    assert info.value.problems == [f"{manifest}: training[1] (b.nii.gz) has no 'label'"]


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"labels": {"0": "bg", "one": "x"}}, r"label entry 'one': 'x' is not an integer label"),
        ({"labels": []}, r"'labels' must be a non-empty mapping"),
        (
            {"labels": {"0": "bg"}, "modality": {}},
            r"'modality' / 'channel_names' must be a non-empty mapping",
        ),
        (
            {"labels": {"0": "bg"}, "modality": {"CT": "0"}},
            r"'modality' / 'channel_names' keys must be channel indices",
        ),
        ({"labels": {"0": "bg"}, "training": {"image": "a"}}, r"'training' must be a list"),
        ({"labels": {"0": "bg"}, "training": ["a.nii.gz"]}, r"training\[0\] needs an 'image'"),
        (
            {
                "labels": {"0": "bg"},
                "training": [
                    {"image": "a/x.nii.gz", "label": "l.nii.gz"},
                    {"image": "b/x.nii.gz", "label": "m.nii.gz"},
                ],
            },
            r"duplicate case id 'x'",
        ),
    ],
)
def test_invalid_manifest_entries(tmp_path, meta, message):
    meta = {"training": [{"image": "a.nii.gz", "label": "la.nii.gz"}], **meta}
    manifest = _manifest(tmp_path, meta)
    with pytest.raises(DatasetError, match=rf"{manifest}: {message}"):
        load_msd(tmp_path)


@pytest.mark.parametrize(
    "rel",
    ["../outside.nii.gz", "imagesTr/../../outside.nii.gz", "/etc/passwd", "../ds_evil/a.nii.gz"],
)
def test_paths_escaping_the_root_are_rejected(tmp_path, rel):
    root = tmp_path / "ds"  # "../ds_evil" shares the root's name as a prefix: still outside
    manifest = _manifest(
        root, {"labels": {"0": "bg", "1": "x"}, "training": [{"image": rel, "label": "labelsTr/a.nii.gz"}]}
    )
    with pytest.raises(DatasetError) as info:
        load_msd(root)
    assert info.value.problems == [f"{manifest}: path {rel!r} escapes the data set root {root}"]


def test_escaping_label_and_test_paths_are_rejected_too(tmp_path):
    root = tmp_path / "ds"
    manifest = _manifest(
        root,
        {
            "labels": {"0": "bg", "1": "x"},
            "training": [{"image": "imagesTr/a.nii.gz", "label": "../a.nii.gz"}],
            "test": ["../../b.nii.gz"],
        },
    )
    with pytest.raises(DatasetError) as info:
        load_msd(root)
    assert info.value.problems == [
        f"{manifest}: path '../a.nii.gz' escapes the data set root {root}",
        f"{manifest}: path '../../b.nii.gz' escapes the data set root {root}",
    ]


def test_paths_that_stay_inside_the_root_are_accepted(tmp_path):
    root = tmp_path / "ds"
    _manifest(
        root,
        {
            "labels": {"0": "bg", "1": "x"},
            "training": [{"image": "imagesTr/../imagesTr/./a.nii.gz", "label": "labelsTr/a.nii.gz"}],
        },
    )
    assert load_msd(root).training[0].images == (root / "imagesTr" / "a.nii.gz",)


def test_explicit_root_is_where_paths_resolve(tmp_path):
    data = tmp_path / "scans"
    manifest = _manifest(
        tmp_path / "meta",
        {"labels": {"0": "bg", "1": "x"}, "training": [{"image": "a.nii.gz", "label": "la.nii.gz"}]},
    )
    ds = load_msd(manifest, root=data)
    assert ds.root == data and ds.training[0].images == (data / "a.nii.gz",)
    with pytest.raises(DatasetError, match="escapes the data set root"):
        _manifest(
            tmp_path / "meta",
            {"labels": {"0": "bg"}, "training": [{"image": "../meta/a.nii.gz", "label": "la.nii.gz"}]},
        )
        load_msd(manifest, root=data)


def test_all_manifest_problems_are_reported_at_once(tmp_path):
    manifest = _manifest(
        tmp_path / "ds",
        {
            "labels": {"0": "bg", "x": "y"},
            "training": [{"image": "../a.nii.gz", "label": "la.nii.gz"}, {"image": "b.nii.gz"}],
        },
    )
    with pytest.raises(DatasetError) as info:
        load_msd(manifest)
    assert len(info.value.problems) == 3
    assert all(p.startswith(f"{manifest}: ") for p in info.value.problems)


# ----------------------------------------------------------------------------------------------- CSV


def _csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_csv_manifest(tmp_path, oblique_affine):
    for name in ("a", "b", "c"):
        write_volume(tmp_path / "img" / f"{name}.nii.gz", _vol(oblique_affine))
        write_volume(tmp_path / "lab" / f"{name}.nii.gz", _vol(oblique_affine, dtype=np.uint8))
    manifest = _csv(
        tmp_path / "cases.csv",
        "case_id,image,label\npat1,img/a.nii.gz,lab/a.nii.gz\n,img/b.nii.gz,lab/b.nii.gz\npat3,img/c.nii.gz,\n",
    )
    ds = load_csv(manifest, labels={0: "bg", 1: "lesion"})
    assert ds.root == tmp_path and ds.name == "cases"
    assert [c.case_id for c in ds.training] == ["pat1", "b"]  # without case_id: from the file name
    assert [c.case_id for c in ds.test] == ["pat3"] and ds.test[0].label is None  # empty label: unlabelled
    assert ds.training[0].images == (tmp_path / "img" / "a.nii.gz",)
    assert ds.channel_names == ("channel0",)
    assert read_case_image(ds.training[0]).data.shape == (1, *SHAPE)


def test_csv_multichannel_in_column_order(tmp_path, oblique_affine):
    for c, name in enumerate(("flair", "t1")):
        write_volume(tmp_path / f"{name}.nii.gz", _vol(oblique_affine, value=100.0 * c))
    write_volume(tmp_path / "seg.nii.gz", _vol(oblique_affine, dtype=np.uint8))
    manifest = _csv(tmp_path / "m.csv", "image_flair,image_t1,label\nflair.nii.gz,t1.nii.gz,seg.nii.gz\n")
    ds = load_csv(manifest, labels={0: "bg", 1: "lesion"}, channel_names=("FLAIR", "T1"))
    assert ds.channel_names == ("FLAIR", "T1")
    assert ds.training[0].images == (tmp_path / "flair.nii.gz", tmp_path / "t1.nii.gz")
    image = read_case_image(ds.training[0])
    assert image.data.shape == (2, *SHAPE) and image.data[1, 0, 0, 0] == 100.0


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("image,label\n../x.nii.gz,y.nii.gz\n", {}, r"path '\.\./x\.nii\.gz' escapes the data set root"),
        ("image,label\nx.nii.gz,/etc/passwd\n", {}, r"path '/etc/passwd' escapes the data set root"),
        ("scan,label\nx.nii.gz,y.nii.gz\n", {}, r"no 'image' column in header \['scan', 'label'\]"),
        ("image,label\nx.nii.gz,\n", {}, r"no labelled cases"),
        ("image,label\n", {}, r"no labelled cases"),
        ("image,label\nx.nii.gz,y.nii.gz\n", {"labels": None}, r"a CSV data set needs declared labels"),
        ("case_id,image,label\nA,x.nii.gz,y.nii.gz\nA,z.nii.gz,w.nii.gz\n", {}, r"duplicate case id 'A'"),
    ],
)
def test_bad_csv_manifests(tmp_path, text, kwargs, message):
    manifest = _csv(tmp_path / "data" / "m.csv", text)
    with pytest.raises(DatasetError, match=rf"{manifest}: {message}"):
        load_csv(manifest, **{"labels": {0: "bg", 1: "x"}, **kwargs})


def test_missing_csv(tmp_path):
    with pytest.raises(DatasetError, match=r"m\.csv: CSV manifest not found"):
        load_csv(tmp_path / "m.csv", labels={0: "bg"})


# ----------------------------------------------------------------------------------------------- config glue


def test_load_dataset_from_config(tiny_msd_dataset, tmp_path):
    root = tiny_msd_dataset(n_cases=2)
    cfg = load_config(None, ["data.source=msd", f"data.dataset={root}"])
    assert load_dataset(cfg.data, tmp_path / "unused").labels == {0: "background", 1: "organ", 2: "lesion"}
    # declared labels / channel names in the config override dataset.json
    cfg = load_config(
        None,
        [
            "data.source=msd",
            f"data.dataset={root}",
            "data.labels={0: bg, 2: tumour}",
            "data.channel_names=[CT1]",
        ],
    )
    ds = load_dataset(cfg.data, tmp_path / "unused")
    assert ds.labels == {0: "bg", 2: "tumour"} and ds.channel_names == ("CT1",)
    # synthetic source: the data set lives in paths.raw
    assert load_dataset(load_config(None).data, root).root == root


def test_load_dataset_csv_needs_labels_from_config(tmp_path):
    manifest = _csv(tmp_path / "m.csv", "image,label\na.nii.gz,b.nii.gz\n")
    cfg = load_config(None, ["data.source=csv", f"data.dataset={manifest}"])
    with pytest.raises(DatasetError, match="needs declared labels"):
        load_dataset(cfg.data, tmp_path)
    cfg = load_config(None, ["data.source=csv", f"data.dataset={manifest}", "data.labels={0: bg, 1: lesion}"])
    assert load_dataset(cfg.data, tmp_path).labels == {0: "bg", 1: "lesion"}


# ----------------------------------------------------------------------------------------------- labels


def test_remap_is_simultaneous():
    label = np.array([0, 1, 2, 3])
    np.testing.assert_array_equal(remap_labels(label, {1: 2, 2: 1}), [0, 2, 1, 3])
    np.testing.assert_array_equal(remap_labels(label, {3: 0}), [0, 1, 2, 0])
    assert remap_labels(label, None) is label


def test_read_case_label_remaps_and_checks(tmp_path, oblique_affine):
    from pipeline.io.dataset import Case

    lab = np.zeros((1, *SHAPE), np.float32)
    lab[0, 1, 1, 1] = 4.0
    write_volume(tmp_path / "float_label.nii.gz", Volume(lab, oblique_affine))
    case = Case("c", (tmp_path / "x.nii.gz",), tmp_path / "float_label.nii.gz")
    out = read_case_label(case, remap={4: 2})
    assert np.issubdtype(out.data.dtype, np.integer) and out.data[0, 1, 1, 1] == 2 and out.data.sum() == 2

    lab[0, 2, 2, 2] = 0.5
    write_volume(tmp_path / "soft.nii.gz", Volume(lab, oblique_affine))
    with pytest.raises(ValueError, match=r"case c: .*soft\.nii\.gz: label map has non-integer values"):
        read_case_label(Case("c", (tmp_path / "x.nii.gz",), tmp_path / "soft.nii.gz"))

    write_volume(tmp_path / "two.nii.gz", Volume(np.zeros((2, *SHAPE), np.uint8), oblique_affine))
    with pytest.raises(ValueError, match=r"two\.nii\.gz: label map has 2 channels, expected 1"):
        read_case_label(Case("c", (tmp_path / "x.nii.gz",), tmp_path / "two.nii.gz"))
    with pytest.raises(ValueError, match="case c: has no label file"):
        read_case_label(Case("c", (tmp_path / "x.nii.gz",), None))
