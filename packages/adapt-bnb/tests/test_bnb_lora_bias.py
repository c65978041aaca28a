"""``lora_bias=True`` on bitsandbytes bases: the forward is ``base + s·(B A x + b_B)`` and merging
adds ``s·b_B`` to the base bias (PEFT 0.21 adds ``b_B`` unscaled on bnb layers, peft #3741)."""

from __future__ import annotations

import pytest
import torch
from bnb_testutils import MAIN_KINDS, Net, quantise
from torch import nn

from adapt.core import adapt
from adapt.core.testing import randomise_adapters
from adapt.lora import LoraConfig


@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_lora_bias_on_a_quantised_base(kind: str) -> None:
    torch.manual_seed(0)
    net = Net(quantise(nn.Linear(64, 128), kind), nn.Linear(128, 64))
    model = adapt(net, LoraConfig(r=4, lora_alpha=16, target_modules=["up"], lora_bias=True))
    randomise_adapters(model, scale=0.3)
    layer = model.model.up
    x = torch.randn(3, 64)
    s = layer.scaling["default"]
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    with torch.no_grad():
        expected = layer.base_layer(x) + s * (b(a(x)))
        out = layer(x)
        assert torch.allclose(out, expected, atol=1e-4)
        bias = layer.base_layer.bias.detach().clone()
        model.merge_adapter()
        assert torch.allclose(layer.base_layer.bias, bias + s * b.bias, atol=1e-6)
        # the merged output differs only by the weight's requantisation
        assert float((layer(x) - out).norm() / out.norm()) < 0.25
        model.unmerge_adapter()
        assert torch.allclose(layer.base_layer.bias, bias, atol=1e-6)
