"""A fixed train / validation / test split, stratified on whether a scan has lesions, and cross-validation
folds of the train + validation scans.

The test scans are never seen by training or model selection: training reads ``train``, model
selection ``val``, and only the evaluate stage reads ``test``. With ``train.fold`` set, fold k's
``train`` / ``val`` (from the folds file, made once) replace the split's ``train`` / ``val``.
"""

from __future__ import annotations

import json
from pathlib import Path

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


class FoldsError(ValueError):
    """A folds file does not fit the data set or the configuration; the message names the file."""


def make_folds(has_lesion: dict[str, bool], n_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """``n_folds`` cross-validation folds, stratified on whether a scan has lesions.

    Each stratum (lesion scans first, then lesion-free ones) is shuffled with ``seed`` and dealt to the
    folds in turn, the deal continuing across strata, so fold sizes differ by at most one and each fold's
    validation part holds its share of lesion scans. Fold k is ``{"train": [...], "val": [...]}`` with
    sorted ids (nnU-Net's ``splits_final.json`` layout); the ``val`` parts partition the cases.
    """
    ids = sorted(has_lesion)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if len(ids) < n_folds:
        raise ValueError(f"{len(ids)} scan(s) cannot make {n_folds} folds: every fold needs a validation scan")
    rng = np.random.default_rng(seed)
    val: list[list[str]] = [[] for _ in range(n_folds)]
    turn = 0
    for flag in (True, False):
        stratum = [c for c in ids if has_lesion[c] is flag]
        rng.shuffle(stratum)
        for case in stratum:
            val[turn % n_folds].append(case)
            turn += 1
    return [{"train": sorted(set(ids) - set(v)), "val": sorted(v)} for v in val]


def load_or_make_folds(path: str | Path, has_lesion: dict[str, bool], n_folds: int,
                       seed: int) -> list[dict[str, list[str]]]:
    """The folds in ``path``; made with :func:`make_folds` and written there if the file does not exist.

    An existing file is never rewritten: models trained on different folds cannot be ensembled or
    compared fold by fold. It must cover exactly the cases of ``has_lesion`` and hold ``n_folds`` folds.

    Raises:
        FoldsError: unreadable file, wrong layout, another number of folds, or another set of cases.
    """
    from pipeline.io.atomic import write_json

    path = Path(path)
    if not path.exists():
        folds = make_folds(has_lesion, n_folds, seed)
        write_json(path, folds)
        return folds
    try:
        folds = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FoldsError(f"{path}: cannot read the folds file ({exc})") from None
    if not (isinstance(folds, list) and folds and all(
            isinstance(f, dict) and set(f) >= {"train", "val"}
            and all(isinstance(f[k], list) and all(isinstance(c, str) for c in f[k]) for k in ("train", "val"))
            for f in folds)):
        raise FoldsError(f"{path}: not a folds file: expected a list of {{\"train\": [...], \"val\": [...]}}")
    if len(folds) != n_folds:
        raise FoldsError(f"{path} holds {len(folds)} folds but train.n_folds is {n_folds}; set n_folds to "
                         f"{len(folds)}, or move the file away to make new folds")
    expected = set(has_lesion)
    for k, fold in enumerate(folds):
        cases = set(fold["train"]) | set(fold["val"])
        if cases != expected:
            missing, extra = sorted(expected - cases), sorted(cases - expected)
            raise FoldsError(
                f"{path}: fold {k} was made for another set of scans (scans not in the file: "
                f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; in the file but not among the training "
                f"scans: {extra[:10]}{' ...' if len(extra) > 10 else ''}). Folds are never changed silently: "
                "move the file away to make new folds (models of the old folds are then not comparable)")
        if set(fold["train"]) & set(fold["val"]):
            raise FoldsError(f"{path}: fold {k} has scans in both train and val")
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in folds]


def fold_cases(splits: dict, source: str = "splits") -> dict[str, bool]:
    """``{case: has_lesion}`` of the scans cross-validation uses: the train and val scans of the data
    stage's split (the test scans stay held out)."""
    if "cases_with_lesions" not in splits:
        raise FoldsError(f"{source}: no 'cases_with_lesions' list; re-run the data stage (prepare-data)")
    lesion = set(splits["cases_with_lesions"])
    return {c: c in lesion for c in [*splits["train"], *splits["val"]]}
