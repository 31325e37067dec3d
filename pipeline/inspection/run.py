"""Locate one evaluated run and load what the inspection views need.

A run is read from a working directory where the pipeline ran (the repository after ``make repro`` /
``dvc repro``, or any folder where ``python -m pipeline ... evaluate`` ran):

* ``run_id=None``: the workspace outputs, ``paths.evaluation/{metrics.json, lesions.csv, froc.csv}``;
* ``run_id="latest"`` or an MLflow run id: those three files are the run's logged artifacts
  (``evaluation/``), downloaded from the tracking store the stages used. An id may also be that of a
  training or pipeline (parent) run: its latest ``evaluate`` run is used.

Images and GT labels always come from the configured data set and the predictions from the workspace
(``paths.predictions``; they are not logged to MLflow). When the MLflow run was not evaluated from the
workspace's model, :attr:`RunOutputs.warnings` says so: tables and views may then disagree.

Example::

    run = load_run(".", run_id=None)
    run.lesions.sort_values("score", ascending=False)
    run.view(run.lesions.iloc[0])
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.config import DEFAULT_PARAMS, Config, load_config
from pipeline.contracts import OperatingPoint
from pipeline.inspection import table as T
from pipeline.inspection import views
from pipeline.inspection.scans import ScanLoader, lesion_gallery, lesion_view

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pipeline.io.dataset import Dataset

log = logging.getLogger(__name__)

EVALUATION_FILES = ("metrics.json", "lesions.csv", "froc.csv")


@dataclass
class RunOutputs:
    """One evaluated run, ready to inspect.

    Attributes:
        workdir: folder the pipeline ran in (relative config paths resolve here).
        cfg: the validated config.
        dataset: the data set (images, GT labels).
        test_ids: the evaluated scans.
        metrics: ``metrics.json``.
        lesions: the inspection table (:func:`pipeline.inspection.table.lesion_table`).
        froc: ``froc.csv`` (``threshold, fps_per_scan, sensitivity``).
        evaluation_dir: where metrics / lesions / FROC were read (workspace or downloaded artifacts).
        predictions_dir: ``paths.predictions`` (``probabilities/``, ``labels/``).
        source: ``"workspace"`` or ``"mlflow run <id>"``.
        run_id: the MLflow evaluate run id (None for the workspace).
        loader: reads scans for the views (each scan once while cached).
        warnings: consistency problems found while loading.
    """

    workdir: Path
    cfg: Config
    dataset: Dataset
    test_ids: list[str]
    metrics: dict[str, Any]
    lesions: pd.DataFrame
    froc: pd.DataFrame
    evaluation_dir: Path
    predictions_dir: Path
    source: str
    run_id: str | None
    loader: ScanLoader
    warnings: list[str] = field(default_factory=list)

    @property
    def lesion_labels(self) -> tuple[int, ...]:
        return tuple(self.cfg.data.lesion_labels)

    @property
    def candidate_threshold(self) -> float | None:
        """The probability threshold candidates were extracted at (``evaluation.extraction_threshold``)."""
        default = self.cfg.evaluation.extraction_threshold
        value = self.metrics.get("settings", {}).get("extraction_threshold", default)
        return None if value is None else float(value)

    def summary(self) -> pd.DataFrame:
        """Headline metrics as a one-column table (CPM with its CI, sensitivities, counts, Dice)."""
        m = self.metrics
        ci = m.get("cpm_ci95")
        items: dict[str, Any] = {
            "source": self.source,
            "scans": m.get("scans_total"),
            "lesions": m.get("lesions_total"),
            "lesions detected (any score)": m.get("lesions_detected"),
            "false-positive candidates": m.get("false_positives_total"),
            "CPM": m.get("cpm"),
            "CPM 95% CI": f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else None,
        }
        sens_ci = m.get("sensitivity_at_fp_ci95") or {}
        for rate, value in (m.get("sensitivity_at_fp") or {}).items():
            lo_hi = sens_ci.get(rate)
            items[f"sensitivity at {rate} FP/scan"] = (f"{value:.3f} ({lo_hi[0]:.3f}-{lo_hi[1]:.3f})"
                                                      if lo_hi else value)
        if m.get("operating_point"):
            op = OperatingPoint.from_dict(m["operating_point"], "metrics.json: operating_point")
            items["operating point"] = (f"{op.target_fp_rate:g} FP/scan: threshold {op.score_threshold}, "
                                        f"sensitivity {op.sensitivity:.3f}, {op.fps_per_scan:.3f} FP/scan")
        for name, value in (m.get("dice") or {}).items():
            items[f"Dice {name}"] = value
        return pd.DataFrame({"value": pd.Series(items, dtype=object)})

    def row(self, which: int | pd.Series) -> pd.Series:
        """A table row: an index label of :attr:`lesions` or a row itself."""
        return which if isinstance(which, pd.Series) else self.lesions.loc[which]

    def view(self, which: int | pd.Series, half_width_mm: float | None = None) -> Figure:
        """Tri-planar view of a lesion or false positive (a row of :attr:`lesions` or its index)."""
        row = self.row(which)
        return lesion_view(self.loader(str(row["scan"])), row, lesion_labels=self.lesion_labels,
                           candidate_threshold=self.candidate_threshold, channel=self.loader.channel,
                           half_width_mm=half_width_mm)

    def gallery(self, rows: pd.DataFrame, title: str, empty_text: str = "nothing to show",
                ncols: int = 6) -> Figure:
        """Axial crops of ``rows`` (any selection of :attr:`lesions`)."""
        return lesion_gallery(rows, self.loader, lesion_labels=self.lesion_labels, title=title,
                              candidate_threshold=self.candidate_threshold, empty_text=empty_text,
                              ncols=ncols)

    def missed_gallery(self, max_tiles: int = 36) -> Figure:
        rows = T.missed(self.lesions)
        shown = rows.head(max_tiles)
        return self.gallery(shown, f"Missed lesions ({len(shown)} of {len(rows)}, largest first)",
                            empty_text=f"no missed lesions in {len(self.test_ids)} test scan(s)")

    def false_positive_gallery(self, top: int = 24) -> Figure:
        rows = T.false_positives(self.lesions)
        shown = rows.head(top)
        return self.gallery(shown, f"Highest-scoring false positives ({len(shown)} of {len(rows)})",
                            empty_text=f"no false-positive candidates in {len(self.test_ids)} test scan(s)")

    def detected_gallery(self, max_tiles: int = 24) -> Figure:
        rows = T.detected(self.lesions)
        shown = rows.head(max_tiles)
        return self.gallery(shown, f"Detected lesions ({len(shown)} of {len(rows)}, highest score first)",
                            empty_text="no detected lesions")

    def froc_figure(self) -> Figure:
        return views.froc_figure(self.froc, self.metrics)


def _resolve(workdir: Path, path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    return str(p if p.is_absolute() else workdir / p)


def _config(workdir: Path, params: str | Path, overrides: list[str] | None) -> Config:
    path = Path(params)
    path = path if path.is_absolute() else workdir / path
    if not path.exists() and Path(params) == DEFAULT_PARAMS:
        log.warning("%s not found: using the default config", path)
        cfg = load_config(None, overrides)
    else:
        cfg = load_config(path, overrides)
    paths = {k: _resolve(workdir, v) for k, v in cfg.paths.model_dump().items()}
    data = {"dataset": _resolve(workdir, cfg.data.dataset), "root": _resolve(workdir, cfg.data.root)}
    return cfg.model_copy(update={"paths": cfg.paths.model_copy(update=paths),
                                  "data": cfg.data.model_copy(update=data)})


def _check_files(folder: Path, where: str) -> None:
    missing = [n for n in EVALUATION_FILES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {', '.join(missing)} missing from {where}; run the evaluate "
                                "stage first (`make repro`, `dvc repro` or `python -m pipeline evaluate`)")


def _mlflow_outputs(cfg: Config, workdir: Path, run_id: str) -> tuple[Path, str, list[str]]:
    """Download the evaluate run's ``evaluation/`` artifacts; returns (folder, evaluate run id, warnings)."""
    from pipeline.tracking import RunNotFound, download_run_artifacts, get_run, latest_run
    from pipeline.tracking.pipeline_run import run_ref_path

    if run_id == "latest":
        info = latest_run(cfg.tracking, "evaluate", workdir=workdir)
        if info is None:
            raise RunNotFound(f"no finished 'evaluate' run in MLflow experiment {cfg.tracking.experiment!r}")
    else:
        info = get_run(run_id, cfg.tracking, workdir=workdir)
        if info["run_name"] != "evaluate":
            linked = latest_run(cfg.tracking, "evaluate", workdir=workdir, of_run=run_id)
            if linked is None:
                raise RunNotFound(f"MLflow run {run_id} ({info['run_name']!r}) is not an evaluate run and "
                                  "has no finished evaluate run linked to it")
            log.info("run %s is %r: using its evaluate run %s", run_id, info["run_name"], linked["run_id"])
            info = linked
    eval_id = info["run_id"]
    dst = Path(tempfile.mkdtemp(prefix=f"inspect-{eval_id[:8]}-"))
    folder = download_run_artifacts(eval_id, dst, cfg.tracking, "evaluation", workdir=workdir)
    warnings = []
    ref_path = run_ref_path(cfg.paths.models)
    train_id = info["tags"].get("train_run_id")
    if ref_path.is_file():
        workspace_train = json.loads(ref_path.read_text()).get("run_id")
        if train_id and workspace_train and train_id != workspace_train:
            warnings.append(f"MLflow run {eval_id} evaluated training run {train_id}, but the workspace "
                            f"model (and its predictions, shown in the views) is from training run "
                            f"{workspace_train}: tables and pictures may disagree")
    return folder, eval_id, warnings


def load_run(workdir: str | Path = ".", params: str | Path = DEFAULT_PARAMS, run_id: str | None = None,
             overrides: list[str] | None = None, channel: int = 0) -> RunOutputs:
    """Load an evaluated run for inspection (see the module docstring).

    Args:
        workdir: the folder the pipeline ran in.
        params: config file, relative to ``workdir`` (missing default file: the default config).
        run_id: None (workspace outputs), ``"latest"`` (the latest finished MLflow evaluate run) or an
            MLflow run id (evaluate, train or pipeline run).
        overrides: ``["key.path=value", ...]`` as with ``--set``.
        channel: the image channel shown in the views.

    Raises:
        FileNotFoundError: the evaluation outputs are missing (the message says which stage to run).
        pipeline.tracking.RunNotFound: no such MLflow run.
        pipeline.config.ConfigError: invalid config.
    """
    from pipeline.io.dataset import load_dataset

    workdir = Path(workdir).resolve()
    cfg = _config(workdir, params, overrides)
    warnings: list[str] = []
    if run_id is None:
        eval_dir, source, eval_id = Path(cfg.paths.evaluation), "workspace", None
        _check_files(eval_dir, "the workspace")
    else:
        eval_dir, eval_id, warnings = _mlflow_outputs(cfg, workdir, str(run_id))
        source = f"mlflow run {eval_id}"
        _check_files(eval_dir, f"the artifacts of {source}")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    ds = load_dataset(cfg.data, cfg.paths.raw)
    test_ids = list(metrics.get("settings", {}).get("test_scans") or [])
    splits = Path(cfg.paths.splits)
    if not test_ids and splits.is_file():
        test_ids = list(json.loads(splits.read_text()).get("test", []))
    lesions = T.read_lesion_table(eval_dir / "lesions.csv", metrics)
    froc = pd.read_csv(eval_dir / "froc.csv")
    pred_dir = Path(cfg.paths.predictions)
    missing = [s for s in test_ids if not (pred_dir / "probabilities" / f"{s}.nii.gz").is_file()]
    if missing:
        listed = ", ".join(missing[:5]) + ("..." if len(missing) > 5 else "")
        warnings.append(f"{pred_dir}: no predictions for {len(missing)} test scan(s) ({listed}): their views "
                        "show no prediction")
    for w in warnings:
        log.warning(w)
    loader = ScanLoader(ds, pred_dir, cfg.data.label_remap, channel=channel)
    return RunOutputs(workdir, cfg, ds, test_ids, metrics, lesions, froc, eval_dir, pred_dir, source, eval_id,
                      loader, warnings)
