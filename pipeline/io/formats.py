"""Read and write volumes: NIfTI (nibabel), NRRD / MHA / MHD and DICOM series (SimpleITK).

Every reader returns a :class:`~pipeline.io.volume.Volume` (channel-first array + RAS affine in mm);
every writer takes one. ITK's LPS geometry is converted to RAS here and nowhere else.

NIfTI-1 stores its affine as float32 (an origin of ~100 mm keeps ~1e-5 mm), and SimpleITK cannot read
NIfTI-2. So we write NIfTI-1 and also keep the float64 affine in a comment header extension; our reader
uses it only while it still agrees with the float32 sform (a tool that edits the header invalidates it),
so geometry survives our own round trips exactly and every other tool reads a standard NIfTI-1 file.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.io.atomic import atomic_path
from pipeline.io.volume import LPS_TO_RAS, Volume

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED = NIFTI_SUFFIXES + ITK_SUFFIXES + ("<DICOM series folder>",)


class VolumeReadError(ValueError):
    """A file could not be read as a volume; the message names the file and the problem."""


def image_suffix(path: str | Path) -> str:
    name = Path(path).name.lower()
    for suffix in NIFTI_SUFFIXES[::-1] + ITK_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(path).suffix.lower()


def strip_suffix(path: str | Path) -> str:
    """File name without its image suffix: ``case_001.nii.gz`` -> ``case_001``."""
    name = Path(path).name
    suffix = image_suffix(path)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def is_volume_path(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() or image_suffix(path) in NIFTI_SUFFIXES + ITK_SUFFIXES


def read_volume(path: str | Path, backend: str = "auto") -> Volume:
    """Read a NIfTI / NRRD / MHA / MHD file or a DICOM series folder.

    Args:
        path: the file, or a folder holding exactly one DICOM series.
        backend: ``"auto"`` (nibabel for NIfTI, SimpleITK otherwise), ``"nibabel"`` or ``"sitk"``.

    Returns:
        Volume with data ``(C, X, Y, Z)`` (C-contiguous, dtype as stored) and a RAS affine in mm.

    Raises:
        VolumeReadError: missing, unreadable, truncated, not an image, or not 3D / 4D.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"{path}: file not found")
    suffix = image_suffix(path)
    if path.is_dir():
        vol = _read_dicom_series(path)
    elif backend == "nibabel" or (backend == "auto" and suffix in NIFTI_SUFFIXES):
        vol = _read_nibabel(path)
    elif backend in ("sitk", "auto") and (suffix in ITK_SUFFIXES + NIFTI_SUFFIXES or backend == "sitk"):
        vol = _read_sitk(path)
    else:
        raise VolumeReadError(f"{path}: unsupported file type {suffix!r} (supported: {', '.join(SUPPORTED)})")
    if not np.all(np.isfinite(vol.affine)) or abs(np.linalg.det(vol.affine[:3, :3])) < 1e-12:
        raise VolumeReadError(f"{path}: invalid geometry (singular or non-finite affine)")
    return vol


def _to_volume(path: Path, data: np.ndarray, affine: np.ndarray, channels_last: bool) -> Volume:
    """Arrange a 3D / 4D array as (C, X, Y, Z)."""
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI (x, y, z, 1, c)
        data = data[:, :, :, 0, :]
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, -1, 0) if channels_last else data
    else:
        raise VolumeReadError(f"{path}: expected a 3D image (or 4D multi-channel), got {data.ndim}D shape {data.shape}")
    _require_3d(path, data.shape[1:])
    return Volume(np.ascontiguousarray(data), affine)


def _require_3d(path: Path, spatial_shape: tuple[int, ...]) -> None:
    # a single slice is a 2D image, with one channel or several
    if min(spatial_shape) < 2:
        raise VolumeReadError(f"{path}: image is 2D (spatial shape {tuple(spatial_shape)}); a 3D volume is "
                              "required")


def _load_nifti_gz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) of a ``.nii.gz`` file decompressed in memory with one :func:`gzip.decompress` call.

    Why not ``nib.load``: its GzipFile reads 8 KB of compressed data per Python-level step and takes the
    GIL back after each, so a reader thread (the evaluation reads in threads) stalls behind a busy thread
    (waits of up to the 5 ms switch interval, ~1000 times per 8 MB volume). One ``gzip.decompress`` call
    releases the GIL for whole blocks of the output and is faster alone too. Peak memory stays two copies
    of the data (the decompressed bytes, then the array), as with ``nib.load`` plus the C-order copy.
    """
    import gzip

    import nibabel as nib

    try:
        raw = gzip.decompress(path.read_bytes())
    except gzip.BadGzipFile as exc:
        raise gzip.BadGzipFile(f"not a gzip file ({exc})") from None
    image_class = nib.Nifti2Image if nib.Nifti2Header.may_contain_header(raw[:540]) else nib.Nifti1Image
    img = image_class.from_bytes(raw)
    del raw  # the image's BytesIO still holds it: the image goes too on return
    return np.asanyarray(img.dataobj), _nifti_affine(img)


def _read_nibabel(path: Path) -> Volume:
    import nibabel as nib

    try:
        if image_suffix(path) == ".nii.gz":
            data, affine = _load_nifti_gz(path)
        else:
            img = nib.load(str(path))
            data, affine = np.asanyarray(img.dataobj), _nifti_affine(img)
    except Exception as exc:  # nibabel raises many types for corrupt / truncated files
        raise VolumeReadError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from None
    if data.ndim < 3:
        raise VolumeReadError(f"{path}: expected a 3D image (or 4D multi-channel), got {data.ndim}D shape {data.shape}")
    if data.ndim == 3 and 1 in data.shape:
        raise VolumeReadError(f"{path}: image is 2D (shape {data.shape}); a 3D volume is required")
    return _to_volume(path, data, affine, channels_last=True)


_AFFINE_TAG = "rare-lesion-pipeline affine float64:"


def _nifti_affine(img) -> np.ndarray:
    affine = np.asarray(img.affine, dtype=np.float64)
    for ext in img.header.extensions:
        content = ext.get_content()
        text = content.decode(errors="ignore") if isinstance(content, bytes) else str(content)
        if text.startswith(_AFFINE_TAG):
            try:
                exact = np.array(json.loads(text[len(_AFFINE_TAG):]), dtype=np.float64).reshape(4, 4)
            except (ValueError, TypeError):
                continue
            if np.array_equal(exact.astype(np.float32), affine.astype(np.float32)):
                return exact
    return affine


def _sitk_geometry_to_ras(spacing, origin, direction) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ (np.asarray(direction, dtype=np.float64) * np.asarray(spacing, dtype=np.float64))
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)
    return affine


def _sitk_image_to_volume(path: Path, img) -> Volume:
    import SimpleITK as sitk

    dim = img.GetDimension()
    if dim < 3:
        raise VolumeReadError(f"{path}: image is {dim}D (size {img.GetSize()}); a 3D volume is required")
    if dim > 4:
        raise VolumeReadError(f"{path}: {dim}D images are not supported")
    arr = sitk.GetArrayFromImage(img)  # (z, y, x) | (z, y, x, c) | (t, z, y, x)
    if dim == 3 and img.GetNumberOfComponentsPerPixel() > 1:
        data = np.transpose(arr, (3, 2, 1, 0))
    elif dim == 3:
        if 1 in arr.shape:
            raise VolumeReadError(f"{path}: image is 2D (size {img.GetSize()}); a 3D volume is required")
        data = arr.T[None]
    else:
        data = np.transpose(arr, (0, 3, 2, 1))
    _require_3d(path, data.shape[1:])
    direction = np.asarray(img.GetDirection()).reshape(dim, dim)[:3, :3]
    affine = _sitk_geometry_to_ras(img.GetSpacing()[:3], img.GetOrigin()[:3], direction)
    return Volume(np.ascontiguousarray(data), affine)


def _read_sitk(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        raise VolumeReadError(f"{path}: cannot read image ({msg[-1] if msg else type(exc).__name__})") from None
    return _sitk_image_to_volume(path, img)


def _read_dicom_series(folder: Path) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise VolumeReadError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        raise VolumeReadError(
            f"{folder}: folder holds {len(series)} DICOM series ({', '.join(series)}); point at one series"
        )
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except Exception as exc:
        raise VolumeReadError(f"{folder}: cannot read DICOM series ({str(exc).strip().splitlines()[-1]})") from None
    if img.GetDimension() == 3 and img.GetSize()[2] < 2:
        raise VolumeReadError(f"{folder}: DICOM series has a single slice; a 3D volume is required")
    return _sitk_image_to_volume(folder, img)


def _compact_dtype(data: np.ndarray) -> np.ndarray:
    """int64 / bool label arrays -> the smallest integer type that holds them (NIfTI/ITK support)."""
    if data.dtype == bool:
        return data.astype(np.uint8)
    if data.dtype in (np.int64, np.uint64, np.int32, np.uint32) and data.size:
        lo, hi = int(data.min()), int(data.max())
        for dtype in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return data.astype(dtype)
    return data


def write_volume(path: str | Path, volume: Volume) -> Path:
    """Write ``volume`` atomically; the format follows the suffix (.nii, .nii.gz, .nrrd, .mha, .mhd)."""
    path = Path(path)
    suffix = image_suffix(path)
    data = _compact_dtype(volume.data)
    if suffix in NIFTI_SUFFIXES:
        with atomic_path(path) as tmp:
            _write_nibabel(tmp, Volume(data, volume.affine))
    elif suffix in (".mhd", ".nhdr"):  # a header plus a separate data file
        _write_detached(path, Volume(data, volume.affine), compress=suffix == ".nhdr")
    elif suffix in ITK_SUFFIXES:
        with atomic_path(path) as tmp:
            _write_sitk(tmp, Volume(data, volume.affine))
    else:
        raise ValueError(f"{path}: cannot write {suffix!r} (use one of {', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)})")
    return path


def _write_nibabel(path: Path, volume: Volume) -> None:
    import nibabel as nib

    data = volume.data[0] if volume.n_channels == 1 else np.moveaxis(volume.data, 0, -1)
    affine = volume.affine
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if not np.array_equal(affine.astype(np.float32).astype(np.float64), affine):
        text = _AFFINE_TAG + json.dumps([repr(float(x)) for x in affine.ravel()]).replace('"', "")
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", text.encode()))
    nib.save(img, str(path))


def _to_sitk(volume: Volume):
    import SimpleITK as sitk

    if volume.n_channels == 1:
        img = sitk.GetImageFromArray(volume.data[0].T)
    else:
        img = sitk.GetImageFromArray(np.transpose(volume.data, (3, 2, 1, 0)), isVector=True)
    lps = LPS_TO_RAS @ volume.affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in LPS_TO_RAS @ volume.affine[:3, 3]))
    img.SetDirection(tuple(float(d) for d in (lps / spacing).ravel()))
    return img


def _write_sitk(path: Path, volume: Volume) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(_to_sitk(volume), str(path), useCompression=True)


def _write_detached(path: Path, volume: Volume, compress: bool) -> None:
    """Header + separate data file (MetaImage .mhd/.raw, NRRD .nhdr/.raw.gz): write both in a temp folder
    under their final names (the header refers to the data file by name), then move data first, header last."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        sitk.WriteImage(_to_sitk(volume), str(tmpdir / path.name), useCompression=compress)
        for produced in sorted(tmpdir.iterdir(), key=lambda p: p.name == path.name):
            produced.replace(path.parent / produced.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
