"""pipeline/data/splits.py: a fixed train / val / test split, stratified on whether a scan has lesions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.splits import stratified_split


def _cases(n_lesion: int, n_free: int) -> dict[str, bool]:
    cases = {f"les_{i:02d}": True for i in range(n_lesion)}
    cases.update({f"free_{i:02d}": False for i in range(n_free)})
    return cases


def _check_partition(cases: dict[str, bool], split: dict[str, list[str]]) -> None:
    assert set(split) == {"train", "val", "test"}
    train, val, test = (set(split[k]) for k in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)  # no test case in train / val
    assert train | val | test == set(cases)
    assert all(split[k] == sorted(split[k]) for k in split)


def test_each_split_keeps_the_lesion_ratio():
    cases = _cases(10, 10)
    split = stratified_split(cases, val_fraction=0.2, test_fraction=0.2, seed=0)
    _check_partition(cases, split)
    # per stratum: round(0.2 * 10) = 2 to test, 2 to val, 6 to train
    for name, n in (("train", 6), ("val", 2), ("test", 2)):
        assert sum(cases[c] for c in split[name]) == n, name
        assert sum(not cases[c] for c in split[name]) == n, name


def test_uneven_strata():
    cases = _cases(6, 24)  # lesions are rare
    split = stratified_split(cases, val_fraction=0.15, test_fraction=0.2, seed=3)
    _check_partition(cases, split)
    # lesion stratum: round(1.2) = 1 test, round(0.9) = 1 val; lesion-free: round(4.8) = 5 test, round(3.6) = 4 val
    assert [sum(cases[c] for c in split[k]) for k in ("train", "val", "test")] == [4, 1, 1]
    assert [sum(not cases[c] for c in split[k]) for k in ("train", "val", "test")] == [15, 4, 5]


def test_same_seed_same_split_whatever_the_input_order():
    cases = _cases(8, 7)
    a = stratified_split(cases, 0.2, 0.2, seed=5)
    b = stratified_split(dict(reversed(list(cases.items()))), 0.2, 0.2, seed=5)
    assert a == b
    assert a != stratified_split(cases, 0.2, 0.2, seed=6)


def test_tiny_datasets_still_get_a_val_and_test_case():
    cases = {"a": True, "b": False, "c": True}
    split = stratified_split(cases, val_fraction=0.15, test_fraction=0.2, seed=0)
    _check_partition(cases, split)
    assert [len(split[k]) for k in ("train", "val", "test")] == [1, 1, 1]


def test_rounding_never_empties_train():
    # 2 scans per stratum at 0.3 + 0.3: rounding alone would send one to val and one to test in each stratum
    assert stratified_split({"a": True, "b": True}, 0.3, 0.3, seed=0)["train"]
    cases = _cases(2, 2)
    split = stratified_split(cases, val_fraction=0.3, test_fraction=0.3, seed=0)
    _check_partition(cases, split)
    # each stratum: 1 test, 1 train; val, still empty, then takes a lesion scan from train
    assert [len(split[k]) for k in ("train", "val", "test")] == [1, 1, 2]
    assert [cases[c] for c in split["val"]] == [True] and sorted(cases[c] for c in split["test"]) == [
        False,
        True,
    ]


def test_zero_fractions_leave_the_split_empty():
    cases = _cases(5, 5)
    split = stratified_split(cases, val_fraction=0.0, test_fraction=0.0, seed=0)
    assert split == {"train": sorted(cases), "val": [], "test": []}


def test_all_lesion_free():
    cases = _cases(0, 10)
    split = stratified_split(cases, 0.2, 0.2, seed=0)
    _check_partition(cases, split)
    assert [len(split[k]) for k in ("train", "val", "test")] == [6, 2, 2]


def test_empty_dataset():
    with pytest.raises(ValueError, match="empty"):
        stratified_split({}, 0.2, 0.2, seed=0)


@settings(max_examples=80, deadline=None, database=None)  # no .hypothesis/ in the repository
@given(
    flags=st.lists(st.booleans(), min_size=1, max_size=40),
    val=st.floats(0.0, 0.45),
    test=st.floats(0.0, 0.45),
    seed=st.integers(0, 2**16),
)
def test_split_is_always_a_partition(flags, val, test, seed):
    cases = {f"c{i:02d}": f for i, f in enumerate(flags)}
    split = stratified_split(cases, val, test, seed)
    _check_partition(cases, split)
    assert split["train"], "training is never empty"
    assert split == stratified_split(cases, val, test, seed)


# ------------------------------------------------------------------------------------ cross-validation folds

from pipeline.data.splits import FoldsError, fold_cases, load_or_make_folds, make_folds  # noqa: E402


def test_folds_are_stratified_balanced_and_partition_the_cases():
    cases = _cases(7, 11)
    folds = make_folds(cases, n_folds=5, seed=0)
    assert len(folds) == 5
    vals = [set(f["val"]) for f in folds]
    assert set().union(*vals) == set(cases) and sum(len(v) for v in vals) == len(cases)  # a partition
    for fold, val in zip(folds, vals, strict=True):
        assert set(fold["train"]) == set(cases) - val and fold["val"] == sorted(fold["val"])
    # 18 scans: sizes 4,4,4,3,3; 7 lesion scans dealt first: 2,2,1,1,1 per fold
    assert sorted(len(v) for v in vals) == [3, 3, 4, 4, 4]
    assert sorted(sum(cases[c] for c in v) for v in vals) == [1, 1, 1, 2, 2]
    assert make_folds(dict(reversed(list(cases.items()))), 5, seed=0) == folds  # deterministic
    assert make_folds(cases, 5, seed=1) != folds


def test_too_few_scans_for_the_folds():
    with pytest.raises(ValueError, match="3 scan\\(s\\) cannot make 5 folds"):
        make_folds(_cases(2, 1), n_folds=5, seed=0)


def test_folds_file_is_written_once_and_then_only_read(tmp_path):
    path = tmp_path / "folds.json"
    cases = _cases(4, 6)
    first = load_or_make_folds(path, cases, 5, seed=0)
    text = path.read_text()
    import json

    assert json.loads(text) == first  # nnU-Net's splits_final.json layout: [{"train": [...], "val": [...]}]
    # a later run with another seed (or another order) reuses the file unchanged
    assert load_or_make_folds(path, dict(reversed(list(cases.items()))), 5, seed=9) == first
    assert path.read_text() == text


def test_folds_file_for_another_case_set_or_fold_count_is_an_error(tmp_path):
    path = tmp_path / "folds.json"
    load_or_make_folds(path, _cases(4, 6), 5, seed=0)
    text = path.read_text()
    changed = {**_cases(4, 5), "new_scan": True}  # free_05 dropped, new_scan added
    with pytest.raises(FoldsError, match=r"folds\.json: fold 0 was made for another set of scans \(scans not "
                                         r"in the file: \['new_scan'\]; in the file but not among the training "
                                         r"scans: \['free_05'\]\)"):
        load_or_make_folds(path, changed, 5, seed=0)
    with pytest.raises(FoldsError, match=r"folds\.json holds 5 folds but train\.n_folds is 3"):
        load_or_make_folds(path, _cases(4, 6), 3, seed=0)
    assert path.read_text() == text  # never rewritten
    path.write_text('{"train": []}')
    with pytest.raises(FoldsError, match=r"folds\.json: not a folds file"):
        load_or_make_folds(path, _cases(4, 6), 5, seed=0)


def test_fold_cases_are_the_train_and_val_scans_with_their_lesion_flags():
    splits = {"train": ["a", "b"], "val": ["c"], "test": ["d"], "cases_with_lesions": ["a", "c", "d"]}
    assert fold_cases(splits) == {"a": True, "b": False, "c": True}
    with pytest.raises(FoldsError, match="splits.json: no 'cases_with_lesions'"):
        fold_cases({"train": [], "val": []}, "splits.json")
