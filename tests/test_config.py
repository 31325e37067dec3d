"""pipeline/config.py: one schema for configs/params.yaml, validated at load, key paths in every error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parent.parent
PARAMS = REPO / "params.yaml"  # the real file; configs/params.yaml links to it


def _write(tmp_path: Path, tree) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_repository_params_file_is_valid_and_equals_the_schema_defaults():
    cfg = load_config(PARAMS)
    assert isinstance(cfg, Config)
    # params.yaml spells out every key; it must not drift from the defaults in the schema
    assert cfg == Config()
    assert set(yaml.safe_load(PARAMS.read_text())) == set(Config.model_fields)


def test_missing_file_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_no_path_gives_defaults():
    assert load_config(None) == Config()


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: not valid YAML"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"train": {"loss": {"gama": 1}}}, r"train\.loss\.gama: Extra inputs are not permitted"),
        ({"nosection": {"x": 1}}, r"nosection: Extra inputs are not permitted"),
        ({"train": {"epochs": "many"}}, r"train\.epochs: Input should be a valid integer"),
        ({"train": {"epochs": 1.5}}, r"train\.epochs: Input should be a valid integer"),
        ({"train": {"epochs": 0}}, r"train\.epochs: Input should be greater than or equal to 1"),
        (
            {"train": {"loss": {"gamma": -1}}},
            r"train\.loss\.gamma: Input should be greater than or equal to 0",
        ),
        ({"train": {"loss": {"mode": "tanh"}}}, r"train\.loss\.mode: Input should be 'softmax' or 'sigmoid'"),
        ({"train": {"loss": 3}}, r"train\.loss: Input should be a valid dictionary"),
        ({"data": {"synthetic": {"shape": [32, 32]}}}, r"data\.synthetic\.shape"),
        (
            {"data": {"val_fraction": 0.6, "test_fraction": 0.5}},
            r"data: .*val_fraction \+ test_fraction must be < 1",
        ),
        ({"data": {"source": "msd"}}, r"data: .*needs data\.dataset"),
        ({"train": {"loss": {"lambda_focal": 0, "lambda_dice": 0}}}, r"train\.loss: .*cannot both be 0"),
        ({"train": {"loss": {"alpha": 1.5}}}, r"train\.loss: .*alpha must be in \[0, 1\]"),
        ({"evaluation": {"fp_rates": [2.0, 1.0]}}, r"evaluation\.fp_rates: .*strictly increasing"),
        ({"tracking": {"experiment": 1}}, r"tracking\.experiment: Input should be a valid string"),
        # a YAML boolean is not a number (pydantic's lax mode would read `epochs: yes` as 1)
        ({"train": {"epochs": True}}, r"train\.epochs: .*boolean"),
        ({"train": {"loss": {"gamma": True}}}, r"train\.loss\.gamma: .*boolean"),
        ({"seed": False}, r"seed: .*boolean"),
    ],
)
def test_invalid_values_fail_with_the_file_and_key_path(tmp_path, tree, message):
    path = _write(tmp_path, tree)
    with pytest.raises(ConfigError, match=rf"^{path}: .*") as info:
        load_config(path)
    assert any(__import__("re").search(message, line) for line in str(info.value).splitlines()), str(
        info.value
    )


def test_every_problem_is_listed_at_once(tmp_path):
    path = _write(tmp_path, {"train": {"epochs": 0, "loss": {"gamma": -1}}, "inference": {"overlap": 1.5}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert {line.split(": ")[1] for line in lines} == {
        "train.epochs",
        "train.loss.gamma",
        "inference.overlap",
    }


def test_booleans_still_accepted_where_the_schema_wants_booleans(tmp_path):
    path = _write(
        tmp_path, {"train": {"compile": True, "deterministic": False}, "tracking": {"enabled": False}}
    )
    cfg = load_config(path)
    assert cfg.train.compile is True and cfg.train.deterministic is False and cfg.tracking.enabled is False


def test_unquoted_off_is_the_amp_setting_not_a_boolean(tmp_path):
    # YAML 1.1 (PyYAML) reads `off` as False; `train.amp: off` must still mean "no mixed precision"
    assert load_config(_write_text(tmp_path, "train: {amp: off}\n")).train.amp == "off"
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError, match=r"train\.amp: Input should be"):
        load_config(None, ["train.amp=on"])


def _write_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_integers_are_accepted_for_floats():
    cfg = load_config(None, ["train.loss.gamma=1", "train.loss.alpha=1"])
    assert cfg.train.loss.gamma == 1.0 and isinstance(cfg.train.loss.gamma, float)
    assert cfg.train.loss.alpha == 1.0


def test_cli_style_overrides_are_parsed_as_yaml_and_validated():
    cfg = load_config(
        PARAMS,
        [
            "train.loss.gamma=1",
            "data.synthetic.shape=[32,32,12]",
            "train.amp=off",
            "train.patch_size=[16, 16, 8]",
            "data.labels={0: background, 1: lesion}",
        ],
    )
    assert cfg.train.loss.gamma == 1.0
    assert cfg.data.synthetic.shape == (32, 32, 12)
    assert cfg.train.amp == "off"
    assert cfg.train.patch_size == (16, 16, 8)
    assert cfg.data.labels == {0: "background", 1: "lesion"}
    # everything else keeps the file's values
    assert cfg.train.epochs == Config().train.epochs and cfg.train.loss.mode == "softmax"


def test_override_can_set_null_and_later_overrides_win():
    cfg = load_config(PARAMS, ["train.optim.grad_clip=null", "train.epochs=3", "train.epochs=4"])
    assert cfg.train.optim.grad_clip is None
    assert cfg.train.epochs == 4


def test_override_creates_missing_sections_in_a_partial_file(tmp_path):
    path = _write(tmp_path, {"seed": 3})
    cfg = load_config(path, ["train.loss.gamma=0.5"])
    assert cfg.seed == 3 and cfg.train.loss.gamma == 0.5


def test_invalid_override_value_names_the_key_path():
    with pytest.raises(ConfigError, match=r"train\.loss\.gamma: Input should be greater than or equal to 0"):
        load_config(PARAMS, ["train.loss.gamma=-1"])
    with pytest.raises(ConfigError, match=r"train\.loss\.gama: Extra inputs are not permitted"):
        load_config(PARAMS, ["train.loss.gama=1"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gamma", "expected KEY.PATH=VALUE"),
        ("=1", "empty key"),
        ("train.loss.gamma.x=1", "'gamma' is not a section"),
        ("train.epochs=[1", "not valid YAML"),
    ],
)
def test_malformed_overrides(text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PARAMS, [text])


def test_parse_override_and_apply_do_not_mutate_input():
    assert parse_override("a.b.c=1") == (["a", "b", "c"], 1)
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override("a=") == (["a"], None)
    tree = {"a": {"b": 1}}
    assert apply_overrides(tree, ["a.b=2", "a.c=3"]) == {"a": {"b": 2, "c": 3}}
    assert tree == {"a": {"b": 1}}


def test_dvc_style_override_edits_the_params_file(tmp_path):
    """``dvc exp run -S train.loss.gamma=1`` rewrites params.yaml in place; the edited file must load."""
    tree = yaml.safe_load(PARAMS.read_text())
    tree["train"]["loss"]["gamma"] = 1
    path = _write(tmp_path, tree)
    assert load_config(path).train.loss.gamma == 1.0


def test_config_is_frozen_and_round_trips_through_yaml(tmp_path):
    cfg = load_config(PARAMS, ["train.loss.gamma=0.5", "data.label_remap={3: 2}"])
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        cfg.train.loss.gamma = 3.0  # type: ignore[misc]
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_flat_view_uses_dotted_keys():
    flat = Config().flat()
    assert flat["train.loss.gamma"] == 2.0
    assert flat["data.synthetic.shape"] == [128, 128, 40]
    assert "train.loss" not in flat


def test_params_file_is_real_at_the_root_and_linked_from_configs():
    # DVC reads a committed symlink at a git revision as its link text: the root file must be real
    assert PARAMS.is_file() and not PARAMS.is_symlink()
    assert (REPO / "configs" / "params.yaml").resolve() == PARAMS.resolve()


def test_find_params_prefers_root_then_configs_then_defaults(tmp_path):
    from pipeline.config import find_params

    assert find_params(tmp_path) is None
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "params.yaml").write_text("seed: 1\n")
    assert find_params(tmp_path) == tmp_path / "configs" / "params.yaml"
    (tmp_path / "params.yaml").write_text("seed: 2\n")
    assert find_params(tmp_path) == tmp_path / "params.yaml"


@pytest.mark.parametrize("overrides, expected", [
    (["train.loss.gama=1"],
     "--set train.loss.gama=1: train.loss.gama: Extra inputs are not permitted (did you mean 'train.loss.gamma'?)"),
    (["trian.epochs=3"], "--set trian.epochs=3: trian: Extra inputs are not permitted (did you mean 'train'?)"),
    (["train.epochs=5", "train.epochs=0"], "--set train.epochs=0: train.epochs: Input should be greater than"),
    (["train.loss={gamma: -1}"], "--set train.loss={gamma: -1}: train.loss.gamma: Input should be greater"),
    (["train.xyzzy=1"], "--set train.xyzzy=1: train.xyzzy: Extra inputs are not permitted\n"),
])
def test_override_errors_name_the_override_and_suggest_a_close_key(tmp_path, overrides, expected):
    path = _write(tmp_path, {"seed": 0})
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert (str(err.value) + "\n").startswith(expected), str(err.value)
    assert str(path) not in str(err.value)


def test_file_errors_name_the_file_even_with_overrides(tmp_path):
    path = _write(tmp_path, {"train": {"epoch": 3, "loss": {"gamma": -1}}})
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.loss.alpha=0.25"])
    lines = str(err.value).splitlines()
    assert f"{path}: train.epoch: Extra inputs are not permitted (did you mean 'train.epochs'?)" in lines
    assert f"{path}: train.loss.gamma: Input should be greater than or equal to 0" in lines
