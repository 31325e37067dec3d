"""A fixed train / validation / test split, stratified on whether a scan has lesions.

The test scans are never seen by training or model selection: training reads ``train``, model
selection ``val``, and only the evaluate stage reads ``test``.
"""

from __future__ import annotations

import numpy as np


def stratified_split(has_lesion: dict[str, bool], val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, list[str]]:
    """Split case ids into ``train`` / ``val`` / ``test``, keeping the lesion / lesion-free ratio.

    Each stratum is shuffled with ``seed`` and cut by rounding ``fraction * n``; with at least three cases
    overall, ``val`` and ``test`` each get at least one case when their fraction is positive, and ``train``
    keeps at least one. Case ids in each list are sorted, so the result is independent of input order.
    """
    ids = sorted(has_lesion)
    if not ids:
        raise ValueError("cannot split an empty data set")
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for flag in (True, False):
        stratum = [c for c in ids if has_lesion[c] is flag]
        rng.shuffle(stratum)
        n_test = int(round(test_fraction * len(stratum)))
        n_val = int(round(val_fraction * len(stratum)))
        # rounding up both can empty a small stratum (2 scans at 0.3 + 0.3): train keeps one of each kind
        while stratum and n_test + n_val > len(stratum) - 1:
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        out["test"] += stratum[:n_test]
        out["val"] += stratum[n_test:n_test + n_val]
        out["train"] += stratum[n_test + n_val:]
    # small data sets: make sure every requested split is non-empty, taking from the largest one
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        if fraction > 0 and not out[name] and len(ids) >= 3 and len(out["train"]) > 1:
            lesion_train = [c for c in out["train"] if has_lesion[c]]
            pick = (lesion_train or out["train"])[0]
            out["train"].remove(pick)
            out[name].append(pick)
    return {k: sorted(v) for k, v in out.items()}
