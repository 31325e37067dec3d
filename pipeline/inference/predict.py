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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import InferenceConfig
from pipeline.inference.ensemble import ModelEnsemble, load_ensemble
from pipeline.inference.label_map import candidate_label_map
from pipeline.inference.loaded_model import LoadedModel, load_model
from pipeline.inference.sliding_window import lesion_probability
from pipeline.io.volume import Volume, grid_mismatch

log = logging.getLogger(__name__)


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
    expected = plan.n_channels
    if image.n_channels != expected:
        raise ValueError(f"input has {image.n_channels} channel(s); the model expects {expected} "
                         f"({', '.join(plan.channel_names)})")
    preprocessed, _, record = preprocess_case(image, None, plan, loaded.cfg.preprocess)
    probs = loaded.probabilities(torch.from_numpy(preprocessed.data), inference, progress=progress).numpy()
    back = invert_case(probs, record, "prob")
    if grid_mismatch(back, image) or not np.array_equal(back.affine, image.affine):
        raise RuntimeError("internal error: inverse mapping did not restore the input geometry")
    class_probs = back.data.astype(np.float32, copy=False)
    lesion = lesion_probability(torch.from_numpy(class_probs), loaded.lesion_labels, mode).numpy()
    # the candidates (and settings) the stored operating point was chosen on, thresholded at it
    threshold = loaded.operating_point.score_threshold if loaded.operating_point is not None else None
    labels = candidate_label_map(class_probs, lesion, loaded.lesion_labels, loaded.cfg.evaluation, threshold,
                                 float(np.prod(image.spacing)), inference.min_component_mm3)
    return Prediction(Volume(lesion[None].astype(np.float32), image.affine), Volume(labels[None], image.affine),
                      Volume(class_probs, image.affine))


def load_predictor(paths: Path | str | Sequence[Path | str], device: str = "auto") -> LoadedModel | ModelEnsemble:
    """One checkpoint: its model; several: a :class:`~pipeline.inference.ensemble.ModelEnsemble`."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return load_model(paths[0], device) if len(paths) == 1 else load_ensemble(paths, device)
