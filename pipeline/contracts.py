"""The typed hand-offs between stages: the plan, the preprocessed-case record and the operating point.

Each is a frozen, validated pydantic model (like :mod:`pipeline.config`) that round-trips through JSON:

* :class:`Plan` -- what :func:`pipeline.preprocessing.plan.make_plan` derives from the fingerprint
  (``<preprocessed>/plan.json``; stored in every checkpoint as a plain dict);
* :class:`CaseRecord` -- the geometry of every preprocessing step of one scan
  (``<preprocessed>/cases/<id>.json``), all :func:`pipeline.preprocessing.transform.invert_case` needs;
* :class:`OperatingPoint` -- a score threshold on the FROC curve and its figures (``metrics.json``,
  ``train_summary.json``, checkpoints).

``X.from_dict(d, source)`` / ``X.load(path)`` validate: an unknown key, a missing key or a wrong type
raises :class:`ContractError` naming the source (the file) and the key path, e.g.
``data/preprocessed/cases/a.json: spacing_mm: Field required``. ``x.to_dict()`` gives the JSON-able dict
(the files' layout: same keys as before these types existed) and ``x.to_json()`` its text.

Optional fields appear in ``to_dict()`` only when they were given (pydantic's ``exclude_unset``): a file
read and written back keeps exactly its keys, e.g. the operating point of a validation run has no lesion
counts and the one of an evaluation has them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_serializer, field_validator

from pipeline.spacing import anisotropic_axis

IntTriple = tuple[int, int, int]
FloatTriple = tuple[float, float, float]
AffineRows = tuple[
    tuple[float, float, float, float],
    tuple[float, float, float, float],
    tuple[float, float, float, float],
    tuple[float, float, float, float],
]  # 4x4 voxel-to-RAS affine (mm), row by row

C = TypeVar("C", bound="Contract")


class ContractError(ValueError):
    """A plan, case record or operating point does not validate; the message names the file and key."""


class ContractFileNotFound(ContractError, FileNotFoundError):
    """The file of a plan / case record is missing (a FileNotFoundError too: the CLI's missing-input exit)."""


def _format(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"{source}: {path}: {err['msg']}")
    return "\n".join(lines)


class Contract(BaseModel):
    """Base of the hand-off types: frozen (assignment raises), unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def from_dict(cls: type[C], data: Any, source: str = "<dict>") -> C:
        """Validate a JSON-like dict; errors name ``source`` and the key path (:class:`ContractError`)."""
        if isinstance(data, cls):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ContractError(_format(source, exc)) from None

    @classmethod
    def from_json(cls: type[C], text: str, source: str = "<json>") -> C:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ContractError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        """Read and validate a JSON file; a missing, unreadable or invalid file raises :class:`ContractError`
        naming it (:class:`ContractFileNotFound` when it does not exist)."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ContractFileNotFound(f"{path}: {cls.__name__} file not found") from None
        except OSError as exc:
            raise ContractError(f"{path}: cannot read the {cls.__name__} ({exc.strerror or exc})") from None
        return cls.from_json(text, str(path))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples as lists; optional fields only when given)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# ------------------------------------------------------------------------------------------------- plan


class NetworkPlan(Contract):
    """U-Net topology: per stage the strides and kernel sizes (stage 0 has stride 1: full resolution), the
    filters per stage (absent in plans before version 2: the model falls back to nnU-Net's 32..320) and how
    often each axis is pooled (the patch is divisible by ``2 ** pools_per_axis``)."""

    strides: tuple[IntTriple, ...]
    kernel_sizes: tuple[IntTriple, ...]
    filters: tuple[int, ...] | None = None
    pools_per_axis: IntTriple | None = None


class BiasFieldPlan(Contract):
    """N4 bias-field correction of a channel before its normalisation
    (:func:`pipeline.preprocessing.bias_field.n4_correct`): fitted at about ``grid_mm`` spacing with
    ``iterations`` per fitting level."""

    method: Literal["n4"]
    grid_mm: float
    iterations: tuple[int, ...]


class ChannelIntensity(Contract):
    """How one channel is normalised (:mod:`pipeline.preprocessing.normalize`): ``ct`` clips to ``clip``
    (HU) then z-scores with the data set's foreground ``mean`` / ``std``; ``zscore`` uses each scan's own
    statistics (then clip / mean / std are None); ``none`` leaves it. ``bias_field`` (MRI, optional: absent
    in plans that do not correct) is applied first."""

    scheme: Literal["ct", "zscore", "none"]
    clip: tuple[float, float] | None
    mean: float | None
    std: float | None
    bias_field: BiasFieldPlan | None = None


class BudgetPlan(Contract):
    """The memory budget the patch and batch were fitted in: ``kind`` cpu / gpu (``requested`` may be
    ``auto``), ``voxels`` = patch voxels x batch allowed, ``patch_voxels_x_batch`` = used."""

    kind: Literal["cpu", "gpu"]
    requested: str
    voxels: float
    patch_voxels_x_batch: int


class ResamplingPlan(Contract):
    """The resampling settings the plan was made with (B-spline orders, anisotropy ratio, label method)."""

    image_order: int
    image_order_z: int
    anisotropy_ratio: float
    label: str
    crop_to_nonzero: bool


class Plan(Contract):
    """The preprocessing / training plan of a data set (see :mod:`pipeline.preprocessing.plan`).

    Spacings in mm and shapes in voxels, in the canonical (RAS-closest) voxel axis order.
    """

    version: int
    orientation: str
    channel_names: tuple[str, ...]
    labels: dict[str, str]  # label value (as a JSON key) -> name
    n_classes: int
    lesion_labels: tuple[int, ...]
    target_spacing_mm: FloatTriple
    anisotropic: bool
    median_shape: IntTriple
    patch_size: IntTriple
    patch_size_requested: IntTriple | None
    batch_size: int
    budget: BudgetPlan
    network: NetworkPlan
    intensity: tuple[ChannelIntensity, ...]  # one per channel
    resampling: ResamplingPlan
    n_fingerprint_cases: int

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def anisotropic_axis(self) -> int | None:
        """The thick-slice axis of the target grid (:func:`pipeline.spacing.anisotropic_axis`), else None."""
        return anisotropic_axis(self.target_spacing_mm, self.resampling.anisotropy_ratio)

    def differing_keys(self, other: Plan) -> list[str]:
        """Top-level keys whose values differ between two plans."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


# ------------------------------------------------------------------------------------------ case record


class OriginalGeometry(Contract):
    """The scan as read: shape (voxels), voxel-to-RAS affine and spacing (mm), axis codes, channels."""

    shape: IntTriple
    affine: AffineRows
    spacing_mm: FloatTriple
    axcodes: str
    n_channels: int


class OrientationStep(Contract):
    """Step 1, reorientation to the canonical axes: nibabel ``ornt`` (per axis: target axis, flip) and
    the canonical grid (shape, spacing, affine)."""

    ornt: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    axcodes: str
    shape: IntTriple
    spacing_mm: FloatTriple
    affine: AffineRows


class CropStep(Contract):
    """Step 2, crop to the nonzero box ``[[lo, hi), ...]`` (voxels of the canonical grid)."""

    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    shape: IntTriple
    affine: AffineRows
    label_voxels_outside: int


class ResampleStep(Contract):
    """Step 4, resampling to the target spacing: the grid reached, the B-spline orders per axis, the
    low-resolution axis resampled separately (or None) and the label method."""

    target_spacing_mm: FloatTriple
    spacing_mm: FloatTriple
    shape: IntTriple
    image_orders: IntTriple
    lowres_axis: int | None
    label_method: str


class AppliedBiasField(Contract):
    """The bias-field correction applied to one channel: ``shrink`` per axis of the fitted copy, the
    ``iterations`` per level and the range of the field (unitless, geometric mean 1 over the ``mask_voxels``
    of the fit mask); ``method: none`` when the channel had nothing to fit (constant)."""

    method: Literal["n4", "none"]
    shrink: IntTriple
    iterations: tuple[int, ...]
    field_range: tuple[float, float]
    mask_voxels: int


class AppliedIntensity(Contract):
    """Step 3, the normalisation applied to one channel (``masked``: z-score statistics over the
    foreground mask; z-score only)."""

    scheme: Literal["ct", "zscore", "none"]
    clip: tuple[float, float] | None
    mean: float | None
    std: float | None
    masked: bool | None = None
    bias_field: AppliedBiasField | None = None


class CaseSource(Contract):
    """The raw files a case was preprocessed from (relative to the data set root) and their digest."""

    images: tuple[str, ...]
    label: str | None
    sha256: str


class CaseFiles(Contract):
    """The preprocessed arrays' file names beside the record."""

    image: str
    label: str | None


class CaseRecord(Contract):
    """One preprocessed scan: every step's geometry from the original grid to the preprocessed one.

    :func:`~pipeline.preprocessing.transform.preprocess_case` builds it (without the stage's fields); the
    preprocess stage adds ``case_id``, ``plan_hash``, ``source`` and ``files`` and writes it as
    ``cases/<id>.json``. ``shape`` / ``spacing_mm`` / ``affine`` are the preprocessed grid's.
    """

    case_id: str | None = None
    plan_hash: str | None = None
    source: CaseSource | None = None
    files: CaseFiles | None = None
    version: int
    original: OriginalGeometry
    orientation: OrientationStep
    crop: CropStep
    resample: ResampleStep
    intensity: tuple[AppliedIntensity, ...]
    n_classes: int
    has_label: bool
    shape: IntTriple
    spacing_mm: FloatTriple
    affine: AffineRows

    @property
    def affine_array(self) -> np.ndarray:
        """The preprocessed grid's 4x4 voxel-to-RAS affine (mm)."""
        return np.asarray(self.affine, dtype=np.float64)

    @property
    def original_affine(self) -> np.ndarray:
        """The original scan's 4x4 voxel-to-RAS affine (mm)."""
        return np.asarray(self.original.affine, dtype=np.float64)

    def stored(self, case_id: str, plan_hash: str, source: CaseSource, files: CaseFiles) -> CaseRecord:
        """This record with the preprocess stage's fields (what ``cases/<id>.json`` holds)."""
        return CaseRecord.from_dict({"case_id": case_id, "plan_hash": plan_hash, "source": source.to_dict(),
                                     "files": files.to_dict(), **self.to_dict()}, f"case {case_id}")


# -------------------------------------------------------------------------------------- operating point


def _none_is(value: Any, default: float) -> Any:
    return default if value is None else value


class OperatingPoint(Contract):
    """The most sensitive score threshold whose FP rate on some scans stays within ``target_fp_rate``.

    ``threshold`` keeps candidates with ``score >= threshold``; ``inf`` when those scans had no candidate
    at all (then prediction applies no score filter). ``sensitivity`` (lesion level) is NaN without
    lesions. ``precision`` = tp / (tp + fp), with the counts ``tp`` / ``fp``, is present when the lesion
    counts are known (evaluation), absent otherwise (validation during training). In JSON a non-finite
    number is ``null`` (and ``null`` reads back as inf / NaN).
    """

    target_fp_rate: float
    threshold: float
    fps_per_scan: float
    sensitivity: float
    precision: float | None = None
    tp: int | None = None
    fp: int | None = None

    @field_validator("threshold", mode="before")
    @classmethod
    def _null_threshold(cls, value: Any) -> Any:
        return _none_is(value, math.inf)

    @field_validator("sensitivity", "precision", mode="before")
    @classmethod
    def _null_rate(cls, value: Any) -> Any:
        return _none_is(value, math.nan)

    @field_serializer("threshold", "fps_per_scan", "sensitivity", "precision", "target_fp_rate")
    def _finite_or_null(self, value: float | None) -> float | None:
        return value if value is not None and math.isfinite(value) else None

    @property
    def score_threshold(self) -> float | None:
        """The threshold prediction applies: None (every candidate) when it is not finite."""
        return self.threshold if math.isfinite(self.threshold) else None


def operating_point_or_none(data: Any, source: str = "<dict>") -> OperatingPoint | None:
    """``OperatingPoint.from_dict`` that passes None through (a checkpoint without an operating point)."""
    return None if data is None else OperatingPoint.from_dict(data, source)
