"""adapt-adalora's layer passes the plugin conformance kit."""

from __future__ import annotations

import torch
from torch import nn

from adapt.adalora import AdaLoraConfig, SVDLinear
from adapt.core.testing import check_layer


def test_svd_linear() -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(12, 9)

    check_layer(SVDLinear, make, AdaLoraConfig(init_r=4, target_r=2, total_step=10))
