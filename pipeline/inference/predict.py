"""``predict``: any supported scan in, a lesion probability map and a label map out, both in the input's
exact geometry (shape, spacing, origin, direction).

scan --preprocess_case (plan from the checkpoint)--> sliding window --> class probabilities
     --invert_case (the per-scan record)--> original grid --> lesion probability + post-processed labels

The label map is built from the lesion candidates the operating point was chosen on (the checkpoint's
``evaluation`` settings, static or dynamic extraction; :mod:`pipeline.inference.label_map`): a candidate
is lesion when its score >= the stored threshold (and its volume >= ``inference.min_component_mm3``),
its class is the lesion class with the largest summed probability inside it. It never keeps only the
largest component: that would delete every other lesion of a multi-lesion scan.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Config, InferenceConfig, config_from_dict
from pipeline.inference.label_map import candidate_label_map
from pipeline.inference.sliding_window import lesion_probability, predict_probabilities
from pipeline.io.dataset import Case, read_case_image
from pipeline.io.formats import NIFTI_SUFFIXES, image_suffix, is_volume_path, strip_suffix, write_volume
from pipeline.io.volume import Volume, grid_mismatch
from pipeline.model.factory import build_model
from pipeline.training.checkpoint import CheckpointError, load_checkpoint
from pipeline.training.loop import resolve_device

if TYPE_CHECKING:
    from pipeline.inference.ensemble import ModelEnsemble

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

    def probabilities(self, image: torch.Tensor, inference: InferenceConfig, progress: bool = False) -> torch.Tensor:
        """(C, X, Y, Z) preprocessed image -> (K, X, Y, Z) float32 class probabilities on the CPU (sliding
        window, mirror TTA as configured). :class:`~pipeline.inference.ensemble.ModelEnsemble` averages these."""
        return predict_probabilities(self.model, image, self.patch_size, inference, self.cfg.train.loss.mode,
                                     self.device, progress=progress)


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


@dataclass
class Prediction:
    """One scan's prediction, every Volume in the input scan's exact geometry."""

    lesion_probability: Volume  # (1, X, Y, Z) float32: any lesion class
    labels: Volume  # (1, X, Y, Z) uint8, post-processed
    class_probabilities: Volume  # (K, X, Y, Z) float32


def predict_volume(loaded: LoadedModel | ModelEnsemble, image: Volume, inference: InferenceConfig,
                   progress: bool = False) -> Prediction:
    """Predict one scan with one model or an ensemble (mean probabilities); see :class:`Prediction`."""
    from pipeline.preprocessing.transform import invert_case, preprocess_case

    plan, mode = loaded.plan, loaded.cfg.train.loss.mode
    expected = len(plan["channel_names"])
    if image.n_channels != expected:
        raise ValueError(f"input has {image.n_channels} channel(s); the model expects {expected} "
                         f"({', '.join(plan['channel_names'])})")
    array, _, record = preprocess_case(image, None, plan, loaded.cfg.preprocess)
    probs = loaded.probabilities(torch.from_numpy(array), inference, progress=progress).numpy()
    back = invert_case(probs, record, "prob")
    if grid_mismatch(back, image) or not np.array_equal(back.affine, image.affine):
        raise RuntimeError("internal error: inverse mapping did not restore the input geometry")
    class_probs = back.data.astype(np.float32, copy=False)
    lesion = lesion_probability(torch.from_numpy(class_probs), loaded.lesion_labels, mode).numpy()
    # the candidates (and settings) the stored operating point was chosen on, thresholded at it
    threshold = (loaded.operating_point or {}).get("threshold")
    labels = candidate_label_map(class_probs, lesion, loaded.lesion_labels, loaded.cfg.evaluation, threshold,
                                 float(np.prod(image.spacing)), inference.min_component_mm3)
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


def load_predictor(paths: Path | str | Sequence[Path | str], device: str = "auto") -> LoadedModel | ModelEnsemble:
    """One checkpoint: its model; several: a :class:`~pipeline.inference.ensemble.ModelEnsemble`."""
    from pipeline.inference.ensemble import load_ensemble

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return load_model(paths[0], device) if len(paths) == 1 else load_ensemble(paths, device)


def predict_paths(cfg: Config, model_path: Path | Sequence[Path], input_path: Path, output_dir: Path,
                  progress: bool = True, output_format: str = "input") -> list[Path]:
    """Predict every scan under ``input_path``; writes ``output_dir/probabilities/<case><suffix>`` and
    ``output_dir/labels/<case><suffix>`` (file names match the inputs, so ``evaluate`` can pair them).
    Several checkpoints in ``model_path``: their probabilities are averaged (an ensemble)."""
    from tqdm import tqdm

    loaded = load_predictor(model_path, cfg.inference.device)
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
