"""The label map `predict` writes comes from the candidates the operating point was chosen on: on the
validation scans, evaluated as label maps, it has the stored operating point's FP/scan and sensitivity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import Config, EvaluationConfig
from pipeline.evaluation.lesions import match_case
from pipeline.inference.label_map import candidate_label_map
from pipeline.inference.sliding_window import lesion_probability, predict_probabilities
from pipeline.io.volume import make_affine
from pipeline.training.data import PreprocessedCase
from pipeline.training.validate import validate
from tests.contract_examples import plan_with

SHAPE = (40, 40, 24)
LESION = 2


def _blob(centre, radius, peak):
    g = np.meshgrid(*[np.arange(n) - c for n, c in zip(SHAPE, centre)], indexing="ij")
    return (peak * np.exp(-sum(x * x for x in g) / radius**2)).astype(np.float32)


def _scan(seed: int) -> PreprocessedCase:
    """Log class probabilities as the 'image' (an identity network then predicts them back): 3 lesions
    (predicted with varying peaks and halos, one missed), 3 false-positive blobs and speckle."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[:, :, :4] = 1
    p = np.zeros(SHAPE, np.float32)
    g = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    for i in range(3):
        c = rng.integers(6, 34, 3)
        c[2] = rng.integers(6, 18)
        r = rng.uniform(2.0, 4.0)
        label[sum((x - cc) ** 2 for x, cc in zip(g, c)) <= r * r] = LESION
        if i < 2:
            p = np.maximum(p, _blob(c + rng.integers(-1, 2, 3), r * rng.uniform(0.8, 1.6), rng.uniform(0.2, 0.95)))
    for _ in range(3):
        p = np.maximum(p, _blob(rng.integers(3, 37, 3), rng.uniform(1.5, 3.0), rng.uniform(0.15, 0.9)))
    p = np.clip(p + rng.uniform(0, 0.12, SHAPE).astype(np.float32) ** 3, 0, 0.98)
    probs = np.stack([0.7 * (1 - p), 0.3 * (1 - p), p])
    return PreprocessedCase(f"s{seed}", np.log(probs).astype(np.float32), label, (1.0, 1.0, 2.0))


@pytest.mark.parametrize("extraction", ["static", "dynamic"])
@pytest.mark.parametrize("rate", [0.5, 1.0, 2.0])
def test_label_map_has_the_operating_points_fp_rate_and_sensitivity(extraction, rate):
    cfg = Config().model_copy(update={
        "evaluation": EvaluationConfig(extraction=extraction, operating_fp_rate=rate, bootstrap=0),
        "inference": Config().inference.model_copy(update={"amp": False, "tta_mirror": False}),
        "train": Config().train.model_copy(update={"loss": Config().train.loss.model_copy(update={"mode": "softmax"})}),
    })
    cases = [_scan(s) for s in range(6)]
    model, device = nn.Identity(), torch.device("cpu")
    op = validate(model, cases, plan_with(lesion_labels=[LESION]), cfg, device, SHAPE).operating_point
    assert op is not None and op.score_threshold is not None

    tp = fp = lesions = 0
    for case in cases:
        probs = predict_probabilities(model, torch.from_numpy(case.image), SHAPE, cfg.inference, "softmax", device)
        lesion = lesion_probability(probs, [LESION], "softmax").numpy()
        labels = candidate_label_map(probs.numpy(), lesion, [LESION], cfg.evaluation, op.score_threshold)
        assert set(np.unique(labels)) <= {0, LESION}  # the non-lesion argmax is background here
        m = match_case(case.case_id, labels == LESION, case.label == LESION, make_affine(case.spacing_mm),
                       is_label_map=True,
                       hit_criterion=cfg.evaluation.hit_criterion, iou_threshold=cfg.evaluation.iou_threshold)
        tp += int(np.count_nonzero(~np.isnan(m.lesion_score)))
        fp += int(np.count_nonzero(m.candidate_outcome == 0))
        lesions += m.n_lesions
    assert 0 < tp < lesions  # a non-trivial operating point: some lesions missed
    assert fp / len(cases) == pytest.approx(op.fps_per_scan, abs=1e-12)
    assert tp / lesions == pytest.approx(op.sensitivity, abs=1e-12)
    assert fp / len(cases) <= rate


def test_candidate_class_is_the_lesion_class_with_the_largest_summed_probability():
    """One candidate over two lesion classes (3 and 4): class 4 has more probability mass in it."""
    shape = (12, 12, 12)
    probs = np.zeros((5,) + shape, np.float32)
    probs[0] = 1.0
    probs[:, 3:8, 3:8, 3:8] = np.array([0.2, 0, 0, 0.5, 0.3])[:, None, None, None]
    probs[:, 3:5, 3:8, 3:8] = np.array([0.2, 0, 0, 0.3, 0.5])[:, None, None, None]
    lesion = probs[3] + probs[4]
    labels = candidate_label_map(probs, lesion, [3, 4], EvaluationConfig(extraction="static"), threshold=None)
    assert (labels[3:8, 3:8, 3:8] == 3).all() and (labels == 3).sum() == 125
