"""One typed, validated configuration for the whole pipeline.

``params.yaml`` at the repository root (the file DVC reads as params; ``configs/params.yaml`` links to it)
is parsed into the frozen :class:`Config` tree. Unknown keys, wrong types and out-of-range values fail at
load time with their source and key path, e.g. ``params.yaml: train.loss.gamma: Input should be greater
than or equal to 0`` or ``--set train.loss.gama=1: train.loss.gama: Extra inputs are not permitted (did
you mean 'train.loss.gamma'?)``.

Functions receive the sub-config they need (``cfg.train.loss``, ``cfg.evaluation``...), never a raw dict.
Overrides use dotted paths, ``--set train.loss.gamma=1`` on the CLI or ``dvc exp run -S train.loss.gamma=1``.
"""

from __future__ import annotations

import copy
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PARAMS_FILE = Path("params.yaml")  # the real file, at the repository root (DVC reads it at every revision)
DEFAULT_PARAMS = Path("configs/params.yaml")  # a link to it, kept for older commands and notebooks


def find_params(cwd: str | Path = ".") -> Path | None:
    """The params file a command reads by default: ``params.yaml``, else ``configs/params.yaml`` (relative
    to ``cwd``), else None (the schema's defaults, e.g. outside the repository)."""
    for name in (PARAMS_FILE, DEFAULT_PARAMS):
        path = Path(cwd) / name
        if path.exists():
            return path if str(cwd) != "." else name
    return None


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and key path."""


def _wants_number(annotation: Any) -> bool:
    """``int``, ``float`` or a union holding one and no ``bool``."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) is typing.Annotated:  # e.g. Annotated[int, Field(ge=0)] | "auto"
        return _wants_number(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return bool not in args and any(_wants_number(a) for a in args)
    return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads True as 1: a YAML `epochs: yes` must fail, not train for one epoch
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if isinstance(value, bool) and field is not None and _wants_number(field.annotation):
            raise ValueError(f"a boolean ({value}) is not a number")
        return value


Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


class PathsConfig(_Section):
    """Where each stage reads and writes (relative to the working directory)."""

    raw: str = "data/raw"  # the MSD-layout data set (synthetic data is written here)
    splits: str = "data/splits.json"
    preprocessed: str = "data/preprocessed"
    models: str = "models"
    predictions: str = "results/predictions"
    evaluation: str = "results/evaluation"
    metrics: str = "metrics"  # small headline metrics and plot tables, git-tracked so experiments commit them
    # cross-validation folds (nnU-Net splits_final.json layout), made once by the first train.fold run or
    # `make-folds`, then only read: commit it, so every run and `dvc exp` workspace uses the same folds
    folds: str = "configs/folds.json"


class SyntheticConfig(_Section):
    """The embedded synthetic CT-like data set (units: voxels, mm and HU as named)."""

    n_cases: int = Field(30, ge=3)
    shape: IntTriple = (128, 128, 40)  # voxels (x, y, z)
    spacing_mm: Triple = (0.8, 0.8, 2.5)
    oblique_fraction: float = Field(0.3, ge=0, le=1)  # scans with a rotated (non-identity) direction
    lesion_free_fraction: float = Field(0.2, ge=0, le=1)  # scans with no lesion at all
    max_lesions: int = Field(4, ge=1)  # per scan with lesions: 1..max_lesions
    small_diameter_mm: tuple[float, float] = (4.0, 10.0)
    large_diameter_mm: tuple[float, float] = (12.0, 20.0)
    large_fraction: float = Field(0.25, ge=0, le=1)  # share of lesions drawn from the large range
    lesion_contrast_hu: tuple[float, float] = (-70.0, -40.0)  # lesion minus liver, HU (hypodense)
    noise_hu: float = Field(12.0, ge=0)
    blur_sigma_mm: float = Field(0.8, ge=0)  # partial-volume blur
    seed: int = 0


class DataConfig(_Section):
    source: Literal["synthetic", "msd", "csv"] = "synthetic"
    dataset: str | None = None  # MSD root / dataset.json (source=msd) or CSV manifest (source=csv)
    root: str | None = None  # folder that manifest paths resolve inside (default: the manifest's folder)
    labels: dict[int, str] | None = None  # declared labels (required for csv; overrides dataset.json)
    channel_names: tuple[str, ...] | None = None  # e.g. ["CT"] or ["FLAIR", "T1"]; decides intensity schemes
    lesion_labels: tuple[int, ...] = (2,)  # label values evaluated lesion by lesion
    label_remap: dict[int, int] = Field(default_factory=dict)  # applied when labels are read
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    split_seed: int = 0
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        if not self.lesion_labels:
            raise ValueError("lesion_labels must name at least one label value")
        if self.source != "synthetic" and not self.dataset:
            raise ValueError(f"source={self.source!r} needs data.dataset (the data set root or manifest)")
        return self


class IntensityConfig(_Section):
    scheme: tuple[Literal["auto", "ct", "zscore", "none"], ...] = ("auto",)  # per channel (one = all)
    ct_clip_percentiles: tuple[float, float] = (0.5, 99.5)
    # per channel (one = all): n4 divides an MRI channel by its N4 bias field before normalising
    bias_field: tuple[Literal["none", "n4"], ...] = ("none",)
    n4_grid_mm: float = Field(4.0, gt=0)  # spacing (mm) of the shrunk copy the field is fitted on
    n4_iterations: tuple[Annotated[int, Field(ge=1)], ...] = (50, 50, 50, 50)  # per fitting level

    @model_validator(mode="after")
    def _check_n4(self) -> IntensityConfig:
        if not self.bias_field:
            raise ValueError("bias_field needs one entry (all channels) or one per channel")
        if not self.n4_iterations:
            raise ValueError("n4_iterations needs at least one fitting level")
        return self


class PreprocessConfig(_Section):
    target_spacing_mm: Triple | None = None  # None: from the fingerprint (median, nnU-Net anisotropy rule)
    anisotropy_ratio: float = Field(3.0, gt=1)
    anisotropic_percentile: float = Field(10.0, ge=0, le=100)
    crop_to_nonzero: bool = True
    image_order: int = Field(3, ge=0, le=5)  # spline order for images; labels are one-hot linear + argmax
    image_order_z: int = Field(1, ge=0, le=5)  # order along the low-res axis of strongly anisotropic scans
    intensity: IntensityConfig = IntensityConfig()
    workers: int = Field(0, ge=0)  # 0 -> number of CPU cores
    memory_budget: Literal["auto", "cpu", "gpu"] = "auto"  # auto: gpu when CUDA is present, else cpu
    cpu_budget_mvoxels: float = Field(0.25, gt=0)  # patch voxels x batch, millions
    cpu_base_filters: int = Field(8, ge=1)  # CPU plan: narrower network, same topology (docs/model.md)
    cpu_max_filters: int = Field(128, ge=1)
    gpu_budget_gb: float = Field(10.0, gt=0)  # GPU plan: nnU-Net's 32..320 filters
    patch_size: IntTriple | None = None  # None: from the plan
    batch_size: int | None = Field(None, ge=1)


class ModelConfig(_Section):
    name: Literal["unet", "dynunet"] = "dynunet"  # dynunet: nnU-Net's U-Net (docs/model.md)
    base_filters: int | None = Field(None, ge=1)  # None: from the plan (GPU 32, CPU cpu_base_filters)
    max_filters: int | None = Field(None, ge=1)  # None: from the plan (GPU 320, CPU cpu_max_filters)
    depth: int | None = Field(None, ge=2, le=7)  # None: from the plan
    num_res_units: int = Field(0, ge=0)  # 0: two conv-norm-LeakyReLU per stage (nnU-Net); >0: residual
    deep_supervision: bool = True  # dynunet only, nnU-Net's head weights; unet has no supervision heads
    dropout: float = Field(0.0, ge=0, lt=1)
    prior_init: bool = True
    prior_probability: float = Field(0.01, gt=0, lt=1)


class DiceConfig(_Section):
    include_background: bool = False
    batch_dice: bool = True
    smooth_nr: float = Field(1e-5, ge=0)
    smooth_dr: float = Field(1e-5, ge=0)


class LossConfig(_Section):
    mode: Literal["softmax", "sigmoid"] = "softmax"
    gamma: float = Field(2.0, ge=0)
    alpha: float | tuple[float, ...] | None = None  # sigmoid: float; softmax: one weight per class
    # auto: foreground (sum / lesion voxels) for one foreground class, mean for several (losses.combined)
    focal_reduction: Literal["auto", "mean", "sum", "foreground"] = "auto"
    lambda_focal: float = Field(1.0, ge=0)
    lambda_dice: float = Field(1.0, ge=0)
    dice: DiceConfig = DiceConfig()

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        if self.lambda_focal == 0 and self.lambda_dice == 0:
            raise ValueError("lambda_focal and lambda_dice cannot both be 0")
        if self.mode == "sigmoid" and isinstance(self.alpha, tuple):
            raise ValueError("sigmoid mode takes a single alpha in [0, 1]")
        if isinstance(self.alpha, float) and not 0 <= self.alpha <= 1:
            raise ValueError("alpha must be in [0, 1]")
        if isinstance(self.alpha, tuple) and any(a < 0 for a in self.alpha):
            raise ValueError("class weights in alpha must be >= 0")
        return self


class SamplingConfig(_Section):
    lesion_fraction: float = Field(1 / 3, ge=0, le=1)  # share of patches centred on a lesion
    # lesion patches per batch: "expected" = f*B on average (floor, +1 with the remainder's probability);
    # "fixed" = nnU-Net's B - round(B (1 - f)) in every batch (batch 2 at f = 1/3: exactly one)
    lesion_count: Literal["expected", "fixed"] = "expected"
    lesion_weighting: Literal["uniform", "volume", "sqrt_volume"] = "uniform"  # choice among lesions
    class_balance: bool = True  # several lesion classes: each class present equally often, then a lesion


class AugmentConfig(_Section):
    """Training augmentation (``pipeline.data.augment``); defaults are nnU-Net v2's
    (``nnUNetTrainer.get_training_transforms``). ``*_prob`` is the chance per patch; ``*_channel_prob`` the
    chance per channel once the transform is on; ranges are ``(low, high)``. Table: docs/augmentation.md."""

    # spatial: one coordinate map (rotation x scaling x elastic), one interpolation, read from the scan
    rotate_prob: float = Field(0.2, ge=0, le=1)
    rotate_deg: float = Field(30.0, ge=0, le=180)  # +- about each axis (isotropic plans)
    rotate_deg_anisotropic: float = Field(180.0, ge=0, le=180)  # +- in-plane only, when the plan is anisotropic
    scale_prob: float = Field(0.2, ge=0, le=1)
    scale_range: tuple[float, float] = (0.7, 1.4)  # > 1 zooms out (nnU-Net's convention), one factor for all axes
    elastic_prob: float = Field(0.0, ge=0, le=1)  # nnU-Net: off
    elastic_scale: tuple[float, float] = (0.1, 0.25)  # control-point spacing, fraction of the patch edge
    elastic_magnitude_vox: tuple[float, float] = (1.0, 4.0)  # largest displacement, voxels
    # intensity: each channel drawn independently (nnU-Net), or one draw for all channels when synchronised
    # (channels that are one modality at several time points: independent draws fake changes between them)
    synchronize_channels: bool = False
    noise_prob: float = Field(0.1, ge=0, le=1)
    noise_std: tuple[float, float] = (0.0, 0.1)  # one std per patch (nnU-Net syncs it), fields per channel
    blur_prob: float = Field(0.2, ge=0, le=1)
    blur_channel_prob: float = Field(0.5, ge=0, le=1)
    blur_sigma_vox: tuple[float, float] = (0.5, 1.0)  # per channel and axis
    brightness_prob: float = Field(0.15, ge=0, le=1)
    brightness_range: tuple[float, float] = (0.75, 1.25)  # multiplier
    contrast_prob: float = Field(0.15, ge=0, le=1)
    contrast_range: tuple[float, float] = (0.75, 1.25)  # about the channel mean, range preserved
    lowres_prob: float = Field(0.25, ge=0, le=1)
    lowres_channel_prob: float = Field(0.5, ge=0, le=1)
    lowres_scale: tuple[float, float] = (0.5, 1.0)  # down-sampling factor (thick axis kept if anisotropic)
    gamma_inverted_prob: float = Field(0.1, ge=0, le=1)
    gamma_prob: float = Field(0.3, ge=0, le=1)
    gamma_range: tuple[float, float] = (0.7, 1.5)  # stats (mean, std) retained
    mirror_prob: float = Field(0.5, ge=0, le=1)  # per axis, all three axes

    @model_validator(mode="after")
    def _check_ranges(self) -> AugmentConfig:
        for name in ("scale_range", "elastic_scale", "elastic_magnitude_vox", "noise_std", "blur_sigma_vox",
                     "brightness_range", "contrast_range", "lowres_scale", "gamma_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {(lo, hi)}")
        if self.scale_range[0] <= 0 or self.lowres_scale[0] <= 0 or self.gamma_range[0] <= 0:
            raise ValueError("scale_range, lowres_scale and gamma_range must be > 0")
        if self.lowres_scale[1] > 1:
            raise ValueError("lowres_scale must be <= 1 (a down-sampling factor)")
        return self


# per-optimiser defaults for the keys left null (or absent): nnU-Net v2's SGD recipe, and AdamW + cosine
OPTIM_PRESETS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 1e-2, "weight_decay": 3e-5, "schedule": "poly", "warmup_epochs": 0},
    "adamw": {"lr": 2e-3, "weight_decay": 1e-5, "schedule": "cosine", "warmup_epochs": 1},
}


class OptimConfig(_Section):
    """Optimiser and LR schedule. ``sgd`` is nnU-Net's: Nesterov, momentum 0.99, lr 1e-2, weight decay
    3e-5, poly 0.9 decay, no warm-up; ``adamw`` uses ``lr`` 2e-3, weight decay 1e-5, cosine decay and one
    warm-up epoch. ``lr``, ``weight_decay``, ``schedule`` and ``warmup_epochs`` left null take these
    per-optimiser presets (``OPTIM_PRESETS``); a value given explicitly always wins."""

    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1)  # SGD only
    schedule: Literal["poly", "cosine"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    grad_clip: float | None = Field(12.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _presets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = OPTIM_PRESETS.get(data.get("name", "adamw"), {})
            data = {**data, **{k: v for k, v in preset.items() if data.get(k) is None}}
        return data


class TrainConfig(_Section):
    epochs: int = Field(20, ge=1)
    steps_per_epoch: int = Field(40, ge=1)
    batch_size: int | None = Field(None, ge=1)  # None: from the plan
    patch_size: IntTriple | None = None  # None: from the plan
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    sampling: SamplingConfig = SamplingConfig()
    augment: AugmentConfig = AugmentConfig()
    # autocast (pipeline.model.device.amp_dtype): auto = bf16 on a GPU that has it (else fp16 with a gradient
    # scaler) and on a CPU with native bf16 (else float32); bf16 / fp16 forced; off = float32
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = False
    compile: bool = False
    # True: cuDNN deterministic kernels, no autotuning (bit-reproducible CUDA runs; the resume tests use it).
    # False: cuDNN benchmark (autotuned, faster on a GPU). CPU runs are reproducible either way.
    deterministic: bool = False
    val_every: int = Field(5, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    # loader worker processes, kept alive for the whole run; "auto": min(CPU cores - 1, 8) per process
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    # wall-clock budget in minutes (null: off): the LR schedule is compressed to it, training ends at it
    time_budget_min: float | None = Field(None, gt=0)
    fold: int | None = Field(None, ge=0)  # cross-validation fold to train (null: the train / val split)
    n_folds: int = Field(5, ge=2)  # folds made once from the train + val scans (paths.splits' folder)
    # preprocessed arrays: "memory" (loaded), "mmap" (read-only memory maps; "disk" / "memmap" are aliases),
    # "auto": memory-mapped when they exceed cache_ram_fraction of the available RAM (training/data.py)
    cache: Literal["auto", "memory", "mmap", "memmap", "disk"] = "auto"
    cache_ram_fraction: float = Field(0.5, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # DDP (torchrun): minutes a collective waits for the slowest rank before the run fails (the process
    # group's timeout); must cover a rank's share of a validation pass and a checkpoint write on rank 0
    dist_timeout_min: float = Field(30.0, gt=0)

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off(cls, value: Any) -> Any:
        # PyYAML (YAML 1.1) reads an unquoted `off` (`amp: off`, `--set train.amp=off`) as False
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check_fold(self) -> TrainConfig:
        if self.fold is not None and self.fold >= self.n_folds:
            raise ValueError(f"fold {self.fold} does not exist: folds are 0..{self.n_folds - 1} (n_folds)")
        return self


class InferenceConfig(_Section):
    overlap: float = Field(0.5, ge=0, lt=1)
    sw_batch_size: int = Field(2, ge=1)
    blend: Literal["gaussian", "constant"] = "gaussian"
    tta_mirror: bool = True  # mean over all 8 flips of the 3 axes (nnU-Net's mirroring)
    # evaluate stage: checkpoints whose probabilities are averaged (an ensemble, e.g. one per fold);
    # empty: ``<paths.models>/best.pt``
    checkpoints: tuple[str, ...] = ()
    amp: bool = True  # autocast as train.amp: auto (GPU; CPU with native bf16); false: float32
    min_component_mm3: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class DynamicExtractionConfig(_Section):
    """PI-CAI's peak-relative extraction (``evaluation.extraction: dynamic``); see evaluation/candidates.py."""

    threshold_factor: float = Field(2.5, gt=0)  # a candidate spans its peak p down to p / threshold_factor
    min_voxels: int = Field(0, ge=0)  # components <= min_voxels voxels dropped (docs/evaluation.md)
    max_lesions: int = Field(100, ge=1)  # candidates per scan (PI-CAI's default 5 is for prostate MRI)
    round_decimals: int | None = Field(None, ge=0)  # round each candidate's peak score (None: exact)


class EvaluationConfig(_Section):
    extraction: Literal["static", "dynamic"] = "dynamic"  # grown from each peak (PI-CAI) / at a fixed level
    extraction_threshold: float = Field(0.1, gt=0, lt=1)  # the static level
    dynamic: DynamicExtractionConfig = DynamicExtractionConfig()
    score: Literal["max", "mean"] = "max"
    hit_criterion: Literal["iou", "peak", "distance"] = "iou"
    iou_threshold: float = Field(0.1, gt=0, le=1)
    # GT lesions below this volume (mm^3) are not counted; candidates touching only them are not FPs
    # (BraTS 2023+ lesion-wise metrics: 50 voxels for gliomas). 0: every lesion counts
    min_lesion_mm3: float = Field(0.0, ge=0)
    fp_rates: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    bootstrap: int = Field(1000, ge=0)
    bootstrap_seed: int = 0
    size_buckets_mm: tuple[float, ...] = (5.0, 10.0)  # equivalent-diameter bucket edges
    surface_tolerance_mm: float = Field(1.0, gt=0)
    max_candidates_per_scan: int = Field(10000, ge=1)
    operating_fp_rate: float = Field(1.0, gt=0)  # operating point saved with the model

    @model_validator(mode="after")
    def _dynamic_scores_by_peak(self) -> EvaluationConfig:
        if self.extraction == "dynamic" and self.score != "max":
            raise ValueError("score 'mean' needs extraction 'static' (dynamic candidates are scored by their peak)")
        return self

    @field_validator("fp_rates", "size_buckets_mm")
    @classmethod
    def _increasing(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if list(v) != sorted(set(v)) or any(x <= 0 for x in v):
            raise ValueError("must be positive and strictly increasing")
        return v


class TrackingConfig(_Section):
    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "rare-lesions"
    registered_model: str = "rare-lesion-unet"
    on_unreachable: Literal["fail", "fallback"] = "fail"
    # the registry alias the evaluate stage moves to a version only when its test CPM beats the holder's
    champion_alias: str = Field("champion", min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    champion_min_cpm: float = Field(0.0, ge=0.0, le=1.0)  # a version must exceed this CPM to take the alias


class Config(_Section):
    seed: int = 0
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    inference: InferenceConfig = InferenceConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists), e.g. for checkpoints and MLflow params."""
        return json.loads(self.model_dump_json())

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, ``{"train.loss.gamma": 2.0, ...}``."""
        return flatten(self.to_dict())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.loss.gamma=1"`` -> (["train", "loss", "gamma"], 1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def _section_fields(parts: list[str]) -> list[str]:
    """Key names allowed in the section at ``parts`` (``[]`` = top level); [] when it is not a section."""
    model: type[BaseModel] = Config
    for part in parts:
        field = model.model_fields.get(part)
        if field is None:
            return []
        kinds = [field.annotation, *typing.get_args(field.annotation)]
        sub = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _did_you_mean(parts: list[str]) -> str:
    """`` (did you mean 'train.loss.gamma'?)`` for a mistyped key, from the keys of its section."""
    close = difflib.get_close_matches(parts[-1], _section_fields(parts[:-1]), n=1, cutoff=0.6)
    return f" (did you mean '{'.'.join([*parts[:-1], close[0]])}'?)" if close else ""


def _in_tree(tree: dict[str, Any], parts: list[str]) -> bool:
    node: Any = tree
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _origin(parts: list[str], source: str, overrides: list[str], file_tree: dict[str, Any]) -> str:
    """Who wrote the key at ``parts``: the ``--set`` override that set it (or a section above it, or a
    key below it when the file lacks ``parts``), else the file ``source``."""
    paths = [(parse_override(text)[0], text) for text in overrides]
    for path, text in reversed(paths):  # the last override of a key wins
        if parts[:len(path)] == path:
            return f"--set {text}"
    for path, text in reversed(paths):
        if path[:len(parts)] == parts and not _in_tree(file_tree, parts):
            return f"--set {text}"
    return source


def _format_errors(source: str, exc: ValidationError, overrides: list[str] | None = None,
                   file_tree: dict[str, Any] | None = None) -> str:
    """One line per problem: ``<source>: <key path>: <message>[ (did you mean '<key path>'?)]``, where
    the source is the ``--set`` override that wrote the key, else the file."""
    lines = []
    for err in exc.errors():
        parts = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
        origin = _origin(parts, source, overrides or [], file_tree or {}) if parts else source
        hint = _did_you_mean(parts) if err["type"] == "extra_forbidden" and parts else ""
        lines.append(f"{origin}: {'.'.join(parts) or '<root>'}: {err['msg']}{hint}")
    return "\n".join(lines)


def config_from_dict(tree: dict[str, Any], source: str = "<config>", overrides: list[str] | None = None,
                     file_tree: dict[str, Any] | None = None) -> Config:
    """Validate a config tree. ``overrides`` (already applied to ``tree``) and the ``file_tree`` they were
    applied to only serve the error messages, which name the override or the file a bad key came from."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc, overrides, file_tree)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a params file; a missing file gives the defaults.

    Raises:
        ConfigError: the file is unreadable or invalid; every problem is listed with its key path.
    """
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = loaded or {}
    return config_from_dict(apply_overrides(tree, overrides or []), source, overrides, tree)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=110)
