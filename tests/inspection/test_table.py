"""The per-lesion inspection table from hand-written ``lesions.csv`` rows, with the expected answers."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.report import LESION_COLUMNS
from pipeline.inspection import table as T

# two scans: a hit lesion (its candidate 1 is "tp", candidate 2 an extra mark, "ignored"), a missed lesion,
# two false positives; scan b has no lesion and one false positive
CSV = ",".join(LESION_COLUMNS) + """
a,lesion,1,1,2,3,100,80,5.3,0.9,hit,1,0.5,5-10mm
a,lesion,2,-4,5,6,10,8,2.5,,missed,,0,<5mm
a,candidate,1,1,2,3,120,96,5.7,0.9,tp,1,0.5,5-10mm
a,candidate,2,1.5,2,3,5,4,2,0.3,ignored,1,0.04,<5mm
a,candidate,3,20,20,20,30,24,3.6,0.386931,fp,,0,<5mm
b,candidate,1,7,8,9,400,320,8.5,0.95,fp,,0,5-10mm
"""


def lesions_csv() -> pd.DataFrame:
    df = pd.read_csv(io.StringIO(CSV), dtype={"scan": str, "matched_id": str})
    assert list(df.columns) == LESION_COLUMNS  # the fixture follows the evaluate stage's format
    return df


def test_kinds_rows_and_order():
    t = T.lesion_table(lesions_csv(), threshold=0.5)
    assert list(t.columns) == T.TABLE_COLUMNS
    assert list(zip(t["scan"], t["kind"].astype(str), t["id"])) == [
        ("a", "missed", 2), ("a", "TP", 1), ("a", "FP", 3), ("b", "FP", 1)]
    assert t["at_operating_point"].tolist() == [False, True, False, True]
    assert t.loc[t["kind"] == "TP", "score"].item() == 0.9
    assert np.isnan(t.loc[t["kind"] == "missed", "score"].item())
    assert t.loc[t["kind"] == "TP", "matched_id"].item() == "1" and t.loc[0, "matched_id"] == ""


def test_hit_candidates_on_request():
    t = T.lesion_table(lesions_csv(), include_hit_candidates=True)
    assert sorted(t["kind"].astype(str)) == ["FP", "FP", "TP", "TP candidate", "ignored", "missed"]
    assert not t["at_operating_point"].any()  # no threshold: nothing counts


def test_operating_threshold_rounded_like_the_csv():
    """The operating point at the lowest FP's score counts that FP although the CSV kept 6 digits."""
    op = {"target_fp_rate": 1.0, "threshold": 0.38693147897720337, "fps_per_scan": 0.5, "sensitivity": 0.5}
    metrics = {"operating_point": op}
    assert T.operating_threshold(metrics) == pytest.approx(0.386931478977)
    t = T.lesion_table(lesions_csv(), T.operating_threshold(metrics))
    assert t.loc[(t["scan"] == "a") & (t["kind"] == "FP"), "at_operating_point"].item()
    assert T.operating_threshold({"operating_point": {**op, "threshold": None}}) is None  # no candidate at all
    assert T.operating_threshold({}) is None


def test_helpers_sort_and_filter():
    t = T.lesion_table(lesions_csv(), threshold=0.5)
    assert T.false_positives(t)["scan"].tolist() == ["b", "a"]  # highest score first
    assert T.false_positives(t, top=1)["scan"].tolist() == ["b"]
    assert T.missed(t)["id"].tolist() == [2]
    assert T.detected(t)["id"].tolist() == [1]
    assert len(T.filter_lesions(t, kind=["FP", "missed"], max_diameter_mm=4.0)) == 2
    assert T.filter_lesions(t, scan="b", min_score=0.9)["kind"].astype(str).tolist() == ["FP"]
    assert T.filter_lesions(t, size_bucket="<5mm", min_score=0.0)["kind"].astype(str).tolist() == ["FP"]
    # ordered categorical: sorting by kind keeps missed, TP, FP
    assert t.sort_values("kind")["kind"].astype(str).tolist()[:2] == ["missed", "TP"]
    np.testing.assert_array_equal(T.centre_mm(t.iloc[0]), [-4.0, 5.0, 6.0])


def test_descriptions():
    t = T.lesion_table(lesions_csv(), threshold=0.5)
    assert T.describe(t.iloc[0]) == "a | missed lesion (lesion 2) | 2.5 mm, 8.0 mm^3 | no candidate hits it"
    assert T.describe(t.iloc[1]).endswith("score 0.900, detected at the operating point")
    assert T.describe(t.iloc[2]).endswith("score 0.387, not counted at the operating point")
    assert T.describe(t.iloc[3], short=True) == "b candidate 1 (FP)\n8.5 mm, p=0.95"


def test_empty_and_invalid_tables():
    empty = T.lesion_table(pd.DataFrame(columns=LESION_COLUMNS))
    assert empty.empty and list(empty.columns) == T.TABLE_COLUMNS
    assert T.missed(empty).empty and T.false_positives(empty, top=3).empty
    bad = lesions_csv()
    bad.loc[0, "outcome"] = "maybe"
    with pytest.raises(ValueError, match="unknown kind/outcome"):
        T.lesion_table(bad)


def test_read_lesion_table_from_the_workspace(workspace):
    """The hand-made workspace's lesions.csv gives the expected TP / missed / FP counts."""
    from inspection_workspace import EXPECTED

    ev = workspace.root / "results" / "evaluation"
    t = T.read_lesion_table(ev / "lesions.csv", json.loads((ev / "metrics.json").read_text()))
    counts = t["kind"].astype(str).value_counts().to_dict()
    assert counts == {k: EXPECTED[k] for k in ("TP", "missed", "FP")}
