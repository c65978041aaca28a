"""adapt's IA³ against HF PEFT's: checkpoints either way, the same logits unmerged, merged,
with two adapters at once and on a bfloat16 base; the same keys and shapes on disk."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from adapt_example_ia3 import IA3Config
from adapt_example_ia3.method import FEEDFORWARD_MODULES, TARGET_MODULES
from ia3_testutils import config_of, ia3_vector, logits, max_diff, randomise_ia3
from torch import nn

from adapt.core import AdaptedModel, adapt
from adapt.core.testing import tiny_gpt2, tiny_llama, token_ids

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = [
    pytest.mark.interop,
    # PEFT sets fan_in_fan_out to match the module type, with a warning; adapt needs no flag
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set:UserWarning"),
]

Build = Callable[[], nn.Module]

#: model, config keys; "default" uses PEFT's default targets and feed-forward modules
CASES: dict[str, tuple[Build, dict[str, Any]]] = {
    "llama-default": (tiny_llama, {}),
    "llama-explicit": (
        tiny_llama,
        {
            "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
            "feedforward_modules": ["up_proj", "down_proj"],
        },
    ),
    "gpt2-default": (tiny_gpt2, {}),
    "gpt2-explicit": (
        tiny_gpt2,
        {"target_modules": ["c_attn", "c_proj", "c_fc"], "feedforward_modules": ["c_fc"]},
    ),
    "gpt2-regex": (
        tiny_gpt2,
        {"target_modules": ["c_attn", "c_proj"], "feedforward_modules": r".*mlp\.c_proj"},
    ),
}
cases = pytest.mark.parametrize("case", sorted(CASES))
X = token_ids(3, 8)


def peft_saved(case: str, folder: Path, seed: int = 1) -> Any:
    """A PEFT IA³ model of ``case`` with its vectors randomised around 1, saved to ``folder``."""
    build, settings = CASES[case]
    model = peft.get_peft_model(build(), peft.IA3Config(**settings))
    randomise_ia3(model, seed=seed)
    model.save_pretrained(folder)
    return model


def adapt_saved(case: str, folder: Path, seed: int = 1) -> AdaptedModel:
    build, settings = CASES[case]
    model = adapt(build(), IA3Config(**settings))
    randomise_ia3(model, seed=seed)
    model.save_pretrained(folder)
    return model


def tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    loaded = safetensors_torch.load_file(folder / "adapter_model.safetensors")
    return {key: tuple(value.shape) for key, value in loaded.items()}


@cases
def test_peft_checkpoint_loads_in_adapt(case: str, tmp_path: Path) -> None:
    theirs = peft_saved(case, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = AdaptedModel.from_pretrained(CASES[case][0](), tmp_path)
    # PEFT's extra keys (auto_mapping, peft_version) load silently
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "IA3Config" in m or "unknown" in m.lower()], said
    assert max_diff(logits(ours, X), logits(theirs, X)) <= 1e-5


@cases
def test_adapt_checkpoint_loads_in_peft(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ours = adapt_saved(case, tmp_path)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(CASES[case][0](), tmp_path)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    about_keys = [m for m in said if "unexpected" in m.lower() or "unknown" in m.lower()]
    assert not about_keys, about_keys
    assert max_diff(logits(theirs, X), logits(ours, X)) <= 1e-5


@cases
def test_same_keys_and_shapes_on_disk(case: str, tmp_path: Path) -> None:
    peft_saved(case, tmp_path / "peft")
    adapt_saved(case, tmp_path / "adapt")
    theirs, ours = tensors(tmp_path / "peft"), tensors(tmp_path / "adapt")
    assert ours == theirs
    assert all(key.startswith("base_model.model.") and key.endswith(".ia3_l") for key in ours)


@cases
def test_merged_models_agree(case: str, tmp_path: Path) -> None:
    theirs = peft_saved(case, tmp_path)
    ours = AdaptedModel.from_pretrained(CASES[case][0](), tmp_path)
    unmerged = logits(ours, X)
    merged_theirs, merged_ours = theirs.merge_and_unload(), ours.merge_and_unload()
    assert max_diff(logits(merged_ours, X), unmerged) <= 1e-5
    assert max_diff(logits(merged_ours, X), logits(merged_theirs, X)) <= 1e-5
    theirs_state = merged_theirs.state_dict()
    for name, value in merged_ours.state_dict().items():
        assert max_diff(value, theirs_state[name]) <= 1e-6, name  # weights and biases


@cases
def test_two_active_adapters_agree(case: str, tmp_path: Path) -> None:
    theirs = peft_saved(case, tmp_path / "a", seed=1)
    peft_saved(case, tmp_path / "b", seed=2)
    theirs.load_adapter(tmp_path / "b", adapter_name="other")
    theirs.base_model.set_adapter(["default", "other"])
    ours = AdaptedModel.from_pretrained(CASES[case][0](), tmp_path / "a")
    ours.load_adapter(tmp_path / "b", adapter_name="other")
    ours.set_adapter(["default", "other"])
    both = logits(ours, X)
    assert max_diff(both, logits(theirs, X)) <= 1e-5
    ours.set_adapter("default")
    assert max_diff(both, logits(ours, X)) > 1e-3  # the second adapter does take part


def test_bfloat16_base_agrees_with_peft(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(tiny_llama().to(torch.bfloat16), peft.IA3Config())
    randomise_ia3(theirs)
    theirs.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path)
    # both keep float32 vectors on a bfloat16 base, and round the same way
    vector = ia3_vector(ours, "model.layers.0.mlp.down_proj", "default")
    assert vector.dtype == torch.float32
    assert max_diff(logits(ours, X), logits(theirs, X)) == 0.0


@pytest.mark.parametrize(
    ("build", "targets", "read_as"),
    [
        (tiny_llama, ["q_proj", "v_proj"], []),
        (tiny_gpt2, ["c_attn", "c_proj"], r".*(?:mlp\.c_proj)"),
    ],
    ids=["llama", "gpt2"],
)
def test_peft_default_feedforward_with_explicit_targets(
    build: Build, targets: list[str], read_as: list[str] | str, tmp_path: Path
) -> None:
    """PEFT saves its default feed-forward modules next to explicit targets that do not hold
    them (Llama ``down_proj``; GPT-2 ``mlp.c_proj``, a suffix of the target ``c_proj``), a
    config its own loader refuses; adapt reads it (with a warning) as the same selection,
    gives the same logits, and writes a config PEFT reads back."""
    theirs = peft.get_peft_model(build(), peft.IA3Config(target_modules=targets))
    randomise_ia3(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match="not a subset of target_modules"):
        ours = AdaptedModel.from_pretrained(build(), tmp_path / "peft")
    assert config_of(ours).feedforward_modules == read_as
    assert max_diff(logits(ours, X), logits(theirs, X)) <= 1e-5
    # adapt resolves the same config to the same rule by itself
    assert (
        config_of(adapt(build(), IA3Config(target_modules=targets))).feedforward_modules == read_as
    )
    ours.save_pretrained(tmp_path / "adapt")
    again = peft.PeftModel.from_pretrained(build(), tmp_path / "adapt")
    assert max_diff(logits(again, X), logits(theirs, X)) <= 1e-5


def test_default_tables_match_peft() -> None:
    from peft.utils import constants

    def as_lists(table: Any) -> dict[str, list[str]]:
        return {key: list(value) for key, value in table.items()}

    want_targets = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    want_feedforward = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
    assert as_lists(TARGET_MODULES) == as_lists(want_targets)
    assert as_lists(FEEDFORWARD_MODULES) == as_lists(want_feedforward)
