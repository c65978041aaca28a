"""adapt-lora's presets of the kit's tiny models and batches, and small helpers of its tests."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from adapt.core import testing

LLAMA_TARGETS = ["q_proj", "v_proj"]


#: adapt-lora's models: the kit's builders (:mod:`adapt.core.testing`) at width 32, vocabulary 64
tiny_llama = partial(
    testing.tiny_llama,
    hidden_size=32,
    intermediate_size=64,
    vocab_size=64,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
tiny_gpt2 = partial(testing.tiny_gpt2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
tiny_bert = partial(
    testing.tiny_bert,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=64,
    max_position_embeddings=32,
)
#: 2 sequences of 8 ids in [3, 64) (above the special tokens), seed 123
ids = partial(testing.token_ids, batch=2, length=8, low=3, vocab_size=64, seed=123)


class Wrap(nn.Module):
    """A one-layer model so a single module can be targeted by name (``"layer"``)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(x)
        return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
