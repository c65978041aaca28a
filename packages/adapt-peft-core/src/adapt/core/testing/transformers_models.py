"""Tiny transformers models, built from configs (nothing is downloaded), seeded.

transformers is imported inside each builder, never at import time: ``import
adapt.core.testing`` works without it. Each builder takes the config fields by name; the
defaults are the tiny model most tests use, and a keyword overrides any field of the config
(``tiny_llama(hidden_size=32)``), so a test that needs another model says how it differs.

``seed`` is set with ``torch.manual_seed`` just before the model is built (``None`` leaves
the global generator as it is); the model is returned in eval mode unless ``training=True``
(as constructed: transformers builds models in training mode).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: the default tiny Llama: q/o 64→64, k/v 64→32 (GQA), gate/up 64→128, down 128→64
LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}
#: the default tiny GPT-2 (transformers Conv1D): c_attn 64→192, c_proj 64→64, c_fc 64→256
GPT2: dict[str, Any] = {
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "vocab_size": 128,
    "n_positions": 64,
}
#: the default tiny BERT encoder: query/key/value 64→64, intermediate 64→128
BERT: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}


def _seeded(build: Any, config: Any, seed: int | None, training: bool) -> nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    model: nn.Module = build(config)
    return model.train(training)


def tiny_llama_config(**config: Any) -> Any:
    """A ``transformers.LlamaConfig``: :data:`LLAMA`, updated with ``config``."""
    import transformers

    return transformers.LlamaConfig(**{**LLAMA, **config})


def tiny_llama(seed: int | None = 0, *, training: bool = False, **config: Any) -> nn.Module:
    """A ``LlamaForCausalLM`` of :func:`tiny_llama_config` (``config`` overrides its fields)."""
    import transformers

    return _seeded(transformers.LlamaForCausalLM, tiny_llama_config(**config), seed, training)


def tiny_gpt2_config(**config: Any) -> Any:
    """A ``transformers.GPT2Config``: :data:`GPT2`, updated with ``config``."""
    import transformers

    return transformers.GPT2Config(**{**GPT2, **config})


def tiny_gpt2(seed: int | None = 0, *, training: bool = False, **config: Any) -> nn.Module:
    """A ``GPT2LMHeadModel`` of :func:`tiny_gpt2_config` (``config`` overrides its fields)."""
    import transformers

    return _seeded(transformers.GPT2LMHeadModel, tiny_gpt2_config(**config), seed, training)


def tiny_bert_config(**config: Any) -> Any:
    """A ``transformers.BertConfig``: :data:`BERT`, updated with ``config``."""
    import transformers

    return transformers.BertConfig(**{**BERT, **config})


def tiny_bert(seed: int | None = 0, *, training: bool = False, **config: Any) -> nn.Module:
    """A ``BertModel`` (no head) of :func:`tiny_bert_config` (``config`` overrides its fields)."""
    import transformers

    return _seeded(transformers.BertModel, tiny_bert_config(**config), seed, training)


#: the default tiny mixture of experts (Mixtral and Qwen3-MoE): 4 experts, top-2; in
#: transformers ≥ 5 the experts are fused parameters ``mlp.experts.gate_up_proj`` (4, 192, 64)
#: and ``mlp.experts.down_proj`` (4, 64, 96)
MOE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}


def tiny_mixtral(
    seed: int | None = 0,
    *,
    training: bool = False,
    experts_implementation: str | None = None,
    **config: Any,
) -> nn.Module:
    """A ``MixtralForCausalLM`` of :data:`MOE` (``config`` overrides its fields);
    ``experts_implementation`` picks transformers' expert kernel ("eager", "grouped_mm",
    "batched_mm"; default: transformers' choice)."""
    import transformers

    cfg = transformers.MixtralConfig(**{**MOE, **config})
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    return _seeded(transformers.MixtralForCausalLM, cfg, seed, training)


def tiny_qwen3_moe(
    seed: int | None = 0,
    *,
    training: bool = False,
    experts_implementation: str | None = None,
    **config: Any,
) -> nn.Module:
    """A ``Qwen3MoeForCausalLM`` like :func:`tiny_mixtral` (``num_experts`` and
    ``moe_intermediate_size`` from :data:`MOE`)."""
    import transformers

    fields = {**MOE, **config}
    fields.setdefault("num_experts", fields.pop("num_local_experts"))
    fields.setdefault("moe_intermediate_size", fields["intermediate_size"])
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    cfg = transformers.Qwen3MoeConfig(**fields)
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    return _seeded(transformers.Qwen3MoeForCausalLM, cfg, seed, training)
