"""The IA³ method object (``adapt.methods`` entry point ``ia3``): PEFT's default targets and
feed-forward modules by model type, and which targets are feed-forward."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from adapt.core import AdapterConfig, Method
from adapt.core.protocols import ModelView
from adapt.core.targeting import model_type_of

from .config import IA3Config, feedforward_within, is_feedforward


def _by_model_type(groups: dict[tuple[str, ...], tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {model_type: names for names, types in groups.items() for model_type in types}


#: What PEFT adapts with IA³ when a config names no target modules, by ``model_type``:
#: attention keys/values (or the fused projection) and the MLP's output projection.
TARGET_MODULES: dict[str, tuple[str, ...]] = _by_model_type(
    {
        ("k_proj", "v_proj", "down_proj"): ("llama", "mistral"),
        ("q_proj", "v_proj", "down_proj"): (
            "llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
        ),
        ("c_attn", "mlp.c_proj"): ("gpt2", "gpt_bigcode"),
        ("key", "value", "output.dense"): ("bert", "roberta"),
        ("k", "v", "wo"): ("t5",),
        ("k", "v", "wi_1"): ("mt5",),
        ("query_key_value", "mlp.dense_4h_to_h"): ("bloom",),
        ("query_key_value", "dense_4h_to_h"): ("gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel"),
        ("q_proj", "k_proj", "fc2"): ("opt",),
        ("q_proj", "v_proj", "fc_out"): ("gptj",),
        ("q_proj", "v_proj", "c_proj"): ("gpt_neo",),
        ("q_proj", "v_proj", "fc2"): ("bart", "phi"),
        ("k_proj", "v_proj", "w2"): ("mixtral",),
        ("key_proj", "value_proj", "output.dense"): ("deberta-v2",),
        ("in_proj", "output.dense"): ("deberta",),
    }
)  # fmt: skip

#: Which of those PEFT treats as feed-forward (their input is scaled), by ``model_type``.
FEEDFORWARD_MODULES: dict[str, tuple[str, ...]] = _by_model_type(
    {
        ("down_proj",): (
            "llama", "llama4", "mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
        ),
        ("mlp.c_proj",): ("gpt2", "gpt_bigcode"),
        ("output.dense",): ("bert", "roberta", "deberta-v2", "deberta"),
        ("wo",): ("t5",),
        (): ("mt5",),
        ("mlp.dense_4h_to_h",): ("bloom",),
        ("dense_4h_to_h",): ("gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel"),
        ("fc2",): ("opt", "bart", "phi"),
        ("fc_out",): ("gptj",),
        ("c_proj",): ("gpt_neo",),
        ("w2",): ("mixtral",),
    }
)  # fmt: skip


class IA3Method(Method[IA3Config]):
    """IA³: adapters live entirely in their layers; the method fills in the feed-forward
    modules and tells each layer whether it is one."""

    name: ClassVar[str] = "ia3"
    peft_type: ClassVar[str] = "IA3"
    package: ClassVar[str] = "adapt-example-ia3"
    config_class: ClassVar[type[AdapterConfig]] = IA3Config
    default_target_modules: ClassVar[Mapping[str, Sequence[str]]] = TARGET_MODULES
    summary_keys: ClassVar[tuple[str, ...]] = ("feedforward_modules", "init_ia3_weights")
    tensor_prefixes: ClassVar[tuple[str, ...]] = ("ia3_",)

    def resolve_config(self, model: ModelView, config: IA3Config) -> IA3Config:
        """With no ``feedforward_modules``, PEFT's default for the model type (none when it
        has no default), kept to the entries that can select a target, so that the saved
        config says what was used and PEFT can read it back."""
        if config.feedforward_modules is not None:
            # core filled in default targets without re-checking: feed-forward modules must
            # still be among them (PEFT would save the config and then refuse to read it)
            config.validate()
            return config
        model_type = model_type_of(model.model)
        defaults = list(FEEDFORWARD_MODULES.get(model_type, ())) if model_type else []
        targets = config.target_modules
        resolved: list[str] | str = (
            feedforward_within(targets, defaults) if isinstance(targets, list) else defaults
        )
        return dataclasses.replace(config, feedforward_modules=resolved)

    def layer_kwargs(
        self, model: ModelView, config: IA3Config, adapter_name: str, path: str
    ) -> dict[str, Any]:
        return {
            "is_feedforward": is_feedforward(config.feedforward_modules, path),
            "module_path": path,
        }


METHOD = IA3Method()
