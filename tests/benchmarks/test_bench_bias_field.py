"""benchmarks/bench_bias_field.py: the ROC AUC helper and the robust scaling it reports with."""

from __future__ import annotations

import numpy as np
import pytest

from tests.benchmark_module import load_benchmark

bench = load_benchmark("bench_bias_field")


def test_roc_auc_hand_computed():
    positive = np.array([True, True, False, False, False])
    assert bench.roc_auc(positive, np.array([5.0, 4.0, 3.0, 2.0, 1.0])) == 1.0
    assert bench.roc_auc(positive, np.array([1.0, 2.0, 3.0, 4.0, 5.0])) == 0.0
    # pairs (pos, neg): 3>1, 3>2, 3<4; 0.5 (tie 2=2), 0.5... : positives 3 and 2 vs negatives 1, 2, 4
    # 3: beats 1, 2 -> 2; 2: beats 1, ties 2 -> 1.5; total 3.5 of 6
    assert bench.roc_auc(positive, np.array([3.0, 2.0, 1.0, 2.0, 4.0])) == pytest.approx(3.5 / 6)


def test_robust_scale_over_the_mask():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 100.0])
    mask = np.array([True, True, True, True, True, False])
    np.testing.assert_allclose(bench.robust_scale(x, mask)[:5], [-1.0, -0.5, 0.0, 0.5, 1.0])
