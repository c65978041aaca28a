"""adapt-adalora's layer passes the plugin conformance kit."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adapt.adalora import AdaLoraConfig, SVDLinear
from adapt.core.testing import check_layer


def test_svd_linear() -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(12, 9)

    check_layer(SVDLinear, make, AdaLoraConfig(init_r=4, target_r=2, total_step=10))


@settings(max_examples=12, deadline=None)
@given(
    n_in=st.integers(3, 24),
    n_out=st.integers(3, 24),
    init_r=st.integers(1, 8),
    alpha=st.floats(0.5, 64),
    seed=st.integers(0, 1000),
)
def test_property_any_shape_and_config(
    n_in: int, n_out: int, init_r: int, alpha: float, seed: int
) -> None:
    """Identity at init, merge == unmerged, merge→unmerge restores, save→load round-trips."""

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(n_in, n_out)

    config = AdaLoraConfig(init_r=init_r, target_r=1, total_step=10, lora_alpha=alpha)
    check_layer(SVDLinear, make, config, atol=1e-5)
