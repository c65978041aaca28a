"""Small models and helpers shared by the adapt-peft-core tests (nothing is downloaded)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from adapt.core import testing


class MLP(nn.Module):
    """``head(down(tanh(up(x))))``: three named linears and a non-linear ``act``."""

    def __init__(self, dim: int = 8, hidden: int = 12, out: int = 5) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.act = nn.Tanh()
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.down(self.act(self.up(x))))
        return out


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


class Attn(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.self_attn = Attn(dim)
        self.norm = nn.LayerNorm(dim)
        self.up_proj = nn.Linear(dim, 2 * dim)


class Stack(nn.Module):
    """A decoder-shaped tree: ``layers.{0,1,2}.self_attn.{q,k,v,o}_proj``, ``layers.N.norm``,
    ``layers.N.up_proj``, an ``embed`` and an ``lm_head`` (no forward needed)."""

    def __init__(self, dim: int = 4, n_layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(n_layers))
        self.lm_head = nn.Linear(dim, 10)


#: the kit's tiny Llama (:func:`adapt.core.testing.tiny_llama`) at width 16: 2 heads, 1 KV head,
#: vocabulary 32, pad/bos/eos ids 0/1/2
tiny_llama = partial(
    testing.tiny_llama,
    hidden_size=16,
    intermediate_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=32,
    max_position_embeddings=32,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def snapshot(model: nn.Module) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Module types by path and a copy of the state dict: enough to say "unchanged"."""
    types = {path: type(m).__qualname__ for path, m in model.named_modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return types, state


def assert_unchanged(
    model: nn.Module, before: tuple[dict[str, str], dict[str, torch.Tensor]]
) -> None:
    types, state = snapshot(model)
    assert types == before[0]
    assert list(state) == list(before[1])
    for key, value in state.items():
        assert torch.equal(value, before[1][key]), key
