"""Small models for the adapt-adalora tests."""

from __future__ import annotations

import torch
from torch import nn

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


def gpt2(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


def randomise(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Random values for every trainable tensor (E starts at zero: the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def ids(batch: int = 4, length: int = 12, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
