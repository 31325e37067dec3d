"""One typed, validated configuration for the whole pipeline.

``configs/params.yaml`` (the file DVC reads as params) is parsed into the frozen :class:`Config` tree.
Unknown keys, wrong types and out-of-range values fail at load time with the key path in the message,
e.g. ``configs/params.yaml: train.loss.gamma: Input should be greater than or equal to 0``.

Functions receive the sub-config they need (``cfg.train.loss``, ``cfg.evaluation``...), never a raw dict.
Overrides use dotted paths, ``--set train.loss.gamma=1`` on the CLI or ``dvc exp run -S train.loss.gamma=1``.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

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

DEFAULT_PARAMS = Path("configs/params.yaml")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and key path."""


def _wants_number(annotation: Any) -> bool:
    """``int``, ``float`` or a union holding one and no ``bool``."""
    if annotation in (int, float):
        return True
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


class PreprocessConfig(_Section):
    target_spacing_mm: Triple | None = None  # None: from the fingerprint (median, nnU-Net anisotropy rule)
    anisotropy_ratio: float = Field(3.0, gt=1)
    anisotropic_percentile: float = Field(10.0, ge=0, le=100)
    crop_to_nonzero: bool = True
    image_order: int = Field(3, ge=0, le=5)  # spline order for images; labels are one-hot linear + argmax
    image_order_z: int = Field(1, ge=0, le=5)  # order along the low-res axis of strongly anisotropic scans
    intensity: IntensityConfig = IntensityConfig()
    workers: int = Field(0, ge=0)  # 0 -> number of CPU cores
    memory_budget: Literal["cpu", "gpu"] = "cpu"
    cpu_budget_mvoxels: float = Field(0.25, gt=0)  # patch voxels x batch, millions
    gpu_budget_gb: float = Field(10.0, gt=0)
    patch_size: IntTriple | None = None  # None: from the plan
    batch_size: int | None = Field(None, ge=1)


class ModelConfig(_Section):
    name: Literal["unet", "dynunet"] = "unet"
    base_filters: int = Field(16, ge=1)
    max_filters: int = Field(256, ge=1)
    depth: int | None = Field(None, ge=2, le=7)  # None: from the plan
    num_res_units: int = Field(1, ge=0)
    deep_supervision: bool = False
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
    focal_reduction: Literal["mean", "sum", "foreground"] = "mean"
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
    lesion_weighting: Literal["uniform", "volume", "sqrt_volume"] = "uniform"  # choice among lesions
    class_balance: bool = True  # several lesion classes: each class present equally often, then a lesion


class AugmentConfig(_Section):
    flip_prob: float = Field(0.5, ge=0, le=1)
    rotate_prob: float = Field(0.2, ge=0, le=1)
    rotate_deg: float = Field(15.0, ge=0, le=180)
    scale_prob: float = Field(0.2, ge=0, le=1)
    scale_range: float = Field(0.15, ge=0, lt=1)
    elastic_prob: float = Field(0.0, ge=0, le=1)
    intensity_scale_prob: float = Field(0.15, ge=0, le=1)
    intensity_shift_prob: float = Field(0.15, ge=0, le=1)
    gamma_prob: float = Field(0.15, ge=0, le=1)
    noise_prob: float = Field(0.15, ge=0, le=1)
    blur_prob: float = Field(0.1, ge=0, le=1)


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1)
    schedule: Literal["poly", "cosine"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    grad_clip: float | None = Field(12.0, gt=0)


class TrainConfig(_Section):
    epochs: int = Field(40, ge=1)
    steps_per_epoch: int = Field(40, ge=1)
    batch_size: int | None = Field(None, ge=1)  # None: from the plan
    patch_size: IntTriple | None = None  # None: from the plan
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    sampling: SamplingConfig = SamplingConfig()
    augment: AugmentConfig = AugmentConfig()
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = True
    val_every: int = Field(5, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    num_workers: int = Field(1, ge=0)
    cache: Literal["memory", "disk"] = "memory"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off(cls, value: Any) -> Any:
        # PyYAML (YAML 1.1) reads an unquoted `off` (`amp: off`, `--set train.amp=off`) as False
        return "off" if value is False else value


class InferenceConfig(_Section):
    overlap: float = Field(0.5, ge=0, lt=1)
    sw_batch_size: int = Field(2, ge=1)
    blend: Literal["gaussian", "constant"] = "gaussian"
    tta_mirror: bool = False
    amp: bool = True
    min_component_mm3: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class EvaluationConfig(_Section):
    extraction_threshold: float = Field(0.1, gt=0, lt=1)
    score: Literal["max", "mean"] = "max"
    hit_criterion: Literal["iou", "peak", "distance"] = "iou"
    iou_threshold: float = Field(0.1, gt=0, le=1)
    fp_rates: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    bootstrap: int = Field(1000, ge=0)
    bootstrap_seed: int = 0
    size_buckets_mm: tuple[float, ...] = (5.0, 10.0)  # equivalent-diameter bucket edges
    surface_tolerance_mm: float = Field(1.0, gt=0)
    max_candidates_per_scan: int = Field(10000, ge=1)
    operating_fp_rate: float = Field(1.0, gt=0)  # operating point saved with the model

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


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        lines.append(f"{source}: {loc or '<root>'}: {err['msg']}")
    return "\n".join(lines)


def config_from_dict(tree: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


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
    tree = apply_overrides(tree, overrides or [])
    return config_from_dict(tree, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=110)
