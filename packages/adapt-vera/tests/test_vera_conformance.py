"""adapt-vera's layer passes the plugin conformance kit."""

from __future__ import annotations

import torch
from torch import nn

from adapt.core.testing import check_layer
from adapt.vera import VeraConfig
from adapt.vera.layer import VeraLinear


def test_vera_linear() -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(12, 9)

    check_layer(VeraLinear, make, VeraConfig(r=8))
