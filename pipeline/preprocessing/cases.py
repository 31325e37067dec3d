"""Read one case as (image, label) Volumes, checked against each other and against the declared labels."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.io.dataset import Case, read_case_image, read_case_label
from pipeline.io.volume import Volume
from pipeline.preprocessing.transform import check_label


def load_case(
    case: Case, label_remap: dict[int, int] | None, n_classes: int | None = None
) -> tuple[Volume, Volume | None]:
    """The case's image ``(C, X, Y, Z)`` and label map ``(1, X, Y, Z)`` (None when unlabelled).

    Raises:
        ValueError: naming the case and its files when the label grid or values do not fit the image.
    """
    image = read_case_image(case)
    if case.label is None:
        return image, None
    label = read_case_label(case, label_remap)
    check_label(image, label, n_classes, what=f"case {case.case_id}: {case.label} vs image {case.images[0]}")
    return image, label


def source_digest(case: Case, label_remap: dict[int, int] | None = None) -> str:
    """SHA-256 (16 hex digits) of the bytes of the case's files (images, then label; a DICOM folder's files
    in sorted order) and of the label remapping. Content only, so it is the same on every machine; hashing
    compressed files costs a fraction of decoding them."""
    digest = hashlib.sha256(repr(sorted((label_remap or {}).items())).encode())
    for path in (*case.images, *([case.label] if case.label else [])):
        files = (
            sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        )
        for file in files:
            digest.update(f"{file.name}:{file.stat().st_size}:".encode())
            with open(file, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]
