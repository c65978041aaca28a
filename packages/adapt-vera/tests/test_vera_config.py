"""VeraConfig: fields, defaults, validation messages, PEFT config dicts."""

from __future__ import annotations

import json
import warnings

import pytest

from adapt.core import ConfigError
from adapt.vera import VeraConfig

PEFT_VERA_CONFIG = {
    "auto_mapping": None,
    "base_model_name_or_path": "tiny-llama",
    "bias": "none",
    "d_initial": 0.1,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_weights": True,
    "layers_pattern": None,
    "layers_to_transform": None,
    "modules_to_save": None,
    "peft_type": "VERA",
    "peft_version": "0.21.2",
    "projection_prng_key": 0,
    "r": 256,
    "revision": None,
    "save_projection": True,
    "target_modules": ["v_proj", "q_proj"],
    "task_type": "CAUSAL_LM",
    "vera_dropout": 0.0,
}


def test_defaults_follow_peft() -> None:
    cfg = VeraConfig(target_modules=["q_proj"])
    assert cfg.r == 256
    assert cfg.projection_prng_key == 0
    assert cfg.save_projection is True
    assert cfg.vera_dropout == 0.0
    assert cfg.d_initial == 0.1
    assert cfg.fan_in_fan_out is False
    assert cfg.bias == "none"
    assert cfg.init_weights is True
    assert cfg.peft_type == "VERA"


def test_core_targeting_fields_are_accepted() -> None:
    cfg = VeraConfig(
        r=4,
        target_modules={"q_proj", "v_proj"},
        exclude_modules=["k_proj"],
        layers_to_transform=(0, 1),
        layers_pattern="layers",
        modules_to_save=["lm_head"],
    )
    assert cfg.target_modules == ["q_proj", "v_proj"]  # a set is stored sorted, as a list
    assert cfg.layers_to_transform == [0, 1]
    assert cfg.exclude_modules == ["k_proj"]


def test_peft_written_config_loads_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = VeraConfig.from_dict(PEFT_VERA_CONFIG)
    assert cfg.r == 256
    assert cfg.d_initial == 0.1
    assert sorted(cfg.target_modules) == ["q_proj", "v_proj"]
    assert cfg.task_type == "CAUSAL_LM"
    assert cfg.base_model_name_or_path == "tiny-llama"
    assert cfg.inference_mode is True


def test_to_dict_round_trips_and_writes_peft_keys() -> None:
    cfg = VeraConfig(r=8, target_modules=["q_proj"], projection_prng_key=7, save_projection=False)
    data = json.loads(cfg.to_json())
    assert data["peft_type"] == "VERA"
    # every key PEFT writes for VeRA (minus PEFT's bookkeeping) is written by us too
    assert set(PEFT_VERA_CONFIG) - {"auto_mapping", "peft_version"} <= set(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = VeraConfig.from_dict(data)
    assert again == cfg


def test_unknown_key_warns_once_by_name() -> None:
    data = {**PEFT_VERA_CONFIG, "some_future_option": 3}
    with pytest.warns(UserWarning, match="some_future_option"):
        VeraConfig.from_dict(data)


def test_wrong_peft_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="peft_type is 'LORA'"):
        VeraConfig.from_dict({**PEFT_VERA_CONFIG, "peft_type": "LORA"})


def test_wrong_json_type_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"VeraConfig\.r has the wrong type"):
        VeraConfig.from_dict({**PEFT_VERA_CONFIG, "r": "8"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"VeraConfig\.r must be > 0, got 0"),
        ({"r": -3}, r"VeraConfig\.r must be > 0, got -3"),
        ({"r": 2.5}, r"VeraConfig\.r must be an integer, got 2\.5"),
        ({"r": True}, r"VeraConfig\.r must be an integer, got True"),
        ({"projection_prng_key": -1}, r"VeraConfig\.projection_prng_key must be >= 0, got -1"),
        ({"projection_prng_key": 1.0}, r"VeraConfig\.projection_prng_key must be an integer"),
        (
            {"projection_prng_key": 2**64},
            r"VeraConfig\.projection_prng_key must be <= 18446744073709551615",
        ),
        ({"vera_dropout": 1.0}, r"VeraConfig\.vera_dropout must be < 1, got 1\.0"),
        ({"vera_dropout": -0.1}, r"VeraConfig\.vera_dropout must be >= 0, got -0\.1"),
        ({"vera_dropout": "0.1"}, r"VeraConfig\.vera_dropout must be a number"),
        ({"d_initial": None}, r"VeraConfig\.d_initial must be a number, got None"),
        ({"d_initial": False}, r"VeraConfig\.d_initial must be a number, got False"),
        ({"bias": "lora_only"}, r"VeraConfig\.bias must be one of .*'vera_only'.*got 'lora_only'"),
        ({"save_projection": "yes"}, r"VeraConfig\.save_projection must be true or false"),
        ({"fan_in_fan_out": 1}, r"VeraConfig\.fan_in_fan_out must be true or false, got 1"),
        ({"init_weights": None}, r"VeraConfig\.init_weights must be true or false, got None"),
        ({"target_modules": []}, r"VeraConfig\.target_modules is empty"),
        ({"target_modules": [1, 2]}, r"VeraConfig\.target_modules must be a list of module names"),
        ({"layers_pattern": "layers"}, r"layers_pattern is set but layers_to_transform is not"),
        ({"layers_to_transform": [-1]}, r"layers_to_transform must be a non-negative int"),
        ({"inference_mode": "no"}, r"VeraConfig\.inference_mode must be true or false"),
    ],
)
def test_invalid_values_raise_config_error_with_reason(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        VeraConfig(**{"target_modules": ["q_proj"], **kwargs})


def test_largest_prng_key_is_valid() -> None:
    assert (
        VeraConfig(target_modules=["q"], projection_prng_key=2**64 - 1).projection_prng_key
        == 2**64 - 1
    )


def test_validation_also_runs_on_mutation_before_add() -> None:
    """A config mutated after construction is re-validated when an adapter is added."""
    import torch.nn as nn

    from adapt.core import adapt

    cfg = VeraConfig(r=4, target_modules=["0"])
    cfg.r = 0
    with pytest.raises(ConfigError, match=r"VeraConfig\.r must be > 0"):
        adapt(nn.Sequential(nn.Linear(4, 4)), cfg)
