import json
import os
from dataclasses import fields

import pytest

from hf_dendrites import DendriteConfig
from hf_dendrites.constants import ADAPTER_ONLY_FORMAT_VERSION, CHECKPOINT_FORMAT_VERSION, DENDRITE_CONFIG_NAME


def test_defaults_and_help_texts():
    cfg = DendriteConfig()
    assert cfg.target_modules is None and cfg.dendrites_per_cycle == 1 and cfg.learning_rule == "gd"
    for f in fields(DendriteConfig):
        assert f.metadata.get("help"), f"field {f.name} has no help text"


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"dendrites_per_cycle": 0}, ValueError, "dendrites_per_cycle.*dendrite_restarts_only=True"),
        ({"dendrites_per_cycle": 1.5}, ValueError, "dendrites_per_cycle"),
        ({"activation": "softplus"}, ValueError, "activation"),
        ({"init_scale": 0}, ValueError, "init_scale"),
        ({"init_scale": -1.0}, ValueError, "init_scale"),
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": "4"}, ValueError, "rank"),
        ({"learning_rule": "hebbian"}, ValueError, "learning_rule"),
        ({"target_modules": []}, ValueError, "target_modules"),
        ({"target_modules": 3}, TypeError, "target_modules"),
        ({"exclude_modules": "all-linear"}, ValueError, "exclude_modules"),
        ({"dendrite_seed": "x"}, ValueError, "dendrite_seed"),
    ],
)
def test_invalid_values_are_rejected_with_the_field_name(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        DendriteConfig(**kwargs)


def test_correlation_rule_settings_are_checked():
    cfg = DendriteConfig(learning_rule="correlation", candidate_pool_size=3, correlation_normalize=True)
    assert DendriteConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="full-shape dendrites: set rank=None"):
        DendriteConfig(learning_rule="correlation", rank=4)
    with pytest.raises(ValueError, match="raise candidate_pool_size"):
        DendriteConfig(learning_rule="correlation", dendrites_per_cycle=3, candidate_pool_size=2)
    with pytest.raises(ValueError, match="candidate_pool_size"):
        DendriteConfig(candidate_pool_size=0)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "gelu", "silu"])
def test_supported_activations(activation):
    assert DendriteConfig(activation=activation).activation == activation


def test_tuple_targets_become_lists_and_dict_round_trip():
    cfg = DendriteConfig(target_modules=("query", "value"), exclude_modules=r".*\.0\..*", rank=4, cascade=True, dendrite_seed=3)
    assert cfg.target_modules == ["query", "value"]
    data = json.loads(cfg.to_json_string())
    assert DendriteConfig.from_dict(data) == cfg


def test_unknown_fields_are_an_error():
    data = DendriteConfig().to_dict()
    data["future_option"] = 1
    with pytest.raises(ValueError, match="future_option.*newer hf_dendrites"):
        DendriteConfig.from_dict(data)


def test_save_and_load_config_alone(tmp_path):
    cfg = DendriteConfig(target_modules="all-linear", activation="gelu", dendrites_per_cycle=2)
    path = cfg.save_pretrained(tmp_path)
    assert os.path.basename(path) == DENDRITE_CONFIG_NAME
    assert DendriteConfig.from_pretrained(tmp_path) == cfg
    assert DendriteConfig.from_pretrained(path) == cfg
    assert [p.name for p in tmp_path.iterdir()] == [DENDRITE_CONFIG_NAME]  # no temporary file left behind


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=DENDRITE_CONFIG_NAME):
        DendriteConfig.from_pretrained(tmp_path)
    path = tmp_path / DENDRITE_CONFIG_NAME
    path.write_text('{"format_version": 1, "dendrite_con')
    with pytest.raises(ValueError, match="not valid JSON"):
        DendriteConfig.from_pretrained(tmp_path)
    path.write_text(json.dumps({"format_version": max(CHECKPOINT_FORMAT_VERSION, ADAPTER_ONLY_FORMAT_VERSION) + 1, "dendrite_config": {}}))
    with pytest.raises(ValueError, match="upgrade"):
        DendriteConfig.from_pretrained(tmp_path)
    path.write_text(json.dumps({"format_version": 1, "dendrite_config": {"activation": "nope"}}))
    with pytest.raises(ValueError, match=str(path).replace("\\", "\\\\") + ".*activation"):
        DendriteConfig.from_pretrained(tmp_path)


def test_config_parses_with_training_arguments_through_hf_argument_parser(tmp_path):
    from transformers import HfArgumentParser

    from hf_dendrites import DendriticTrainingArguments

    parser = HfArgumentParser((DendriteConfig, DendriticTrainingArguments))
    base = ["--output_dir", str(tmp_path), "--eval_strategy", "steps", "--seed", "5"]
    cfg, args = parser.parse_args_into_dataclasses(
        base + ["--target_modules", "query", "value", "--rank", "4", "--dendrite_seed", "3", "--activation", "gelu"]
    )
    assert cfg == DendriteConfig(target_modules=["query", "value"], rank=4, dendrite_seed=3, activation="gelu")
    assert args.seed == 5
    cfg, _ = parser.parse_args_into_dataclasses(base + ["--target_modules", "all-linear"])
    assert cfg.target_modules == "all-linear"
    cfg, _ = parser.parse_args_into_dataclasses(base + ["--target_modules", r".*layer\.0\..*dense"])
    assert cfg.target_modules == r".*layer\.0\..*dense"  # one value with regex characters is a regex
    cfg, _ = parser.parse_args_into_dataclasses(base)
    assert cfg == DendriteConfig()
    help_text = parser.format_help()
    for name in ("--target_modules", "--learning_rule", "--dendrites_per_cycle", "--rank", "--candidate_pool_size"):
        assert name in help_text


def test_config_written_by_0_1_0_with_seed_key_loads():
    data = DendriteConfig(dendrite_seed=4).to_dict()
    data["seed"] = data.pop("dendrite_seed")
    assert DendriteConfig.from_dict(data).dendrite_seed == 4
