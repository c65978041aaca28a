"""adapt.lora: LoRA adapters (Hu et al., 2021) for adapt.

``adapt(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))`` injects LoRA layers
into Linear, Embedding, Conv1d/2d/3d and transformers Conv1D modules; checkpoints are HF
PEFT's LoRA format.
"""

from __future__ import annotations

from .__about__ import __version__
from .config import LoraConfig
from .corda import preprocess_corda
from .dora import DoraVariant
from .eva import get_eva_state_dict, initialize_lora_eva_weights
from .hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .layer import LoraEmbedding, LoraLayer, LoraLinear
from .layer_conv import LoraConv
from .loftq import replace_lora_weights_loftq
from .method import METHOD, LoraMethod
from .subconfigs import CordaConfig, EvaConfig, LoftQConfig
from .variants import VARIANT_GROUP, LoraVariant, get_variant, register_variant, unregister_variant

__all__ = [
    "METHOD",
    "VARIANT_GROUP",
    "CordaConfig",
    "DoraVariant",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraMethod",
    "LoraVariant",
    "__version__",
    "get_eva_state_dict",
    "get_variant",
    "hotswap_adapter",
    "initialize_lora_eva_weights",
    "prepare_model_for_compiled_hotswap",
    "preprocess_corda",
    "register_variant",
    "replace_lora_weights_loftq",
    "unregister_variant",
]
