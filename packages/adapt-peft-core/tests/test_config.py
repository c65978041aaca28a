"""AdapterConfig: validation, JSON round trip and reading PEFT-written configs."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest

from adapt.core import ANY_VALUE, AdapterConfig, ConfigError
from adapt.core.testing import ToyConfig


@dataclasses.dataclass
class PeftishConfig(ToyConfig):
    """ToyConfig that, like a real method's config, tolerates some PEFT keys."""

    peft_ignored_keys: ClassVar[dict[str, Any]] = {
        "use_dora": False,
        "layer_replication": None,
        "init_mode": ("default", "auto"),
        "runtime_config": ANY_VALUE,
    }


def test_round_trip() -> None:
    cfg = ToyConfig(
        r=4,
        init_identity=False,
        bias="all",
        target_modules=["v_proj", "q_proj"],
        exclude_modules=r".*lm_head",
        layers_to_transform=[0, 2],
        layers_pattern="layers",
        modules_to_save=["head"],
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
    data = cfg.to_dict()
    assert data["peft_type"] == "TOY"
    assert data["r"] == 4 and data["target_modules"] == ["v_proj", "q_proj"]
    assert ToyConfig.from_dict(data) == cfg
    assert ToyConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_sets_and_tuples_become_lists() -> None:
    cfg = ToyConfig(target_modules={"v_proj", "q_proj"}, layers_to_transform=(1, 0))  # type: ignore[arg-type]
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.layers_to_transform == [1, 0]
    assert json.loads(cfg.to_json())["target_modules"] == ["q_proj", "v_proj"]


def test_to_json_sorts_keys() -> None:
    text = ToyConfig(target_modules=["q"]).to_json()
    keys = list(json.loads(text))
    assert keys == sorted(keys)
    assert "peft_type" in keys and "r" in keys
    assert text.endswith("\n")


def test_unknown_keys_warn_once_and_are_dropped() -> None:
    data = {**ToyConfig(target_modules=["q"]).to_dict(), "zeta": 1, "alpha_beta": "x"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = ToyConfig.from_dict(data, source="cfg.json")
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "cfg.json" in msg and "['alpha_beta', 'zeta']" in msg and "ToyConfig" in msg
    assert cfg == ToyConfig(target_modules=["q"])
    assert not hasattr(cfg, "zeta")


def test_peft_bookkeeping_keys_are_silent() -> None:
    data = {
        **ToyConfig(target_modules=["q"]).to_dict(),
        "peft_version": "0.13.0",
        "auto_mapping": {"base_model_class": "X"},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ToyConfig.from_dict(data) == ToyConfig(target_modules=["q"])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_dora", False),
        ("layer_replication", None),
        ("init_mode", "auto"),
        ("runtime_config", {"ephemeral_gpu_offload": True}),
    ],
)
def test_ignored_keys_at_neutral_values_are_silent(key: str, value: Any) -> None:
    data = {**PeftishConfig(target_modules=["q"]).to_dict(), key: value}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = PeftishConfig.from_dict(data)
    assert cfg == PeftishConfig(target_modules=["q"])


@pytest.mark.parametrize(
    ("key", "value"),
    [("use_dora", True), ("layer_replication", [[0, 2]]), ("init_mode", "pissa")],
)
def test_ignored_keys_at_other_values_are_refused_by_name(key: str, value: Any) -> None:
    data = {**PeftishConfig(target_modules=["q"]).to_dict(), key: value}
    with pytest.raises(ConfigError) as info:
        PeftishConfig.from_dict(data, source="some/adapter_config.json")
    msg = str(info.value)
    assert f"{key}={value!r}" in msg
    assert "some/adapter_config.json" in msg
    assert "does not implement yet" in msg
    # the folder cannot be loaded: no advice to delete the key (which only fails later)
    assert "refuses to load it" in msg and "remove it" not in msg
    assert PeftishConfig.unsupported_features(data) == {key: value}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("r", "8"),
        ("r", 2.5),
        ("r", True),
        ("init_identity", "yes"),
        ("init_identity", 1),
        ("bias", 0),
        ("target_modules", 3),
        ("layers_to_transform", "0"),
        ("inference_mode", "false"),
        ("modules_to_save", "head"),
    ],
)
def test_wrong_json_types_name_the_field(key: str, value: Any) -> None:
    data = {**ToyConfig(target_modules=["q"]).to_dict(), key: value}
    with pytest.raises(ConfigError) as info:
        ToyConfig.from_dict(data, source="x.json")
    msg = str(info.value)
    assert f"ToyConfig.{key}" in msg
    assert repr(value) in msg


def test_wrong_peft_type_and_non_object() -> None:
    with pytest.raises(ConfigError, match="peft_type is 'LORA' but ToyConfig reads 'TOY'"):
        ToyConfig.from_dict({"peft_type": "LORA"})
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        ToyConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_from_json_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(ToyConfig(target_modules=["q"], r=3).to_json())
    assert ToyConfig.from_json_file(str(path)) == ToyConfig(target_modules=["q"], r=3)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        ToyConfig.from_json_file(str(path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "ToyConfig.r must be >= 1, got 0"),
        ({"r": "2"}, "ToyConfig.r must be an integer"),
        ({"bias": "some"}, "ToyConfig.bias must be one of ['none', 'all', 'adapter_only']"),
        ({"init_identity": None}, "ToyConfig.init_identity must be true or false"),
        ({"target_modules": []}, "ToyConfig.target_modules is empty"),
        ({"target_modules": ["q", 1]}, "ToyConfig.target_modules must be a list of module names"),
        ({"exclude_modules": 5}, "ToyConfig.exclude_modules must be a list"),
        ({"modules_to_save": "head"}, "ToyConfig.modules_to_save must be a list of module names"),
        ({"layers_to_transform": -1}, "ToyConfig.layers_to_transform must be a non-negative int"),
        (
            {"layers_to_transform": [True]},
            "ToyConfig.layers_to_transform must be a non-negative int",
        ),
        ({"layers_pattern": "layers"}, "layers_pattern is set but layers_to_transform is not"),
        ({"inference_mode": "no"}, "ToyConfig.inference_mode must be true or false"),
    ],
)
def test_validation_messages(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ToyConfig(**kwargs)
    assert message in str(info.value)


def test_validate_runs_again_on_add_adapter() -> None:
    from core_testutils import mlp

    from adapt.core import adapt

    cfg = ToyConfig(target_modules=["up"])
    cfg.r = -3  # mutated after construction
    with pytest.raises(ConfigError, match=r"ToyConfig\.r must be >= 1, got -3"):
        adapt(mlp(), cfg)


def test_base_config_is_not_a_method() -> None:
    assert AdapterConfig.peft_type == ""
    assert ToyConfig.peft_type == "TOY"
