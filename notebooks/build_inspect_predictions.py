"""Write ``inspect_predictions.ipynb`` (outputs stripped) from the cells below.

Edit the cells here, then run ``python notebooks/build_inspect_predictions.py``: the committed notebook
is this script's output, so diffs stay readable and no outputs are ever committed
(``tests/notebooks/test_inspect_notebook.py`` checks both). The notebook only calls
:mod:`pipeline.inspection`; logic belongs there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).with_name("inspect_predictions.ipynb")

CELLS: list[tuple[str, str, list[str]]] = [
    ("md", """\
# Inspect predictions lesion by lesion

Looks at one evaluated run: the per-lesion table (detected, missed, false positives), tri-planar views
(axial / coronal / sagittal) of any lesion or false positive with the GT and predicted contours and the
probability map, galleries of the missed lesions and of the highest-scoring false positives, and the FROC
curve with its confidence band and operating points.

Run the pipeline first (`make repro` in the repository root). Everything here calls `pipeline.inspection`;
the same views are written as PNGs by the evaluate stage to `results/evaluation/lesion_views/`.

**Choose the run** in the next cell: `RUN_ID = None` reads the workspace outputs (what `dvc repro` produced);
`"latest"` or an MLflow run id reads that run's metrics and lesion table from MLflow (images and predictions
always come from the workspace). The environment variables `PIPELINE_WORKDIR`, `PIPELINE_PARAMS` and
`PIPELINE_RUN_ID` override the defaults (the test suite uses them).""", []),
    ("code", """\
import os
from pathlib import Path

WORKDIR = Path(os.environ.get("PIPELINE_WORKDIR", "..")).resolve()  # where the pipeline ran (repo root)
PARAMS = os.environ.get("PIPELINE_PARAMS", "configs/params.yaml")  # relative to WORKDIR
RUN_ID = os.environ.get("PIPELINE_RUN_ID") or None  # None: workspace; "latest" or an MLflow run id""",
     ["parameters"]),
    ("code", """\
%matplotlib inline
import pandas as pd
from IPython.display import display

from pipeline.inspection import detected, false_positives, filter_lesions, load_run, missed

pd.set_option("display.width", 200)
pd.set_option("display.max_columns", 20)

run = load_run(WORKDIR, PARAMS, run_id=RUN_ID)
for warning in run.warnings:
    print("WARNING:", warning)
print(f"{run.source}: {len(run.test_ids)} test scan(s) from {run.workdir}")
run.summary()""", ["summary"]),
    ("md", """\
## Per-lesion table

One row per GT lesion (`TP` = hit by a candidate, `missed`) and per false-positive candidate (`FP`).
`score` is the candidate's probability; `at_operating_point` says whether it counts at the chosen
operating point. Sizes are equivalent-sphere diameters (mm) and volumes (mm³); centroids are world RAS
coordinates (mm). It is a pandas DataFrame: sort and filter it as you like.""", []),
    ("code", """\
table = run.lesions
table.groupby(["kind", "size_bucket"], observed=True).size().unstack(fill_value=0)""", ["table-counts"]),
    ("code", """\
# all rows, highest score first (missed lesions have no score and come last)
table.sort_values("score", ascending=False, na_position="last")""", ["table-sorted"]),
    ("code", """\
# a filter: false positives scoring at least 0.5, and missed lesions of 5 mm or more
display(filter_lesions(table, kind="FP", min_score=0.5))
filter_lesions(table, kind="missed", min_diameter_mm=5.0)""", ["table-filter"]),
    ("md", """\
## Tri-planar views

Centred on the lesion (crosshair), radiological orientation (patient right on the image left; letters at
the edges), CT window W400/L40 HU (percentile window for MRI). Green: GT lesion; red: predicted lesion
(label map); dashed orange: the candidate region (probability ≥ the extraction threshold); colour: lesion
probability. Any row can be shown with `run.view(row)` or `run.view(<index in the table>)`.""", []),
    ("code", """\
rows = missed(table)
if rows.empty:
    print("No missed lesion: every GT lesion is hit by a candidate (or there are no GT lesions).")
else:
    display(run.view(rows.iloc[0]))  # the largest missed lesion""", ["view-missed"]),
    ("code", """\
rows = false_positives(table)
if rows.empty:
    print("No false positive: no candidate outside the GT lesions.")
else:
    display(run.view(rows.iloc[0]))  # the highest-scoring false positive""", ["view-fp"]),
    ("code", """\
rows = detected(table)
if rows.empty:
    print("No detected lesion: no candidate hits a GT lesion (an undertrained model finds nothing).")
else:
    display(run.view(rows.iloc[0]))  # the most confident detection""", ["view-detected"]),
    ("md", """\
## Galleries

Axial crops, one per lesion: the missed lesions (largest first) and the highest-scoring false
positives.""", []),
    ("code", "run.missed_gallery()", ["gallery-missed"]),
    ("code", "run.false_positive_gallery()", ["gallery-fp"]),
    ("md", """\
## FROC

Sensitivity against false positives per scan (log axis), the bootstrap 95% band at the CPM rates, the
operating points (squares) and the chosen one (star).""", []),
    ("code", "run.froc_figure()", ["froc"]),
]


def build() -> nbformat.NotebookNode:
    cells = []
    for kind, source, tags in CELLS:
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        if tags:
            cell.metadata["tags"] = tags
        cells.append(cell)
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):  # stable ids keep the committed file byte-identical across builds
        cell["id"] = f"cell-{i:02d}"
    return nb


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else NOTEBOOK
    nb = build()
    nbformat.validate(nb)
    out.write_text(nbformat.writes(nb) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
