"""adapt-vera's presets of the kit's tiny models, and by-hand VeRA maths shared by its tests."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from adapt.core import AdaptedModel, AdapterLayer, SharedBasis, adapt, testing
from adapt.vera import VeraConfig, VeraMethod

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


#: the kit's tiny Llama (:func:`adapt.core.testing.tiny_llama`): q/o 64→64, k/v 64→32 (GQA),
#: gate/up 64→128, down 128→64; with pad/bos/eos ids 0/1/2 (a keyword overrides any field)
tiny_llama = partial(
    testing.tiny_llama, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2
)
#: GPT-2 with transformers Conv1D: c_attn 32→96, attn c_proj 32→32, c_fc 32→128, mlp c_proj
#: 128→32; no dropout
tiny_gpt2 = partial(
    testing.tiny_gpt2,
    n_embd=32,
    n_head=2,
    vocab_size=100,
    n_positions=32,
    bos_token_id=0,
    eos_token_id=0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)


class Toy(nn.Module):
    """Independent Linear layers of arbitrary shapes (``l0``, ``l1``, ...), not chained."""

    def __init__(self, shapes: list[tuple[int, int]], seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        for i, (fan_in, fan_out) in enumerate(shapes):
            self.add_module(f"l{i}", nn.Linear(fan_in, fan_out))
        self.shapes = list(shapes)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [getattr(self, f"l{i}")(x) for i, x in enumerate(xs)]


def trained_vera(
    factory: Callable[[], nn.Module] = tiny_llama,
    targets: list[str] = LLAMA_TARGETS,
    **config: Any,
) -> AdaptedModel:
    """A seeded VeRA r 16 model of ``factory()`` with trained-like λ (both non-zero, standard
    deviation 0.5, so every λ gets a gradient), in train mode; ``config`` goes to
    :class:`~adapt.vera.VeraConfig`."""
    torch.manual_seed(0)
    adapted = adapt(factory(), VeraConfig(r=16, target_modules=targets, **config))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "vera_lambda" in name:
                param.normal_(std=0.5)
    adapted.train()
    return adapted


#: 3 sequences of 6 ids in [3, 128) (above the special tokens), seed 1
input_ids = partial(testing.token_ids, batch=3, length=6, low=3, vocab_size=128, seed=1)


def basis_of(model: AdaptedModel) -> SharedBasis:
    basis = VeraMethod.basis(model)
    assert basis is not None
    return basis


def reference_basis(
    r: int, max_in: int, max_out: int, key: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's regeneration, written out independently of adapt's code."""
    g = torch.Generator("cpu").manual_seed(key)
    a = torch.empty(r, max_in)
    bound_a = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(max_in)
    a.uniform_(-bound_a, bound_a, generator=g)
    b = torch.empty(max_out, r)
    bound_b = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(r)
    b.uniform_(-bound_b, bound_b, generator=g)
    return a, b


def hand_delta(layer: AdapterLayer, basis: SharedBasis, adapter: str) -> torch.Tensor:
    """ΔW = (λ_b[:, None] · B[:out, :r]) @ (λ_d[:, None] · A[:r, :in]), from the basis by hand."""
    lambda_b = layer.vera_lambda_b[adapter].detach()
    lambda_d = layer.vera_lambda_d[adapter].detach()
    r = lambda_d.shape[0]
    a = basis.A[:r, : layer.in_features]
    b = basis.B[: layer.out_features, :r]
    return (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)


def randomise_lambdas(model: AdaptedModel, seed: int = 0) -> None:
    """Give every λ non-trivial values so each layer's ΔW is non-zero and distinct."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            for name in layer.adapter_names:
                for container in (layer.vera_lambda_b, layer.vera_lambda_d):
                    p = container[name]
                    p.copy_(torch.randn(p.shape, generator=g))


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "vera" not in k}
