"""Report files: ``lesions.csv`` byte-equal to the ``csv.writer`` reference, ``froc.csv`` at the corners."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.evaluation.froc import froc_curve, interpolate_sensitivity, size_bucket, size_bucket_names
from pipeline.evaluation.lesions import CANDIDATE_OUTCOMES, match_case
from pipeline.evaluation.report import (
    LESION_COLUMNS,
    _csv_column,
    _csv_field,
    froc_csv_text,
    write_lesions_csv,
)

EDGES = (5.0, 10.0)


def _reference_lesions_csv(cases, edges) -> str:
    """The previous writer, cell by cell: ``csv.writer`` over ``%.6g`` / ``str`` cells (NaN -> empty)."""
    names = np.asarray(size_bucket_names(edges))

    def column(values):
        if values.dtype.kind == "f":
            return ["%.6g" % v if v == v else "" for v in values.tolist()]
        return [str(v) for v in values.tolist()]

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LESION_COLUMNS)
    for case in cases:
        les, cand = case.lesions, case.candidates
        m, n = len(les), len(cand)
        hits_of: dict[int, list[str]] = {}
        for c, g in case.pairs.tolist():
            hits_of.setdefault(c, []).append(str(g))
        cand_iou = np.zeros(n)
        for (c, _g), v in zip(case.pairs.tolist(), case.pair_iou.tolist()):
            cand_iou[c - 1] = max(cand_iou[c - 1], v)
        rows = {
            "scan": np.full(m + n, case.scan, dtype=object),
            "kind": np.array(["lesion"] * m + ["candidate"] * n, dtype=object),
            "id": np.r_[np.arange(1, m + 1), np.arange(1, n + 1)],
            "centroid_x_mm": np.r_[les.centroid_mm[:, 0], cand.centroid_mm[:, 0]],
            "centroid_y_mm": np.r_[les.centroid_mm[:, 1], cand.centroid_mm[:, 1]],
            "centroid_z_mm": np.r_[les.centroid_mm[:, 2], cand.centroid_mm[:, 2]],
            "voxels": np.r_[les.voxels, cand.voxels],
            "volume_mm3": np.r_[les.volume_mm3, cand.volume_mm3],
            "diameter_mm": np.r_[les.diameter_mm, cand.diameter_mm],
            "score": np.r_[case.lesion_score, cand.score],
            "outcome": np.r_[np.where(np.isnan(case.lesion_score), "missed", "hit").astype(object),
                             np.array([CANDIDATE_OUTCOMES[int(o)] for o in case.candidate_outcome], dtype=object)],
            "matched_id": np.r_[np.where(case.lesion_match > 0, case.lesion_match.astype(str), "").astype(object),
                                np.array([";".join(hits_of.get(i, [])) for i in range(1, n + 1)], dtype=object)],
            "iou": np.r_[case.lesion_iou, cand_iou],
            "size_bucket": names[size_bucket(np.r_[les.diameter_mm, cand.diameter_mm], edges)],
        }
        w.writerows(zip(*(column(np.asarray(rows[c])) for c in LESION_COLUMNS)))
    return buf.getvalue()


def _cases(seed: int):
    """Matched scans with touching / overlapping blobs, noise, odd scan names and odd numbers."""
    rng = np.random.default_rng(seed)
    out = []
    for k, name in enumerate(["plain", "with,comma", 'with "quote"', "line\nbreak", "  spaced ", "ünï"]):
        shape = (20, 18, 16)
        gt = np.zeros(shape, bool)
        prob = (rng.random(shape) ** 30).astype(np.float32)  # speckle candidates
        for _ in range(rng.integers(0, 5)):
            c = rng.integers(3, 13, size=3)
            r = rng.integers(1, 4)
            gt[c[0] - r:c[0] + r, c[1] - r:c[1] + r, c[2] - r:c[2] + r] = True
            s = c + rng.integers(-2, 3, size=3)
            prob[s[0] - r:s[0] + r + 1, s[1] - r:s[1] + r + 1, s[2] - r:s[2] + r] = rng.uniform(0.2, 1.0)
        affine = np.diag([-0.8, 0.8, 1.5, 1.0])
        affine[:3, 3] = [0.8 * 5, -3.2, rng.normal() * 1e4]  # x = 0.8 (5 - i): some centroids at -0.0 / 0.0
        m = match_case(name, prob, gt, affine, extraction_threshold=0.1)
        if k == 1:  # odd numbers the previous writer printed: inf, -inf, NaN, -0.0, huge, tiny
            odd = np.array([np.inf, -np.inf, np.nan, -0.0, 1e300, 5e-324, 123456789.0, 1 / 3])
            cand = m.candidates
            n = len(cand)
            score = cand.score.copy()
            score[: min(n, odd.size)] = odd[: min(n, odd.size)]
            cent = cand.centroid_mm.copy()
            cent[: min(n, odd.size), 1] = odd[: min(n, odd.size)]
            m = replace(m, candidates=replace(cand, score=score, centroid_mm=cent))
        out.append(m)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_lesions_csv_is_byte_equal_to_the_csv_writer_reference(tmp_path, seed):
    cases = _cases(seed)
    assert sum(len(c.candidates) for c in cases) > 20 and any(c.pairs.size for c in cases)
    write_lesions_csv(tmp_path / "l.csv", cases, EDGES)
    assert (tmp_path / "l.csv").read_bytes() == _reference_lesions_csv(cases, EDGES).encode("utf-8")
    rows = list(csv.DictReader((tmp_path / "l.csv").open(newline="", encoding="utf-8")))
    assert {r["scan"] for r in rows} >= {"with,comma", 'with "quote"', "line\nbreak"}  # read back intact


def test_lesions_csv_of_scans_without_rows_is_the_header(tmp_path):
    case = match_case("empty", np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), bool), np.eye(4))
    write_lesions_csv(tmp_path / "l.csv", [case, case], EDGES)
    assert (tmp_path / "l.csv").read_text() == ",".join(LESION_COLUMNS) + "\n"


def test_float_cells_are_percent_6g_of_every_value():
    rng = np.random.default_rng(0)
    v = np.r_[rng.normal(size=500) * 10.0 ** rng.integers(-8, 9, 500), rng.integers(-5, 5, 100).astype(float),
              rng.random(300).astype(np.float32).astype(np.float64), np.zeros(50), -np.zeros(7),
              [np.nan, np.inf, -np.inf, 5e-324, 1e308, 0.5, 0.5, 2.5e-5, 999999.5, 1e16]]
    rng.shuffle(v)
    assert _csv_column(v) == ["%.6g" % x if x == x else "" for x in v.tolist()]
    with np.errstate(over="ignore"):  # 1e308 -> inf in float32
        v32 = v.astype(np.float32)
    assert _csv_column(v32) == ["%.6g" % x if x == x else "" for x in v32.tolist()]
    assert _csv_column(np.zeros(0)) == []


def test_int_bool_and_text_cells():
    ints = np.array([3, -1, 0, 3, 10**12, 7], np.int64)
    assert _csv_column(ints) == ["3", "-1", "0", "3", "1000000000000", "7"]
    assert _csv_column(np.array([True, False, True])) == ["True", "False", "True"]
    assert _csv_column((["a", "b,c"], np.array([1, 0, 1]))) == ['"b,c"', "a", '"b,c"']
    assert _csv_column(np.array(["x", 'y"', "x"], dtype=object)) == ["x", '"y"""', "x"]


@pytest.mark.parametrize("text", ["", "a", "a,b", 'say "hi"', "two\nlines", "cr\rhere", " lead", "tab\t", "é;1"])
def test_csv_field_is_what_csv_writer_writes(text):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["x", text, "y"])
    assert buf.getvalue() == "x," + _csv_field(text) + ",y\n"


def test_froc_csv_holds_the_corners_as_exact_reprs():
    rng = np.random.default_rng(3)
    les = np.r_[rng.random(15).astype(np.float32), [np.nan] * 3]
    fps = rng.random(4000).astype(np.float32) ** 4
    curve = froc_curve(les, fps, n_scans=7)
    text = froc_csv_text(SimpleNamespace(curve=curve))
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["threshold", "fps_per_scan", "sensitivity"] and rows[1][0] == "inf"
    t, f, s = (np.array([float(r[i]) for r in rows[1:]]) for i in range(3))
    assert 16 < len(t) < 100 < curve.thresholds.size  # ~4000 vertices, a few dozen corners
    assert np.isin(t, curve.thresholds).all()  # every row is a vertex, read back to the same float
    i = np.searchsorted(-curve.thresholds, -t)
    np.testing.assert_array_equal(f, curve.fps_per_scan[i])
    np.testing.assert_array_equal(s, curve.sensitivity[i])
    x = np.r_[curve.fps_per_scan, rng.random(100) * 600]
    np.testing.assert_array_equal(interpolate_sensitivity(f, s, x),
                                  interpolate_sensitivity(curve.fps_per_scan, curve.sensitivity, x))


def test_froc_csv_without_lesions_and_without_candidates():
    text = froc_csv_text(SimpleNamespace(curve=froc_curve(np.array([]), np.array([0.4, 0.2]), n_scans=2)))
    assert text == "threshold,fps_per_scan,sensitivity\ninf,0.0,nan\n0.2,1.0,nan\n"
    text = froc_csv_text(SimpleNamespace(curve=froc_curve(np.array([np.nan]), np.array([]), n_scans=1)))
    assert text == "threshold,fps_per_scan,sensitivity\ninf,0.0,0.0\n"


def test_row_id_texts_grow_consistently_from_threads():
    """Folder evaluation renders each scan's lesions.csv lines in worker threads; the shared id-text cache
    must stay ["0", "1", ...] whatever the interleaving."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.evaluation import report

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(report._id_texts, [n for n in range(1, 300_000, 1_009)] * 2))
    assert report._ID_TEXTS == [str(i) for i in range(len(report._ID_TEXTS))]
    assert len(report._ID_TEXTS) >= 299_000
