"""LoraConfig: PEFT's defaults, validation, reading PEFT-written configs, per-module patterns."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import pytest

from adapt.core import AdapterConfig, ConfigError
from adapt.lora import LoraConfig
from adapt.lora.config import pattern_value

# An adapter_config.json as peft 0.21.2 writes it for a LoRA adapter on a tiny Llama
# (LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).
PEFT_0_21_2_LORA_CONFIG: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 16,
    "lora_bias": False,
    "lora_dropout": 0.05,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "peft_type": "LORA",
    "peft_version": "0.21.2",
    "qalora_group_size": 16,
    "r": 4,
    "rank_pattern": {},
    "revision": None,
    "target_modules": ["v_proj", "q_proj"],
    "target_parameters": None,
    "task_type": "CAUSAL_LM",
    "trainable_token_indices": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
}


# -- defaults ---------------------------------------------------------------------------------
def test_defaults_match_peft() -> None:
    cfg = LoraConfig()
    assert cfg.r == 8
    assert cfg.lora_alpha == 8
    assert cfg.lora_dropout == 0.0
    assert cfg.bias == "none"
    assert cfg.init_lora_weights is True
    assert cfg.use_rslora is False
    assert cfg.fan_in_fan_out is False
    assert cfg.rank_pattern == {} and cfg.alpha_pattern == {}
    assert cfg.peft_type == "LORA"
    assert isinstance(cfg, AdapterConfig)


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0, -1])
def test_non_positive_rank_is_refused(r: int) -> None:
    with pytest.raises(ConfigError, match=r"LoraConfig\.r must be > 0"):
        LoraConfig(r=r)


@pytest.mark.parametrize("r", [2.0, 4.5, "8", True, None])
def test_non_integer_rank_is_refused(r: Any) -> None:
    with pytest.raises(ConfigError, match=r"LoraConfig\.r must be an integer"):
        LoraConfig(r=r)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_outside_zero_one_is_refused(dropout: float) -> None:
    with pytest.raises(ConfigError, match=r"lora_dropout must be"):
        LoraConfig(lora_dropout=dropout)


@pytest.mark.parametrize("dropout", [0.0, 0.5, 0.999])
def test_dropout_inside_zero_one_is_accepted(dropout: float) -> None:
    assert LoraConfig(lora_dropout=dropout).lora_dropout == dropout


@pytest.mark.parametrize("bias", ["None", "lora", "", None])
def test_unknown_bias_is_refused_naming_the_choices(bias: Any) -> None:
    with pytest.raises(ConfigError, match=r"bias must be one of") as info:
        LoraConfig(bias=bias)
    for choice in ("none", "all", "lora_only"):
        assert choice in str(info.value)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_known_bias_values_are_accepted(bias: str) -> None:
    assert LoraConfig(bias=bias).bias == bias


@pytest.mark.parametrize("init", ["Corda", "Pissa", "pissa_niter_", "pissa_niter_-1", 1, 0.5])
def test_other_unsupported_inits_are_refused(init: Any) -> None:
    with pytest.raises(ConfigError, match="init_lora_weights"):
        LoraConfig(init_lora_weights=init)


@pytest.mark.parametrize("init", [True, False, "gaussian", "pissa", "pissa_niter_4", "olora"])
def test_supported_inits_are_accepted(init: Any) -> None:
    assert LoraConfig(init_lora_weights=init).init_lora_weights == init


@pytest.mark.parametrize(
    ("field", "pattern", "needle"),
    [
        ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\] must be > 0"),
        ("rank_pattern", {"q_proj": -2}, r"rank_pattern\['q_proj'\] must be > 0"),
        ("rank_pattern", {"q_proj": 2.5}, r"rank_pattern\['q_proj'\] must be an integer"),
        ("rank_pattern", {"q_proj": "4"}, r"rank_pattern\['q_proj'\] must be an integer"),
        ("alpha_pattern", {"q_proj": "16"}, r"alpha_pattern\['q_proj'\] must be a number"),
        ("rank_pattern", ["q_proj"], r"rank_pattern must map module names"),
    ],
)
def test_bad_pattern_values_are_refused(field: str, pattern: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        LoraConfig(**{field: pattern})


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_invalid_regex_pattern_key_is_refused(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field} key '\(q_proj' is not a valid regex"):
        LoraConfig(**{field: {"(q_proj": 4}})


def test_none_patterns_become_empty_dicts() -> None:
    cfg = LoraConfig(rank_pattern=None, alpha_pattern=None)  # type: ignore[arg-type]
    assert cfg.rank_pattern == {} and cfg.alpha_pattern == {}


# -- reading PEFT's adapter_config.json -------------------------------------------------------
def test_peft_written_config_loads_silently() -> None:
    data = json.loads(json.dumps(PEFT_0_21_2_LORA_CONFIG))  # exactly what json.load gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = LoraConfig.from_dict(data)
    assert isinstance(cfg, LoraConfig)
    assert cfg.r == 4 and cfg.lora_alpha == 16 and cfg.lora_dropout == 0.05
    assert sorted(cfg.target_modules or []) == ["q_proj", "v_proj"]
    assert cfg.task_type == "CAUSAL_LM"
    assert cfg.inference_mode is True
    assert cfg.scaling(4, 16) == 4.0


def test_peft_config_with_use_dora_reads_as_dora_and_writes_peft_keys_only() -> None:
    cfg = LoraConfig.from_dict({**PEFT_0_21_2_LORA_CONFIG, "use_dora": True})
    assert cfg.use_dora is True and cfg.variant is None
    saved = cfg.to_dict()
    assert saved["use_dora"] is True
    assert "variant" not in saved and "variant_options" not in saved  # adapt-only, unset
    assert LoraConfig(variant="dora").use_dora is True  # one spelling on disk: PEFT's
    with pytest.raises(ConfigError, match="one variant"):
        LoraConfig(use_dora=True, variant="gated")
    with pytest.raises(ConfigError, match="no variant is"):
        LoraConfig(variant_options={"x": 1})
    with pytest.raises(ConfigError, match="use_dora must be true or false"):
        LoraConfig(use_dora="yes")  # type: ignore[arg-type]
    assert LoraConfig(variant="gated", variant_options={"g": 1}).to_dict()["variant"] == "gated"


def test_peft_config_with_use_qalora_is_refused_by_name() -> None:
    data = {**PEFT_0_21_2_LORA_CONFIG, "use_qalora": True}
    with pytest.raises(ConfigError, match="use_qalora") as info:
        LoraConfig.from_dict(data)
    message = str(info.value)
    assert "a PEFT feature adapt does not implement yet" in message
    # it says plainly that the folder cannot be loaded, and does not send the user to delete
    # the key (which then fails later with a misleading "different base model" error)
    assert "removing the key would not make it load correctly" in message
    assert "remove it" not in message


@pytest.mark.parametrize(
    ("key", "value"),
    [("use_qalora", True), ("use_bdlora", True), ("layer_replication", [[0, 1]])],
)
def test_peft_features_adapt_lacks_are_refused_by_name(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        LoraConfig.from_dict({**PEFT_0_21_2_LORA_CONFIG, key: value})


def test_unknown_key_warns_once_and_is_dropped() -> None:
    data = {**PEFT_0_21_2_LORA_CONFIG, "some_future_option": 3}
    with pytest.warns(UserWarning, match="some_future_option") as record:
        cfg = LoraConfig.from_dict(data)
    assert len(record) == 1
    assert not hasattr(cfg, "some_future_option")


def test_other_peft_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="VERA"):
        LoraConfig.from_dict({**PEFT_0_21_2_LORA_CONFIG, "peft_type": "VERA"})


def test_to_dict_round_trips_through_from_dict() -> None:
    cfg = LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=["q_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"q_proj": 3.0},
        use_rslora=True,
        bias="lora_only",
    )
    data = json.loads(cfg.to_json())
    assert data["peft_type"] == "LORA"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = LoraConfig.from_dict(data)
    assert back == cfg


# -- patterns and scaling -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "path", "hit"),
    [
        ("q_proj", "model.layers.0.self_attn.q_proj", True),
        ("q_proj", "q_proj", True),
        ("q_proj", "model.layers.0.self_attn.xq_proj", False),
        ("q_proj", "model.layers.0.self_attn.q_proj.inner", False),
        ("self_attn.q_proj", "model.layers.1.self_attn.q_proj", True),
        ("layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
        ("layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj", False),
        (r"layers\.[01]\.self_attn\.v_proj", "model.layers.1.self_attn.v_proj", True),
        (r"layers\.[01]\.self_attn\.v_proj", "model.layers.2.self_attn.v_proj", False),
        ("q_proj|v_proj", "model.layers.0.self_attn.v_proj", True),
    ],
)
def test_pattern_matches_as_dotted_suffix_regex(key: str, path: str, hit: bool) -> None:
    import re

    expected = re.match(rf"(.*\.)?({key})$", path) is not None
    assert expected is hit  # the table itself follows PEFT's rule
    assert (pattern_value({key: 7}, path) == 7) is hit


def test_rank_and_alpha_apply_patterns_per_path() -> None:
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 4},
        alpha_pattern={"v_proj": 32},
    )
    assert cfg.rank_and_alpha("model.layers.0.self_attn.q_proj") == (8, 16)
    assert cfg.rank_and_alpha("model.layers.1.self_attn.q_proj") == (2, 16)
    assert cfg.rank_and_alpha("model.layers.0.self_attn.v_proj") == (4, 32)
    assert cfg.rank_and_alpha("model.layers.0.mlp.up_proj") == (8, 16)


@pytest.mark.parametrize(("r", "alpha"), [(1, 1.0), (4, 16.0), (16, 8.0), (7, 3.0)])
def test_scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora(r: int, alpha: float) -> None:
    assert LoraConfig().scaling(r, alpha) == pytest.approx(alpha / r)
    assert LoraConfig(use_rslora=True).scaling(r, alpha) == pytest.approx(alpha / math.sqrt(r))
