"""adapt-lora's layers pass the plugin conformance kit (the same one third parties use)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adapt.core.testing import check_layer
from adapt.lora import LoraConfig
from adapt.lora.layer import LoraEmbedding, LoraLinear
from adapt.lora.layer_conv import LoraConv


def seeded(factory):  # type: ignore[no-untyped-def]
    def make() -> nn.Module:
        torch.manual_seed(0)
        return factory()  # type: ignore[no-any-return]

    return make


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear(rslora: bool) -> None:
    check_layer(LoraLinear, seeded(lambda: nn.Linear(12, 9)), LoraConfig(r=4, use_rslora=rslora))


def test_lora_embedding() -> None:
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 1, 2]])
    check_layer(
        LoraEmbedding, seeded(lambda: nn.Embedding(16, 6)), LoraConfig(r=3),
        make_input=lambda: tokens,
    )  # fmt: skip


def test_lora_conv2d() -> None:
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    check_layer(
        LoraConv, seeded(lambda: nn.Conv2d(3, 5, 3, padding=1)), LoraConfig(r=2),
        make_input=lambda: x,
    )  # fmt: skip


def test_lora_linear_with_dropout() -> None:
    """The kit compares outputs in eval mode, where dropout is off (also in new adapters)."""
    check_layer(LoraLinear, seeded(lambda: nn.Linear(12, 9)), LoraConfig(r=4, lora_dropout=0.3))


@settings(max_examples=12, deadline=None)
@given(
    n_in=st.integers(3, 24),
    n_out=st.integers(3, 24),
    r=st.integers(1, 6),
    alpha=st.floats(0.5, 64),
    rslora=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_any_shape_and_config(
    n_in: int, n_out: int, r: int, alpha: float, rslora: bool, bias: bool, seed: int
) -> None:
    """Identity at init, merge == unmerged, merge→unmerge restores, save→load round-trips."""

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(n_in, n_out, bias=bias)

    check_layer(LoraLinear, make, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora), atol=1e-5)
