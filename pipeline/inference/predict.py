"""``predict``: any supported scan in, a lesion probability map and a label map out, both in the input's
exact geometry (shape, spacing, origin, direction).

scan --preprocess_case (plan from the checkpoint)--> sliding window --> class probabilities
     --invert_case (the per-scan record)--> original grid --> lesion probability + post-processed labels

Post-processing works on lesion candidates (26-connected components of the lesion classes in the label
map): a candidate is removed when its volume is below ``inference.min_component_mm3`` or its score (max
lesion probability) is below the operating threshold chosen on validation scans. It never keeps only
the largest component: that would delete every other lesion of a multi-lesion scan.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import torch
from torch import nn

from pipeline.config import Config, InferenceConfig, config_from_dict
from pipeline.inference.sliding_window import lesion_probability, predict_probabilities
from pipeline.io.dataset import Case, read_case_image
from pipeline.io.formats import NIFTI_SUFFIXES, image_suffix, is_volume_path, strip_suffix, write_volume
from pipeline.io.volume import Volume, grid_mismatch
from pipeline.model.factory import build_model
from pipeline.training.checkpoint import CheckpointError, load_checkpoint
from pipeline.training.loop import resolve_device

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    cfg: Config  # the training run's config (plan, preprocessing, loss mode)
    plan: dict[str, Any]
    operating_point: dict[str, float] | None
    device: torch.device

    @property
    def lesion_labels(self) -> list[int]:
        return list(self.plan["lesion_labels"])

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(self.cfg.train.patch_size or self.plan["patch_size"])


def load_model(path: str | Path, device: str = "auto") -> LoadedModel:
    """Rebuild the network from a checkpoint's own config and plan (the current config is not needed)."""
    dev = resolve_device(device)
    state = load_checkpoint(path, dev)
    try:
        cfg = config_from_dict(state["config"], source=f"{path} (config saved in the checkpoint)")
    except ValueError as exc:
        raise CheckpointError(f"{path}: its config does not validate with this code version:\n{exc}") from None
    plan = state["plan"]
    model = build_model(cfg.train.model, plan, len(plan["channel_names"]), int(plan["n_classes"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the network built from its config: {exc}") from None
    model.to(dev).eval()
    return LoadedModel(model, cfg, plan, state.get("operating_point"), dev)


def postprocess_labels(labels: np.ndarray, probs: np.ndarray, lesion_prob: np.ndarray, lesion_labels: list[int],
                       voxel_volume_mm3: float, min_volume_mm3: float, min_score: float) -> np.ndarray:
    """Remove lesion candidates below ``min_volume_mm3`` or with max lesion probability below ``min_score``.

    Removed voxels take the most probable non-lesion class. All statistics come from one labelling pass.
    """
    lesion = np.isin(labels, lesion_labels)
    comp = cc3d.connected_components(lesion, connectivity=26)
    n = int(comp.max())
    if n == 0:
        return labels
    flat = comp.ravel()
    sizes = np.bincount(flat, minlength=n + 1)
    peak = np.zeros(n + 1)
    np.maximum.at(peak, flat, lesion_prob.ravel())
    drop = (sizes * voxel_volume_mm3 < min_volume_mm3) | (peak < min_score)
    drop[0] = False
    remove = drop[comp]
    if remove.any():
        other = probs.copy()
        other[lesion_labels] = -1.0
        labels = labels.copy()
        labels[remove] = other.argmax(0)[remove]
    return labels


@dataclass
class Prediction:
    """One scan's prediction, every Volume in the input scan's exact geometry."""

    lesion_probability: Volume  # (1, X, Y, Z) float32: any lesion class
    labels: Volume  # (1, X, Y, Z) uint8, post-processed
    class_probabilities: Volume  # (K, X, Y, Z) float32


def predict_volume(loaded: LoadedModel, image: Volume, inference: InferenceConfig,
                   progress: bool = False) -> Prediction:
    """Predict one scan; see :class:`Prediction`."""
    from pipeline.preprocessing.transform import invert_case, preprocess_case

    plan, mode = loaded.plan, loaded.cfg.train.loss.mode
    expected = len(plan["channel_names"])
    if image.n_channels != expected:
        raise ValueError(f"input has {image.n_channels} channel(s); the model expects {expected} "
                         f"({', '.join(plan['channel_names'])})")
    array, _, record = preprocess_case(image, None, plan, loaded.cfg.preprocess)
    probs = predict_probabilities(loaded.model, torch.from_numpy(array), loaded.patch_size, inference, mode,
                                  loaded.device, progress=progress).numpy()
    back = invert_case(probs, record, "prob")
    if grid_mismatch(back, image) or not np.array_equal(back.affine, image.affine):
        raise RuntimeError("internal error: inverse mapping did not restore the input geometry")
    class_probs = back.data.astype(np.float32, copy=False)
    lesion = lesion_probability(torch.from_numpy(class_probs), loaded.lesion_labels, mode).numpy()
    labels = class_probs.argmax(0).astype(np.uint8)
    threshold = (loaded.operating_point or {}).get("threshold")
    threshold = 0.0 if threshold is None or not np.isfinite(threshold) else float(threshold)
    voxel_mm3 = float(np.prod(image.spacing))
    labels = postprocess_labels(labels, class_probs, lesion, loaded.lesion_labels, voxel_mm3,
                                inference.min_component_mm3, threshold)
    return Prediction(Volume(lesion[None].astype(np.float32), image.affine), Volume(labels[None], image.affine),
                      Volume(class_probs, image.affine))


_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def collect_inputs(path: Path, n_channels: int) -> list[tuple[str, list[Path]]]:
    """(case name, files) for a file, a DICOM folder, or a folder of images.

    Multi-channel models read nnU-Net-style ``<case>_0000.nii.gz, <case>_0001.nii.gz`` file groups (or a
    single 4D file per case).
    """
    if path.is_file() or (path.is_dir() and not any(is_volume_path(p) and p.is_file() for p in path.iterdir())
                          and not any(p.is_dir() for p in path.iterdir())):
        return [(strip_suffix(path), [path])]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: input not found")
    files = sorted(p for p in path.iterdir() if (p.is_file() and is_volume_path(p)) or p.is_dir())
    if not files:
        raise FileNotFoundError(f"{path}: no images found (supported: .nii, .nii.gz, .nrrd, .mha, .mhd, DICOM folders)")
    groups: dict[str, list[Path]] = {}
    for f in files:
        m = _CHANNEL.match(strip_suffix(f))
        key = m.group("case") if (m and n_channels > 1) else strip_suffix(f)
        groups.setdefault(key, []).append(f)
    return sorted(groups.items())


def output_suffix(source: Path, output_format: str) -> str:
    suffix = image_suffix(source)
    if output_format == "nifti" or source.is_dir() or suffix not in NIFTI_SUFFIXES + (".nrrd", ".mha", ".mhd"):
        return ".nii.gz"
    return suffix


def predict_paths(cfg: Config, model_path: Path, input_path: Path, output_dir: Path, progress: bool = True,
                  output_format: str = "input") -> list[Path]:
    """Predict every scan under ``input_path``; writes ``output_dir/probabilities/<case><suffix>`` and
    ``output_dir/labels/<case><suffix>`` (file names match the inputs, so ``evaluate`` can pair them)."""
    from tqdm import tqdm

    loaded = load_model(model_path, cfg.inference.device)
    cases = collect_inputs(input_path, len(loaded.plan["channel_names"]))
    written = []
    for name, files in tqdm(cases, desc="predict", unit="scan", disable=not progress):
        image = read_case_image(Case(name, tuple(files)))  # channel files must share one grid
        pred = predict_volume(loaded, image, cfg.inference)
        suffix = output_suffix(files[0], output_format)
        written.append(write_volume(output_dir / "probabilities" / f"{name}{suffix}", pred.lesion_probability))
        write_volume(output_dir / "labels" / f"{name}{suffix}", pred.labels)
        log.info("%s -> %s", files[0], written[-1])
    return written
