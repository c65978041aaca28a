"""adapt-vera's layer passes the plugin conformance kit."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adapt.core.testing import check_layer
from adapt.vera import VeraConfig
from adapt.vera.layer import VeraLinear


def test_vera_linear() -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(12, 9)

    check_layer(VeraLinear, make, VeraConfig(r=8))


@settings(max_examples=12, deadline=None)
@given(
    n_in=st.integers(3, 24),
    n_out=st.integers(3, 24),
    r=st.integers(1, 16),
    d_initial=st.floats(0.1, 1.0),
    key=st.integers(0, 2**31 - 1),
    seed=st.integers(0, 1000),
)
def test_property_any_shape_and_config(
    n_in: int, n_out: int, r: int, d_initial: float, key: int, seed: int
) -> None:
    """Identity at init, merge == unmerged, merge→unmerge restores, save→load round-trips."""

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(n_in, n_out)

    config = VeraConfig(r=r, d_initial=d_initial, projection_prng_key=key)
    check_layer(VeraLinear, make, config, atol=1e-5)
