"""Which files make up each scan to predict (a file, a DICOM folder, nnU-Net-style channel groups), and
the suffix its outputs get."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.io.formats import NIFTI_SUFFIXES, image_suffix, is_volume_path, strip_suffix

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def collect_inputs(path: Path, n_channels: int) -> list[tuple[str, list[Path]]]:
    """(case name, files) for a file, a DICOM folder, or a folder of images.

    Multi-channel models read nnU-Net-style ``<case>_0000.nii.gz, <case>_0001.nii.gz`` file groups (or a
    single 4D file per case).
    """
    if path.is_file() or (path.is_dir() and not any(is_volume_path(p) and p.is_file() for p in path.iterdir())
                          and not any(p.is_dir() for p in path.iterdir())):
        return [(_strip_channel_0(strip_suffix(path)), [path])]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: input not found")
    files = sorted(p for p in path.iterdir() if (p.is_file() and is_volume_path(p)) or p.is_dir())
    if not files:
        raise FileNotFoundError(f"{path}: no images found (supported: .nii, .nii.gz, .nrrd, .mha, .mhd, DICOM folders)")
    groups: dict[str, list[Path]] = {}
    # one channel: an nnU-Net folder names every scan <case>_0000 (strip it, so that outputs pair with
    # labelsTs/<case>); a folder of plain names keeps them (4-digit case ids such as patient_0001 stay)
    nnunet_single = n_channels == 1 and all(_strip_channel_0(strip_suffix(f)) != strip_suffix(f) for f in files)
    for f in files:
        m = _CHANNEL.match(strip_suffix(f))
        key = m.group("case") if (m and (n_channels > 1 or nnunet_single)) else strip_suffix(f)
        groups.setdefault(key, []).append(f)
    return sorted(groups.items())


def _strip_channel_0(name: str) -> str:
    """``case_0000`` -> ``case`` (nnU-Net's channel-0 suffix); other names unchanged."""
    return name[:-5] if _CHANNEL.match(name) and name.endswith("_0000") else name


def output_suffix(source: Path, output_format: str) -> str:
    suffix = image_suffix(source)
    if output_format == "nifti" or source.is_dir() or suffix not in NIFTI_SUFFIXES + (".nrrd", ".mha", ".mhd"):
        return ".nii.gz"
    return suffix
