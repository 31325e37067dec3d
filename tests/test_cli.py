"""pipeline/cli.py, run as users run it: ``python -m pipeline <command>`` in a subprocess.

Exit codes: 0 ok, 1 error, 2 bad usage / invalid config, 3 invalid data. Every command runs in an empty
temporary working directory, so nothing is written into the repository.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parent.parent
BAD_INPUTS = [
    "truncated_nii_gz",
    "not_an_image",
    "image_2d",
    "label_grid_mismatch",
    "undeclared_label",
    "nan_voxel",
    "missing_file",
    "empty_training",
    "invalid_json",
    "path_escape",
]
SMALL = ["--set", "data.synthetic.n_cases=3", "--set", "data.synthetic.shape=[32,32,12]"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _commands() -> list[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(sub.choices)


def test_every_issue_command_exists():
    assert {"synth-data", "check-data", "prepare-data", "preprocess", "train", "predict", "evaluate"} <= set(
        _commands()
    )


def test_top_level_help(workdir):
    result = run_cli("--help", cwd=workdir)
    assert result.returncode == 0
    for command in _commands():
        assert command in result.stdout
    assert "Exit codes" in result.stdout


@pytest.mark.parametrize("command", _commands())
def test_help_for_every_command(workdir, command):
    result = run_cli(command, "--help", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert f"usage: python -m pipeline {command}" in result.stdout
    assert "--set KEY=VALUE" in result.stdout and "--params" in result.stdout
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("args", [[], ["no-such-command"], ["check-data", "--no-such-option"]])
def test_bad_usage_exits_2(workdir, args):
    assert run_cli(*args, cwd=workdir).returncode == 2


# ----------------------------------------------------------------------------------------------- check-data


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_check_data_on_a_bad_input_exits_3_naming_the_file_and_writes_nothing(bad_msd_dataset, workdir, kind):
    bad = bad_msd_dataset(kind)
    before = _snapshot(bad.root.parent)
    result = run_cli("check-data", "--dataset", str(bad.root), "-q", cwd=workdir)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("data error:\n")
    lines = [line for line in result.stderr.splitlines() if str(bad.file) in line]
    assert lines, result.stderr
    assert any(re.search(bad.problem, line) for line in lines), result.stderr
    if bad.case_id:
        assert any(f"case {bad.case_id}" in line for line in lines)
    assert list(workdir.iterdir()) == []
    assert _snapshot(bad.root.parent) == before


def test_check_data_on_a_valid_dataset(tiny_msd_dataset, workdir):
    root = tiny_msd_dataset(n_cases=3)
    result = run_cli("check-data", "--dataset", str(root), "-q", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"OK: {root / 'dataset.json'}: 3 training case(s) (2 with lesions)")
    assert list(workdir.iterdir()) == []


def test_check_data_dataset_from_set_overrides(tiny_msd_dataset, workdir):
    root = tiny_msd_dataset(n_cases=2)
    result = run_cli(
        "check-data", "--set", "data.source=msd", "--set", f"data.dataset={root}", "-q", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    assert "2 training case(s)" in result.stdout


def test_check_data_on_a_csv_manifest(tiny_msd_dataset, workdir):
    root = tiny_msd_dataset(n_cases=2)
    manifest = root / "cases.csv"
    manifest.write_text(
        "case_id,image,label\n"
        "a,imagesTr/case_000.nii.gz,labelsTr/case_000.nii.gz\n"
        "b,imagesTr/case_001.nii.gz,labelsTr/case_001.nii.gz\n"
    )
    # a CSV declares no labels: without data.labels it is a data error naming the manifest
    result = run_cli("check-data", "--dataset", str(manifest), "-q", cwd=workdir)
    assert result.returncode == 3 and f"{manifest}: a CSV data set needs declared labels" in result.stderr
    result = run_cli(
        "check-data",
        "--dataset",
        str(manifest),
        "--set",
        "data.labels={0: bg, 1: organ, 2: lesion}",
        "-q",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    assert "2 training case(s) (1 with lesions)" in result.stdout


def test_check_data_lists_every_problem(bad_msd_dataset, workdir, make_case_arrays, oblique_affine):
    from pipeline.io.formats import write_volume
    from pipeline.io.volume import Volume

    bad = bad_msd_dataset("nan_voxel")  # case_001's image
    _, label = make_case_arrays((16, 16, 16), lesion=True, seed=0)
    label[0, 0, 0] = 9
    write_volume(bad.root / "labelsTr" / "case_000.nii.gz", Volume(label[None], oblique_affine))
    result = run_cli("check-data", "--dataset", str(bad.root), "-q", cwd=workdir)
    assert result.returncode == 3
    assert "2 problem(s) in the data set" in result.stderr
    assert f"case case_000: {bad.root / 'labelsTr' / 'case_000.nii.gz'}: label value(s) [9]" in result.stderr
    assert f"case case_001: {bad.file}: 1 NaN/Inf voxel(s)" in result.stderr


# ----------------------------------------------------------------------------------------------- config errors


def test_invalid_override_exits_2_naming_the_key_path(tiny_msd_dataset, workdir):
    root = tiny_msd_dataset(n_cases=2)
    result = run_cli("check-data", "--dataset", str(root), "--set", "train.loss.gamma=-1", "-q", cwd=workdir)
    assert result.returncode == 2
    assert "train.loss.gamma: Input should be greater than or equal to 0" in result.stderr
    result = run_cli("synth-data", "--set", "data.synthetic.n_casez=3", "-q", cwd=workdir)
    assert (
        result.returncode == 2 and "data.synthetic.n_casez: Extra inputs are not permitted" in result.stderr
    )
    assert list(workdir.iterdir()) == []


def test_invalid_params_file_exits_2_naming_file_and_key_path(workdir):
    params = workdir.parent / "params.yaml"
    params.write_text("train:\n  epochs: many\n  loss: {gamma: 2.0, focal: 1}\n")
    result = run_cli("synth-data", "--params", str(params), "-q", cwd=workdir)
    assert result.returncode == 2
    assert f"{params}: train.epochs: Input should be a valid integer" in result.stderr
    assert f"{params}: train.loss.focal: Extra inputs are not permitted" in result.stderr
    missing = run_cli("synth-data", "--params", str(workdir.parent / "nope.yaml"), "-q", cwd=workdir)
    assert missing.returncode == 2 and "nope.yaml: config file not found" in missing.stderr
    assert list(workdir.iterdir()) == []


def test_repository_params_file_loads_from_the_cli(workdir):
    # the default --params is configs/params.yaml relative to the working directory: use the repository's
    result = run_cli(
        "check-data",
        "--params",
        str(REPO_ROOT / "configs" / "params.yaml"),
        "--set",
        f"paths.raw={workdir.parent / 'absent'}",
        "-q",
        cwd=workdir,
    )
    assert result.returncode == 3 and "dataset.json not found" in result.stderr  # config fine, no data yet


# ----------------------------------------------------------------------------------------------- data stages


def test_synth_data_twice_gives_byte_identical_files(workdir):
    outputs = []
    for name in ("a", "b"):
        out = workdir.parent / name
        result = run_cli("synth-data", *SMALL, "--output", str(out), "-q", cwd=workdir)
        assert result.returncode == 0, result.stderr
        outputs.append(
            {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        )
    assert len(outputs[0]) == 7  # dataset.json + 3 images + 3 labels: the --set overrides took effect
    assert outputs[0] == outputs[1]
    meta = json.loads(outputs[0]["dataset.json"])
    assert meta["synthetic_config"]["shape"] == [32, 32, 12] and meta["numTraining"] == 3
    assert list(workdir.iterdir()) == []


def test_prepare_data_writes_the_dataset_and_splits(workdir):
    result = run_cli("prepare-data", *SMALL, "-q", cwd=workdir)
    assert result.returncode == 0, result.stderr
    splits = json.loads((workdir / "data" / "splits.json").read_text())  # paths.splits, relative to the cwd
    ids = [f"synth_{i:03d}" for i in range(3)]
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == ids
    assert all(splits[k] for k in ("train", "val", "test"))
    assert set(splits["test"]).isdisjoint(splits["train"] + splits["val"])
    assert sorted(p.name for p in (workdir / "data" / "raw" / "imagesTr").iterdir()) == [
        f"{i}.nii.gz" for i in ids
    ]
    # the raw data set it wrote passes check-data
    check = run_cli("check-data", "-q", cwd=workdir)
    assert check.returncode == 0, check.stderr


# ----------------------------------------------------------------------------------------------- issue 15


def test_version(workdir):
    from pipeline import __version__

    result = run_cli("--version", cwd=workdir)
    assert result.returncode == 0 and result.stdout.strip() == f"rare-lesion-pipeline {__version__}"


@pytest.mark.parametrize("args, missing", [
    (["predict", "--model", "nope.pt", "--input", "scan.nii.gz", "--output", "out"], "nope.pt: not found (--model)"),
    (["evaluate", "--predictions", "preds", "--labels", "labels", "--output", "out"],
     "preds: not found (--predictions)"),
    (["check-data", "--dataset", "absent/dataset.json"], "absent/dataset.json: not found (--dataset)"),
])
def test_missing_input_exits_3_naming_it(workdir, args, missing):
    result = run_cli(*args, "-q", cwd=workdir)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("data error:\n") and missing in result.stderr
    assert list(workdir.iterdir()) == []


def test_predict_missing_input_with_a_model_exits_3(workdir):
    model = workdir.parent / "model.pt"
    model.write_bytes(b"")  # never read: the input is checked first
    result = run_cli("predict", "--model", str(model), "--input", "absent.nii.gz", "--output", "o", "-q", cwd=workdir)
    assert result.returncode == 3 and "absent.nii.gz: not found (--input)" in result.stderr


def test_evaluate_folders_without_labels_is_a_usage_error(workdir):
    result = run_cli("evaluate", "--predictions", ".", "-q", cwd=workdir)
    assert result.returncode == 2 and "needs --labels and --output" in result.stderr


def test_mistyped_set_key_names_the_override_and_suggests_the_key(workdir):
    (workdir.parent / "params.yaml").write_text("seed: 0\n")
    result = run_cli("synth-data", "--params", str(workdir.parent / "params.yaml"), "--set", "train.loss.gama=1",
                     "-q", cwd=workdir)
    assert result.returncode == 2
    assert ("--set train.loss.gama=1: train.loss.gama: Extra inputs are not permitted "
            "(did you mean 'train.loss.gamma'?)") in result.stderr
    assert "params.yaml:" not in result.stderr  # the file is fine: it is not blamed


def test_mistyped_file_key_names_the_file_and_suggests_the_key(workdir):
    (workdir / "params.yaml").write_text("trian:\n  epochs: 3\n")
    result = run_cli("synth-data", "-q", cwd=workdir)
    assert result.returncode == 2
    assert "params.yaml: trian: Extra inputs are not permitted (did you mean 'train'?)" in result.stderr


@pytest.mark.parametrize("location", ["params.yaml", "configs/params.yaml"])
def test_default_params_file_is_params_yaml_then_configs(workdir, location):
    path = workdir / location
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("data:\n  synthetic: {n_cases: 3, shape: [32, 32, 12]}\n")
    result = run_cli("synth-data", "--output", str(workdir.parent / "syn"), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert len(list((workdir.parent / "syn" / "imagesTr").iterdir())) == 3  # the file's n_cases, not 30
    # the end-of-run summary line
    assert re.search(r"synth-data finished in \d+s: 3 synthetic scans in ", result.stderr), result.stderr


def test_quiet_has_no_summary_line(workdir):
    result = run_cli("synth-data", *SMALL, "--output", str(workdir.parent / "syn"), "-q", cwd=workdir)
    assert result.returncode == 0 and result.stderr == ""


def test_logging_goes_through_tqdm_while_a_command_runs(monkeypatch):
    import logging

    from tqdm.contrib.logging import _TqdmLoggingHandler

    import pipeline.cli as cli

    seen = {}

    def fake(args):
        seen["handlers"] = [type(h) for h in logging.getLogger().handlers]
        return cli.EXIT_OK

    monkeypatch.setattr(cli, "cmd_synth_data", fake)
    assert cli.main(["synth-data"]) == 0
    assert _TqdmLoggingHandler in seen["handlers"]
    assert _TqdmLoggingHandler not in [type(h) for h in logging.getLogger().handlers]  # restored afterwards


@pytest.mark.parametrize("names, n_channels, expected", [
    # nnU-Net imagesTs: the _0000 channel suffix is stripped, so outputs pair with labelsTs/<case>.nii.gz
    (["a_0000.nii.gz", "b_0000.nii.gz"], 1, ["a", "b"]),
    (["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"], 2, ["a", "b"]),
    # plain case ids with four digits are names, not channels
    (["patient_0001.nii.gz", "patient_0002.nii.gz"], 1, ["patient_0001", "patient_0002"]),
    (["a.nii.gz", "b_0000.nii.gz"], 1, ["a", "b_0000"]),
])
def test_predict_case_names_strip_nnunet_channel_suffixes(tmp_path, names, n_channels, expected):
    from pipeline.io.scan_files import collect_inputs

    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [name for name, _ in collect_inputs(tmp_path, n_channels)] == expected
    single = collect_inputs(tmp_path / names[0], n_channels)
    assert single[0][0] == (names[0][:-12] if names[0].endswith("_0000.nii.gz") else names[0][:-7])


def test_folds_file_for_another_case_set_is_a_data_error_exit_3(workdir):
    # folds are made once; a split whose cases differ from the committed folds file must stop, not re-fold
    (workdir / "data").mkdir()
    (workdir / "data" / "splits.json").write_text(json.dumps(
        {"train": [f"c{i}" for i in range(8)], "val": ["c8", "c9"], "test": ["t0"],
         "cases_with_lesions": ["c0", "c2", "c4", "c6", "c8", "t0"]}))
    folds = workdir / "folds.json"
    folds.write_text(json.dumps([{"train": ["x1", "x2"], "val": ["x3"]}] * 5))
    result = run_cli("make-folds", "-q", "--set", f"paths.folds={folds}", cwd=workdir)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("data error:\n") and str(folds) in result.stderr


# ----------------------------------------------------------------------------------------------- issue 16


@pytest.mark.parametrize("command", ["preprocess", "predict"])
@pytest.mark.parametrize("args, message", [
    (["--shard", "3/3"], "shard 3/3: K must be in 0..2"),
    (["--shard=-1/2"], "shard -1/2: K must be in 0..1"),
    (["--shard", "x"], "shard 'x': expected K/N"),
    (["--part-id", "1"], "--part-id K and --num-parts N go together"),
    (["--part-id", "-1", "--num-parts", "2"], "shard -1/2: K must be in 0..1"),
    (["--shard", "0/2", "--num-parts", "2"], "not both"),
])
def test_bad_shard_is_a_usage_error_exit_2(workdir, command, args, message):
    required = ["--model", "m.pt", "--input", "in", "--output", "out"] if command == "predict" else []
    result = run_cli(command, *required, *args, "-q", cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage error: ") and message in result.stderr
    assert list(workdir.iterdir()) == []  # refused before any work


def test_shard_value_starting_with_a_dash_is_exit_2(workdir):
    # argparse reads "-1/2" after a space as an option: still a usage error (write --shard=-1/2 for the message)
    result = run_cli("preprocess", "--shard", "-1/2", "-q", cwd=workdir)
    assert result.returncode == 2 and "--shard" in result.stderr


def test_preprocess_modes_are_exclusive(workdir):
    result = run_cli("preprocess", "--plan-only", "--shard", "0/2", "-q", cwd=workdir)
    assert result.returncode == 2 and "use one of --plan-only, --shard" in result.stderr
    result = run_cli("preprocess", "--merge", "--part-id", "0", "--num-parts", "2", "-q", cwd=workdir)
    assert result.returncode == 2 and "use one of" in result.stderr


def _scaling_doc_commands() -> list[tuple[str, int]]:
    """Every ``python -m pipeline preprocess|predict ...`` in the code blocks of docs/scaling.md's sharding
    section (shell line continuations joined, YAML/--wrap quoting removed, ``${VAR}`` filled in with task
    index 5), each with the block's N (its ``N=`` line, else 16)."""
    text = (REPO_ROOT / "docs" / "scaling.md").read_text().split("## Sharded preprocessing and prediction")[1]
    text = text.split("\n## ")[0].replace("\\\n", " ").replace('\\"', '"')
    commands = []
    for block in re.findall(r"```\w*\n(.*?)```", text, flags=re.S):
        n = re.search(r"\bN=(?:\$\{N:-)?(\d+)", block)
        n = int(n.group(1)) if n else 16
        env = {"N": str(n), "SLURM_ARRAY_TASK_ID": "5", "JOB_COMPLETION_INDEX": "5", "SLURM_CPUS_PER_TASK": "8"}
        for rest in re.findall(r"python -m pipeline ((?:preprocess|predict)\b.*)", block):
            if rest.count('"') % 2:  # the command ends inside a YAML or --wrap string: cut at its closing quote
                rest = rest[: rest.rindex('"')]
            for name, value in env.items():
                rest = rest.replace("${" + name + "}", value)
            commands.append((rest, n))
    return commands


def test_scaling_doc_shard_recipes_parse_and_reach_the_right_stage(tmp_path, monkeypatch):
    """The Slurm and Kubernetes recipes' command lines are valid: each reaches the stage function it means,
    with the shard of task index 5 of the block's N."""
    import shlex

    import pipeline.cli as cli
    from pipeline.stages import predict, preprocess
    from pipeline.stages.shard import Shard

    calls = []
    monkeypatch.setattr(preprocess, "run_plan", lambda cfg, out, **kw: calls.append(("plan", None)) or {"n_cases": 1})
    monkeypatch.setattr(preprocess, "run_shard",
                        lambda cfg, shard, out, **kw: calls.append(("shard", shard)) or {"n_cases": 1})
    monkeypatch.setattr(preprocess, "run_merge",
                        lambda cfg, out, **kw: calls.append(("merge", kw["num_parts"])) or {"n_cases": 1})
    monkeypatch.setattr(predict, "run", lambda *a, shard=None, **kw: calls.append(("predict", shard)) or [])
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "best.pt").write_bytes(b"")
    (tmp_path / "scans").mkdir()
    monkeypatch.chdir(tmp_path)
    commands = _scaling_doc_commands()
    assert len(commands) >= 6, commands  # Slurm: shard, plan, merge, predict; Kubernetes: shard, predict
    for command, n in commands:
        calls.clear()
        assert cli.main(shlex.split(command)) == 0, command
        kind, value = calls[0]
        assert value == {"plan": None, "merge": n}.get(kind, Shard(5, n)), command
