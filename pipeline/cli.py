"""``python -m pipeline <command>`` (also the ``rare-lesion`` console script).

Each command parses its arguments, loads the validated config, calls one library function and writes
outputs. Heavy libraries (torch, MONAI, mlflow) are imported inside the commands, so ``--help`` is fast.

Exit codes: 0 success; 1 unexpected error; 2 bad usage or invalid config; 3 invalid or missing input data.
Logging goes through tqdm (progress bars stay intact); training adds the run's ETA to every epoch line, and
every command ends with one summary line (``<command> finished in <duration>: ...``; not with ``-q``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_DATA = 0, 1, 2, 3
log = logging.getLogger("pipeline")


def _config(args: argparse.Namespace):
    from pipeline.config import find_params, load_config

    path = Path(args.params) if args.params else find_params()
    if path is None:
        log.info("no params.yaml here: using the built-in defaults")
    return load_config(path, args.overrides)


def _require(path: str, option: str) -> Path:
    """``path`` if it exists; else a FileNotFoundError naming the option (exit 3, before any work)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: not found ({option})")
    return p


# ----------------------------------------------------------------------------------------------- commands


def cmd_synth_data(args: argparse.Namespace) -> int:
    from pipeline.stages import data

    cfg = _config(args)
    out = Path(args.output or cfg.paths.raw)
    data.synthesise(cfg, out, progress=not args.quiet)
    args.summary = f"{cfg.data.synthetic.n_cases} synthetic scans in {out}"
    return EXIT_OK


def cmd_check_data(args: argparse.Namespace) -> int:
    from pipeline.stages import data

    cfg = _config(args)
    if args.dataset:
        _require(args.dataset, "--dataset")
        source = "csv" if args.dataset.endswith(".csv") else "msd"
        cfg = cfg.model_copy(update={"data": replace_data(cfg.data, source=source, dataset=args.dataset)})
    ds, has_lesion = data.check(cfg, progress=not args.quiet)
    print(f"OK: {ds.manifest}: {len(ds.training)} training case(s) ({sum(has_lesion.values())} with lesions), "
          f"{len(ds.test)} test case(s), labels {ds.labels}, channels {list(ds.channel_names)}")
    args.summary = f"{len(ds.training) + len(ds.test)} case(s) valid"
    return EXIT_OK


def replace_data(data_cfg, **changes):
    """A re-validated copy of the data section with ``changes``."""
    from pipeline.config import DataConfig

    return DataConfig.model_validate({**data_cfg.model_dump(), **changes})


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from pipeline.stages import data

    cfg = _config(args)
    data.run(cfg, progress=not args.quiet)
    args.summary = f"data set and splits in {cfg.paths.raw}, {cfg.paths.splits}"
    return EXIT_OK


def cmd_preprocess(args: argparse.Namespace) -> int:
    from pipeline.stages import preprocess
    from pipeline.stages.shard import shard_from_options

    try:
        shard = shard_from_options(args.shard, args.part_id, args.num_parts, parts_alone=args.merge)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if sum([args.plan_only, args.merge, shard is not None]) > 1:
        raise UsageError("preprocess: use one of --plan-only, --shard K/N (or --part-id/--num-parts), --merge")
    cfg = _config(args)
    out = Path(args.output or cfg.paths.preprocessed)
    if args.plan_only:
        summary = preprocess.run_plan(cfg, out, workers=args.workers, progress=not args.quiet)
        args.summary = f"fingerprint.json and plan.json for {summary['n_cases']} case(s) in {out}"
    elif shard is not None:
        summary = preprocess.run_shard(cfg, shard, out, workers=args.workers, progress=not args.quiet)
        args.summary = f"shard {shard}: {summary['n_cases']} case(s) preprocessed into {out}"
    elif args.merge:
        summary = preprocess.run_merge(cfg, out, workers=args.workers, num_parts=args.num_parts)
        args.summary = f"all {summary['n_cases']} case(s) present in {out}"
    else:
        summary = preprocess.run(cfg, out, workers=args.workers, progress=not args.quiet)
        args.summary = f"{summary['n_cases']} case(s) preprocessed into {out}"
    return EXIT_OK




def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.progress import epoch_eta
    from pipeline.stages import train

    cfg = _config(args)
    with epoch_eta(cfg.train.epochs):
        summary = train.run(cfg, resume=args.resume, progress=not args.quiet)
    if summary:  # empty on DDP ranks other than 0
        cpm = summary.get("best_val_cpm")
        args.summary = (f"best epoch {summary.get('best_epoch')}"
                        + (f", validation CPM {cpm:.4f}" if isinstance(cpm, float) else "")
                        + f", checkpoints in {cfg.paths.models}")
    return EXIT_OK


def cmd_make_folds(args: argparse.Namespace) -> int:
    from pipeline.stages import train

    cfg = _config(args)
    folds = train.make_folds_file(cfg)
    print(f"{cfg.paths.folds}: {len(folds)} folds, validation scans per fold "
          f"{[len(f['val']) for f in folds]} (commit this file: folds are never remade)")
    return EXIT_OK


def cmd_train_folds(args: argparse.Namespace) -> int:
    from pipeline.stages import train

    cfg = _config(args)
    best = train.run_folds(cfg, args.folds, resume=args.resume, progress=not args.quiet)
    listed = ",".join(str(p) for p in best)
    print(f"trained {len(best)} fold(s). Evaluate their ensemble on the test scans with:\n"
          f"  python -m pipeline evaluate --set 'inference.checkpoints=[{listed}]'")
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.stages import predict
    from pipeline.stages.shard import shard_from_options

    try:
        shard = shard_from_options(args.shard, args.part_id, args.num_parts)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    models = [_require(m, "--model") for m in args.model]  # several: an ensemble (mean probabilities)
    source = _require(args.input, "--input")  # before any work
    cfg = _config(args)
    written = predict.run(cfg, models, source, Path(args.output), progress=not args.quiet,
                            output_format=args.format, shard=shard)
    args.summary = ((f"shard {shard}: " if shard else "") + f"{len(written)} scan(s) predicted into {args.output}"
                    + (f" by an ensemble of {len(models)} models" if len(models) > 1 else ""))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.stages import evaluate

    cfg = _config(args)
    if args.predictions:
        if not args.labels or not args.output:
            raise UsageError("evaluate --predictions needs --labels and --output")
        _require(args.predictions, "--predictions"), _require(args.labels, "--labels")
        metrics = evaluate.run_folders(cfg, Path(args.predictions), Path(args.labels), Path(args.output),
                                       lesion_label=args.lesion_label)
    else:
        metrics = evaluate.run(cfg, progress=not args.quiet)
    cpm = metrics["cpm"]
    print(f"CPM {cpm:.4f}  lesions {metrics['lesions_total']}  scans {metrics['scans_total']}" if cpm is not None
          else f"CPM undefined (no lesions)  lesions 0  scans {metrics['scans_total']}")
    args.summary = f"{metrics['scans_total']} scan(s), {metrics['lesions_total']} lesion(s)"
    return EXIT_OK


def cmd_make_dataset(args: argparse.Namespace) -> int:
    from pipeline.stages import data

    path = data.make_manifest(images=args.images, labels=args.labels, output=Path(args.output),
                        channel_names=args.channel_names, label_names=args.label_names,
                        case_id_regex=args.case_id_regex, root=args.root)
    print(f"wrote {path}")
    args.summary = f"wrote {path}"
    return EXIT_OK


class UsageError(Exception):
    """Arguments that argparse cannot check alone (exit 2)."""


# ----------------------------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default=None,
                   help="config file (default: params.yaml, else configs/params.yaml, else built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.loss.gamma=1 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")


def _shard_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--shard", metavar="K/N", default=None,
                   help=f"only part K of N (K = 0..N-1) of the {what}, sorted by name: sorted[K::N]; "
                        "N shards may run at once on several machines (docs/scaling.md)")
    p.add_argument("--part-id", type=int, default=None, metavar="K", help="--shard K/N as nnU-Net spells it")
    p.add_argument("--num-parts", type=int, default=None, metavar="N", help="--shard K/N as nnU-Net spells it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit codes: 0 ok, 1 error, 2 bad usage/config, 3 invalid or missing "
                                            "input data.")
    parser.add_argument("--version", action="version", version=f"rare-lesion-pipeline {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        p.set_defaults(func=func)
        return p

    p = add("synth-data", cmd_synth_data, "write the deterministic synthetic CT-like data set (MSD layout)")
    p.add_argument("--output", help="folder (default: paths.raw)")
    p = add("check-data", cmd_check_data, "validate a data set; every problem is listed with case and file")
    p.add_argument("--dataset", help="dataset.json / MSD folder / CSV manifest (default: from config)")
    add("prepare-data", cmd_prepare_data, "data stage: synthesise or locate the data set, validate, split")
    p = add("preprocess", cmd_preprocess, "fingerprint, plan, and preprocess every case (parallel)")
    p.add_argument("--output", help="folder (default: paths.preprocessed)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: preprocess.workers)")
    p.add_argument("--plan-only", action="store_true",
                   help="only write fingerprint.json and plan.json (step 1 of a sharded run, docs/scaling.md)")
    _shard_options(p, "cases")
    p.add_argument("--merge", action="store_true",
                   help="after the shards: check that every case is finished, naming missing ones (with their "
                        "shard when --num-parts N is given)")
    p = add("train", cmd_train, "train the 3D U-Net (torchrun for several GPUs)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    add("make-folds", cmd_make_folds, "write the cross-validation folds file (paths.folds) once, from the split")
    p = add("train-folds", cmd_train_folds, "train every cross-validation fold, each into <paths.models>/fold_<k>")
    p.add_argument("--folds", type=int, nargs="+", default=None, help="only these folds (default: all n_folds)")
    p.add_argument("--resume", action="store_true", help="continue each fold from its last checkpoint")
    p = add("predict", cmd_predict, "write lesion probability and label maps in each input's geometry")
    p.add_argument("--model", required=True, action="append",
                   help="checkpoint (.pt) written by train; repeat it to average several models' probabilities "
                        "(e.g. one per cross-validation fold)")
    p.add_argument("--input", required=True, help="an image file, a DICOM folder, or a folder of images")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--format", default="input", choices=["input", "nifti"],
                   help="output format: the input's (NIfTI for DICOM) or always NIfTI")
    _shard_options(p, "scans")
    p = add("evaluate", cmd_evaluate, "lesion-level FROC/CPM and voxel metrics (the stage, or any folders)")
    p.add_argument("--predictions", help="folder of probability / label maps (evaluate anything)")
    p.add_argument("--labels", help="folder of ground-truth label maps, matched by file name")
    p.add_argument("--output", help="output folder for metrics.json, froc.csv, lesions.csv, plots")
    p.add_argument("--lesion-label", type=int, default=None, help="label value that counts as lesion")
    p = add("make-dataset", cmd_make_dataset, "write a dataset.json pointing at existing scans (no copies)")
    p.add_argument("--images", action="append", required=True,
                   help="glob per channel, e.g. 'dir/*/FLAIR.nii.gz' (repeat for more channels)")
    p.add_argument("--labels", required=True, help="glob of label maps, e.g. 'dir/*/lesion.nii.gz'")
    p.add_argument("--output", required=True, help="dataset.json to write")
    p.add_argument("--channel-names", nargs="+", default=None, help="one name per --images, e.g. FLAIR T1")
    p.add_argument("--label-names", nargs="+", default=None, help="names of labels 0..K-1, e.g. background lesion")
    p.add_argument("--case-id-regex", default=None, help="regex with one group giving the case id from a path")
    p.add_argument("--root", default=None, help="data set root (default: common folder of all files)")
    return parser


def _version() -> str:
    from pipeline import __version__

    return __version__


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose:  # debug output of our own code only, not of matplotlib, mlflow, ...
        logging.getLogger("pipeline").setLevel(logging.DEBUG)


def _log_through_tqdm(quiet: bool) -> contextlib.AbstractContextManager:
    """Log records written with ``tqdm.write`` while bars run, so an INFO line never splits a bar."""
    if quiet:  # no bars
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    from pipeline.config import ConfigError
    from pipeline.contracts import ContractError
    from pipeline.data.splits import FoldsError
    from pipeline.io.dataset import DatasetError
    from pipeline.io.formats import VolumeReadError
    from pipeline.io.validate import DataValidationError

    t0 = time.perf_counter()
    args.summary = ""
    try:
        with _log_through_tqdm(args.quiet):
            code = args.func(args)
        if code == EXIT_OK:
            from pipeline.progress import format_duration

            log.info("%s finished in %s%s", args.command, format_duration(time.perf_counter() - t0),
                     f": {args.summary}" if args.summary else "")
        return code
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        print(f"usage error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (DatasetError, DataValidationError, VolumeReadError, FoldsError, ContractError, FileNotFoundError) as exc:
        print(f"data error:\n{exc}", file=sys.stderr)
        return EXIT_DATA
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the message is the user's; the traceback only with --verbose
        if args.verbose:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
