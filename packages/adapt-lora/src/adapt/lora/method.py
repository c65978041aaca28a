"""The LoRA method object, published under the ``adapt.methods`` entry point ``lora``."""

from __future__ import annotations

from typing import Any, ClassVar

from adapt.core import AdaptedModel, AdapterConfig, Method

from .config import LoraConfig


class LoraMethod(Method):
    name: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"
    package: ClassVar[str] = "adapt-lora"
    config_class: ClassVar[type[AdapterConfig]] = LoraConfig

    def layer_kwargs(
        self, model: AdaptedModel, config: AdapterConfig, adapter_name: str, path: str
    ) -> dict[str, Any]:
        assert isinstance(config, LoraConfig)
        r, alpha = config.rank_and_alpha(path)
        return {"r": r, "lora_alpha": alpha}


METHOD = LoraMethod()
