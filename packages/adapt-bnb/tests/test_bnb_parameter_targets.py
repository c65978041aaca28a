"""``target_parameters`` on bitsandbytes weights: refused with the reason, model untouched."""

from __future__ import annotations

import pytest
import torch
from bnb_testutils import KINDS, Net, quantise
from torch import nn

from adapt.core import TargetError, adapt
from adapt.lora import LoraConfig


@pytest.mark.parametrize("kind", ["8bit", "nf4", "fp4"])
def test_quantised_weight_as_parameter_target_is_refused(kind: str) -> None:
    torch.manual_seed(0)
    net = Net(quantise(nn.Linear(64, 128), kind), nn.Linear(128, 64))
    layout = [type(m).__name__ for m in net.modules()]
    before = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    config = LoraConfig(r=4, target_modules=[], target_parameters=["up.weight"])
    with pytest.raises(TargetError, match=r"quantised or wrapped tensor|int8 values|uint8"):
        adapt(net, config)
    assert [type(m).__name__ for m in net.modules()] == layout
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    # the quantised module itself stays reachable through target_modules
    model = adapt(net, LoraConfig(r=4, target_modules=["up"]))
    assert KINDS[kind]["bits"] in (4, 8)
    assert model(torch.randn(2, 64)).shape == (2, 64)


def test_4bit_parameter_error_names_the_tensor_type() -> None:
    net = Net(quantise(nn.Linear(64, 128), "nf4"), nn.Linear(128, 64))
    with pytest.raises(TargetError) as info:
        adapt(net, LoraConfig(r=4, target_modules=[], target_parameters=["up.weight"]))
    message = str(info.value)
    assert "Params4bit" in message and "target_modules" in message
