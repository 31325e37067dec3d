"""pipeline/io/formats.py: NIfTI / NRRD / MHA / MHD / DICOM series in, exact geometry out, clear errors.

Every volume here is oblique and anisotropic, so a swapped axis, a lost LPS<->RAS flip or a spacing
applied to the wrong axis changes the affine and fails the test.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.io.formats import VolumeReadError, read_volume, write_volume
from pipeline.io.volume import Volume, make_affine

FORMATS = [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"]
SHAPE = (9, 8, 7)  # all different, so any axis swap changes the shape


def _data(channels: int, dtype) -> np.ndarray:
    rng = np.random.default_rng(channels)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-1024, 3000, size=(channels, *SHAPE)).astype(dtype)
    return rng.normal(0.0, 100.0, size=(channels, *SHAPE)).astype(dtype)


def _left_handed(affine: np.ndarray) -> np.ndarray:
    flipped = affine.copy()
    flipped[:3, 0] *= -1  # mirror the first axis: determinant < 0, as in many radiological-order scans
    return flipped


# ----------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize(("channels", "dtype"), [(1, np.int16), (1, np.float32), (3, np.float32)])
def test_round_trip_keeps_array_and_affine(tmp_path, oblique_affine, suffix, channels, dtype):
    vol = Volume(_data(channels, dtype), oblique_affine)
    path = write_volume(tmp_path / f"vol{suffix}", vol)
    back = read_volume(path)
    assert back.data.shape == (channels, *SHAPE)
    assert back.data.dtype == dtype
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, oblique_affine, rtol=0, atol=1e-6)
    assert back.data.flags.c_contiguous


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_of_a_left_handed_affine(tmp_path, oblique_affine, suffix):
    affine = _left_handed(oblique_affine)
    assert np.linalg.det(affine[:3, :3]) < 0
    vol = Volume(_data(2, np.float32), affine)
    back = read_volume(write_volume(tmp_path / f"vol{suffix}", vol))
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, affine, rtol=0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_keeps_the_float64_affine_exactly(tmp_path, oblique_affine, suffix):
    # 57.123456789 mm is not a float32: the sform alone would lose ~2e-6 mm
    assert np.float32(oblique_affine[1, 3]) != oblique_affine[1, 3]
    back = read_volume(write_volume(tmp_path / f"vol{suffix}", Volume(_data(1, np.float32), oblique_affine)))
    np.testing.assert_array_equal(back.affine, oblique_affine)


def test_nifti_float64_affine_is_ignored_once_another_tool_changes_the_sform(tmp_path, oblique_affine):
    path = write_volume(tmp_path / "vol.nii.gz", Volume(_data(1, np.float32), oblique_affine))
    img = nib.load(str(path))
    moved = oblique_affine.copy()
    moved[:3, 3] += [5.0, 0.0, 0.0]
    img.set_sform(moved, code=1)
    img.set_qform(moved, code=1)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, img.header), str(path))
    np.testing.assert_allclose(read_volume(path).affine, moved, atol=1e-4)  # the new header wins


def test_mhd_writes_header_and_raw_data_and_no_temporary_files(tmp_path, oblique_affine):
    write_volume(tmp_path / "out" / "vol.mhd", Volume(_data(1, np.int16), oblique_affine))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["vol.mhd", "vol.raw"]
    assert "ElementDataFile = vol.raw" in (tmp_path / "out" / "vol.mhd").read_text()


def test_nhdr_writes_header_and_data_and_no_temporary_files(tmp_path, oblique_affine):
    vol = Volume(_data(1, np.float32), oblique_affine)
    write_volume(tmp_path / "vol.nhdr", vol)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "vol.nhdr" and len(names) == 2 and names[1].startswith("vol."), names
    back = read_volume(tmp_path / "vol.nhdr")
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, oblique_affine, atol=1e-6)


@pytest.mark.parametrize("suffix", FORMATS)
def test_writes_leave_no_temporary_files(tmp_path, oblique_affine, suffix):
    write_volume(tmp_path / "sub" / f"vol{suffix}", Volume(_data(1, np.float32), oblique_affine))
    assert not [p.name for p in (tmp_path / "sub").iterdir() if p.name.startswith(".")]


def test_nifti_gzip_output_is_byte_identical(tmp_path, oblique_affine):
    vol = Volume(_data(1, np.int16), oblique_affine)
    a = write_volume(tmp_path / "a.nii.gz", vol).read_bytes()
    b = write_volume(tmp_path / "b.nii.gz", vol).read_bytes()
    assert a == b  # no mtime or (temporary) file name in the gzip header


def test_label_dtypes_are_compacted_on_write(tmp_path, oblique_affine):
    labels = np.zeros((1, *SHAPE), np.int64)
    labels[0, 1, 2, 3] = 2
    back = read_volume(write_volume(tmp_path / "lab.nii.gz", Volume(labels, oblique_affine)))
    assert back.data.dtype == np.uint8
    np.testing.assert_array_equal(back.data, labels)
    mask = read_volume(write_volume(tmp_path / "mask.mha", Volume(labels > 0, oblique_affine)))
    assert mask.data.dtype == np.uint8 and mask.data.sum() == 1


def test_unsupported_output_suffix(tmp_path, oblique_affine):
    with pytest.raises(ValueError, match=r"vol\.png: cannot write '\.png'"):
        write_volume(tmp_path / "vol.png", Volume(_data(1, np.float32), oblique_affine))


# ----------------------------------------------------------------------------------------------- conventions


def test_itk_lps_geometry_is_converted_to_ras(tmp_path):
    # an ITK image in LPS: origin (10, 20, 30) mm, spacing (1, 2, 3) mm, identity direction
    img = sitk.Image([4, 5, 6], sitk.sitkInt16)
    img.SetOrigin((10.0, 20.0, 30.0))
    img.SetSpacing((1.0, 2.0, 3.0))
    img[1, 2, 3] = 7  # ITK index (x, y, z)
    sitk.WriteImage(img, str(tmp_path / "lps.mha"))
    vol = read_volume(tmp_path / "lps.mha")
    # RAS = diag(-1, -1, 1) @ LPS: the x and y axes point to -R and -A
    np.testing.assert_array_equal(
        vol.affine, [[-1.0, 0, 0, -10.0], [0, -2.0, 0, -20.0], [0, 0, 3.0, 30.0], [0, 0, 0, 1]]
    )
    assert vol.data.shape == (1, 4, 5, 6)
    assert vol.data[0, 1, 2, 3] == 7 and vol.data.sum() == 7


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("channels", [1, 2])
def test_nibabel_and_sitk_map_a_voxel_to_the_same_world_point(tmp_path, oblique_affine, suffix, channels):
    vol = Volume(_data(channels, np.float32), oblique_affine)
    path = write_volume(tmp_path / f"vol{suffix}", vol)
    via_nib = read_volume(path, backend="nibabel")
    via_itk = read_volume(path, backend="sitk")
    np.testing.assert_array_equal(via_nib.data, via_itk.data)
    corners = np.array([[0, 0, 0], [8, 0, 0], [0, 7, 0], [0, 0, 6], [8, 7, 6], [4, 3, 2]])
    # SimpleITK reads the float32 sform: agreement within float32 precision of ~100 mm coordinates
    np.testing.assert_allclose(via_itk.voxel_to_world(corners), via_nib.voxel_to_world(corners), atol=1e-4)


def test_a_third_party_nifti_reads_the_same_through_both_backends(tmp_path):
    """A file written by plain nibabel (no float64 extension), oblique and mirrored, voxel (1, 2, 3) marked."""
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = make_affine((0.7, 0.9, 3.0), (-80.5, 120.25, -40.0), rot @ np.diag([-1.0, 1.0, 1.0]))
    arr = np.zeros(SHAPE, np.int16)
    arr[1, 2, 3] = 5
    nib.save(nib.Nifti1Image(arr, affine), str(tmp_path / "third.nii.gz"))
    via_nib = read_volume(tmp_path / "third.nii.gz", backend="nibabel")
    via_itk = read_volume(tmp_path / "third.nii.gz", backend="sitk")
    assert via_nib.data[0, 1, 2, 3] == 5 and via_itk.data[0, 1, 2, 3] == 5
    # voxel (1, 2, 3): origin + 1*0.7*(-col0) + 2*0.9*col1 + 3*3.0*col2 with col0 = (0, 1, 0), col1 = (-1, 0, 0)
    expected = np.array([-80.5 - 1.8, 120.25 - 0.7, -40.0 + 9.0])
    np.testing.assert_allclose(via_nib.voxel_to_world([1, 2, 3]), expected, atol=1e-5)
    np.testing.assert_allclose(via_itk.voxel_to_world([1, 2, 3]), expected, atol=1e-4)


# ----------------------------------------------------------------------------------------------- DICOM


def _write_dicom_series(
    folder: Path, vol: Volume, series_uid: str = "1.2.826.0.1.3680043.2.1125.7.1"
) -> None:
    """One file per slice, as a scanner would: position, orientation, spacing and number per slice."""
    from pipeline.io.formats import _to_sitk

    folder.mkdir(parents=True, exist_ok=True)
    img = _to_sitk(vol)  # LPS geometry
    d = img.GetDirection()
    sx, sy, sz = img.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.7",  # study
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0032": "\\".join(f"{c:.6f}" for c in img.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "\\".join(f"{c:.6f}" for c in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|0030": f"{sy:.6f}\\{sx:.6f}",  # row spacing (between rows = along y), column spacing
            "0018|0050": f"{sz:.6f}",
            "0020|0013": str(k + 1),
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder_round_trip(tmp_path, oblique_affine):
    vol = Volume(_data(1, np.int16), oblique_affine)
    _write_dicom_series(tmp_path / "series", vol)
    back = read_volume(tmp_path / "series")
    assert back.data.dtype == np.int16
    np.testing.assert_array_equal(back.data, vol.data)
    # DICOM stores geometry as decimal text (6 decimals here)
    np.testing.assert_allclose(back.affine, oblique_affine, rtol=0, atol=1e-4)


def test_dicom_folder_with_two_series_is_rejected(tmp_path, oblique_affine):
    vol = Volume(_data(1, np.int16), oblique_affine)
    _write_dicom_series(tmp_path / "mixed", vol, series_uid="1.2.3.4.1")
    for p in (tmp_path / "mixed").iterdir():
        p.rename(p.with_name("a_" + p.name))
    _write_dicom_series(tmp_path / "mixed", vol, series_uid="1.2.3.4.2")
    with pytest.raises(VolumeReadError, match=r"mixed: folder holds 2 DICOM series"):
        read_volume(tmp_path / "mixed")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(VolumeReadError, match=r"empty: folder holds no DICOM series"):
        read_volume(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------- bad files


@pytest.fixture
def good_nifti(tmp_path, oblique_affine) -> Path:
    return write_volume(tmp_path / "good.nii.gz", Volume(_data(1, np.float32), oblique_affine))


def test_truncated_nii_gz(tmp_path, good_nifti):
    raw = good_nifti.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(raw[: int(len(raw) * 0.8)])  # header intact, compressed data cut short
    with pytest.raises(VolumeReadError, match=rf"^{bad}: cannot read as NIfTI \(EOFError"):
        read_volume(bad)


def test_non_image_file_with_a_nii_gz_name(tmp_path):
    bad = tmp_path / "report.nii.gz"
    bad.write_text("this is a text report, not an image\n")
    with pytest.raises(VolumeReadError, match=rf"^{bad}: cannot read as NIfTI .*not a gzip file"):
        read_volume(bad)


def test_empty_file(tmp_path):
    bad = tmp_path / "empty.nii"
    bad.write_bytes(b"")
    with pytest.raises(VolumeReadError, match=rf"^{bad}: cannot read as NIfTI"):
        read_volume(bad)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("flat.nii.gz", lambda p: nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(p))),
        (
            "slice.nii.gz",
            lambda p: nib.save(nib.Nifti1Image(np.zeros((8, 8, 1), np.float32), np.eye(4)), str(p)),
        ),
        (
            "slice_rgb.nii.gz",
            lambda p: nib.save(nib.Nifti1Image(np.zeros((8, 8, 1, 3), np.float32), np.eye(4)), str(p)),
        ),
        ("flat.mha", lambda p: sitk.WriteImage(sitk.Image([8, 8], sitk.sitkFloat32), str(p))),
        ("slice.nrrd", lambda p: sitk.WriteImage(sitk.Image([8, 1, 8], sitk.sitkFloat32), str(p))),
        (
            "slice_vec.mha",
            lambda p: sitk.WriteImage(sitk.Image([8, 8, 1], sitk.sitkVectorFloat32, 3), str(p)),
        ),
    ],
)
def test_2d_images_are_rejected(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    with pytest.raises(VolumeReadError, match=rf"^{path}: .*2D"):
        read_volume(path)


def test_5d_nifti_is_rejected(tmp_path):
    path = tmp_path / "5d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2, 2), np.float32), np.eye(4)), str(path))
    with pytest.raises(
        VolumeReadError, match=rf"^{path}: expected a 3D image \(or 4D multi-channel\), got 5D"
    ):
        read_volume(path)


def test_missing_file(tmp_path):
    with pytest.raises(VolumeReadError, match=rf"^{tmp_path / 'nope.nii.gz'}: file not found"):
        read_volume(tmp_path / "nope.nii.gz")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(VolumeReadError, match=rf"^{path}: unsupported file type '\.png'"):
        read_volume(path)


def test_nibabel_backend_on_an_itk_file(tmp_path, oblique_affine):
    path = write_volume(tmp_path / "vol.nrrd", Volume(_data(1, np.float32), oblique_affine))
    with pytest.raises(VolumeReadError, match=rf"^{path}: cannot read as NIfTI"):
        read_volume(path, backend="nibabel")


def test_truncated_nrrd(tmp_path, oblique_affine):
    path = write_volume(tmp_path / "vol.nrrd", Volume(_data(1, np.float32), oblique_affine))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(VolumeReadError, match=rf"^{path}: cannot read image"):
        read_volume(path)


def test_singular_affine_is_rejected(tmp_path):
    path = tmp_path / "singular.nii"
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None)
    img.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)  # third axis has zero length
    nib.save(img, str(path))
    with pytest.raises(VolumeReadError, match=rf"^{path}: invalid geometry"):
        read_volume(path)


# ----------------------------------------------------------------------------------------------- real files

REAL_NIFTI = [
    "ibsi1_ct_lung_tumour/mask.nii.gz",  # qform 2, sform 1
    "ms_lesion_change_lit_longitudinal/patient01/lesion_change_mask.nii.gz",
    "qin_headneck_pet_multilesion/lesion_instances.nii.gz",
    "sts_softtissue_sarcoma_mirp/STS_002/MR_T1_image.nii.gz",  # qform only (sform code 0)
]


@pytest.mark.realdata
@pytest.mark.parametrize("rel", REAL_NIFTI)
def test_real_nifti_reads_the_same_through_both_backends_and_round_trips(real_data_dir, tmp_path, rel):
    path = real_data_dir / rel
    via_nib = read_volume(path, backend="nibabel")
    via_itk = read_volume(path, backend="sitk")
    np.testing.assert_array_equal(via_nib.data, via_itk.data)
    corners = np.array([[0, 0, 0], [s - 1 for s in via_nib.shape]])
    np.testing.assert_allclose(via_itk.voxel_to_world(corners), via_nib.voxel_to_world(corners), atol=1e-4)
    for suffix in (".nii.gz", ".nrrd"):
        back = read_volume(write_volume(tmp_path / f"copy{suffix}", via_nib))
        np.testing.assert_array_equal(back.data, via_nib.data)
        np.testing.assert_allclose(back.affine, via_nib.affine, rtol=0, atol=1e-6)


@pytest.mark.realdata
def test_real_nrrd_is_read_in_ras(real_data_dir):
    vol = read_volume(real_data_dir / "pyradiomics_testcases" / "breast1_image.nrrd")
    assert vol.data.shape == (1, 45, 120, 21) and vol.data.dtype == np.int16
    np.testing.assert_allclose(vol.spacing, (0.664, 0.664, 2.1), atol=1e-3)
    img = sitk.ReadImage(str(real_data_dir / "pyradiomics_testcases" / "breast1_image.nrrd"))
    lps = np.array(img.TransformContinuousIndexToPhysicalPoint((44.0, 119.0, 20.0)))
    np.testing.assert_allclose(vol.voxel_to_world([44, 119, 20]), lps * [-1, -1, 1], atol=1e-6)


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("multi_member", [False, True])
def test_nii_gz_in_memory_reader_equals_nibabel(tmp_path, image_class, byteorder, multi_member):
    """The in-memory .nii.gz path (one gzip.decompress) gives nib.load's values and dtype: scaled int16
    (scl_slope / scl_inter applied), NIfTI-2, big-endian data, 4D, and a file of two gzip members."""
    import gzip

    rng = np.random.default_rng(3)
    data = rng.integers(-500, 500, size=(*SHAPE, 2)).astype(np.dtype(np.int16).newbyteorder(byteorder))
    img = image_class(data, _left_handed(make_affine((0.7, 0.8, 2.5))))
    img.header.set_slope_inter(0.5, -3.0)
    plain = tmp_path / "scaled.nii"
    nib.save(img, plain)
    raw = plain.read_bytes()
    path = tmp_path / "scaled.nii.gz"
    cut = len(raw) // 2
    path.write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]) if multi_member else gzip.compress(raw))
    expected = np.asanyarray(nib.load(str(plain)).dataobj)
    vol = read_volume(path)
    assert vol.data.dtype == expected.dtype
    np.testing.assert_array_equal(vol.data, np.moveaxis(expected, -1, 0))
    np.testing.assert_array_equal(vol.affine, nib.load(str(plain)).affine)
