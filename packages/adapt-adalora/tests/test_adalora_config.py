"""AdaLoraConfig: validation messages, the `r` warning, PEFT config files, the schedule."""

from __future__ import annotations

import warnings

import pytest

from adapt.adalora import AdaLoraConfig, schedule
from adapt.core import ConfigError


def cfg(**kw: object) -> AdaLoraConfig:
    base: dict[str, object] = {"target_modules": ["q"], "total_step": 100}
    base.update(kw)
    return AdaLoraConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_step": None}, "total_step is required"),
        ({"total_step": 0}, r"total_step must be > 0"),
        ({"total_step": -5}, r"total_step must be > 0"),
        ({"tinit": 60, "tfinal": 40}, r"tinit \(60\) must be < total_step - tfinal"),
        ({"tinit": 100}, "no budgeting phase"),
        ({"target_r": 0}, r"target_r must be > 0"),
        ({"target_r": 16, "init_r": 12}, r"target_r \(16\) must be <= init_r \(12\)"),
        ({"init_r": 0, "target_r": 0}, r"init_r must be > 0"),
        ({"beta1": 1.0}, r"beta1 must be < 1"),
        ({"beta2": -0.1}, r"beta2 must be >= 0"),
        ({"deltaT": 0}, r"deltaT must be >= 1"),
        ({"orth_reg_weight": -1.0}, r"orth_reg_weight must be >= 0"),
        ({"tinit": -1}, r"tinit must be >= 0"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be < 1"),
        ({"bias": "some"}, "bias must be one of"),
        ({"init_r": 4, "target_r": 2, "rank_pattern": {"q.lora_E": [True]}}, "has 1 entries"),
        ({"rank_pattern": {"q": [True] * 12}}, "must name a layer's lora_E"),
        ({"rank_pattern": {"q.lora_E": [1] * 12}}, "list of true/false"),
    ],
)
def test_invalid_values_say_what_is_wrong(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg(**kwargs)


def test_boundaries_that_are_valid() -> None:
    cfg(tinit=59, tfinal=40)  # one budgeting step
    cfg(target_r=12, init_r=12)
    cfg(beta1=0.0, beta2=0.0, orth_reg_weight=0.0, deltaT=1)


def test_setting_r_warns_and_points_to_init_r_and_target_r() -> None:
    with pytest.warns(UserWarning) as record:
        config = cfg(r=16)
    msg = str(record[0].message)
    assert "ignores `r`" in msg and "r=16" in msg
    assert "init_r" in msg and "target_r" in msg
    assert "initial" in msg and "average" in msg
    assert record[0].filename == __file__  # points at the user's line
    assert config.init_r == 12  # r did not change anything


def test_peft_config_file_with_default_r_loads_silently() -> None:
    data = cfg().to_dict()
    assert data["r"] == 8 and data["peft_type"] == "ADALORA"
    data.update({"use_rslora": False, "use_dora": False, "alpha_pattern": {}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = AdaLoraConfig.from_dict(data)
    assert loaded == cfg()


def test_peft_config_file_with_other_r_warns() -> None:
    data = cfg().to_dict()
    data["r"] = 32
    with pytest.warns(UserWarning, match="ignores `r`"):
        AdaLoraConfig.from_dict(data, source="adapter_config.json")


def test_to_dict_round_trips_with_a_rank_pattern() -> None:
    pattern = {"model.layers.0.q_proj.lora_E": [True, False, True, True]}
    config = cfg(init_r=4, target_r=2, rank_pattern=pattern)
    assert AdaLoraConfig.from_dict(config.to_dict()) == config
    assert config.kept_ranks("model.layers.0.q_proj") == [True, False, True, True]
    assert config.kept_ranks("model.layers.1.q_proj") is None


def formula(init: int, target: int, step: int, tinit: int, tfinal: int, total: int) -> int:
    return int((init - target) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3 + target)


def test_schedule_at_the_phase_boundaries() -> None:
    config = cfg(tinit=10, tfinal=20, total_step=100, deltaT=5)
    init, target = 120, 80

    def at(step: int) -> tuple[int, bool]:
        return schedule(config, step, init, target)

    assert at(0) == (init, False)
    assert at(10) == (init, False)  # last warm-up step
    assert at(11)[0] == formula(init, target, 11, 10, 20, 100)
    assert at(11)[1] is False  # 11 % deltaT != 0
    assert at(15) == (formula(init, target, 15, 10, 20, 100), True)
    assert at(45)[0] == formula(init, target, 45, 10, 20, 100)
    assert at(80)[0] == target  # total_step - tfinal: the cubic has reached the target
    assert at(81) == (target, True)
    assert at(100) == (target, True)
    budgets = [at(s)[0] for s in range(0, 101)]
    assert budgets == sorted(budgets, reverse=True)  # never grows back
