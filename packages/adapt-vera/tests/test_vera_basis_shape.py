"""VeRA adapters in any order: a lower r, or a larger r / larger layers with a basis declared
up front (VeraConfig.basis_shape); outputs equal the dense definition on the shared basis."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from adapt.core import AdaptedModel, AdapterStateError, ConfigError, adapt
from adapt.core.testing import randomise_adapters
from adapt.vera import VeraConfig


class Net(nn.Module):
    """Layers of three shapes; ``wide`` (96 -> 80) is targeted only by later adapters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 48)
        self.b = nn.Linear(48, 32)
        self.wide = nn.Linear(32, 80)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).sum(-1, keepdim=True) + self.wide(x).sum(
            -1, keepdim=True
        )


def randomise(model: AdaptedModel, seed: int) -> None:
    """Unit-variance noise into every λ (λ_b starts at zero)."""
    randomise_adapters(model, seed, scale=1.0, where=lambda name, _: "vera_lambda" in name)


def assert_definition(model: AdaptedModel, adapter: str) -> None:
    """Each layer's output equals W x + b + (diag(λ_b) B[:out,:r] diag(λ_d) A[:r,:in]) x."""
    basis = model.base_model.vera_basis
    r = model.peft_config[adapter].r
    model.set_adapter(adapter)
    for _, layer in model.adapter_layers():
        if adapter not in layer.adapter_names:
            continue
        lb, ld = layer.vera_lambda_b[adapter], layer.vera_lambda_d[adapter]
        a = basis.A[:r, : layer.in_features]
        b = basis.B[: layer.out_features, :r]
        delta = (lb[:, None] * b) @ (ld[:, None] * a)
        x = torch.randn(5, layer.in_features)
        base = layer.base_layer
        with torch.no_grad():
            torch.testing.assert_close(layer(x), base(x) + x @ delta.T, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.delta_weight(adapter), delta)


def test_second_adapter_with_a_lower_rank() -> None:
    model = adapt(Net(), VeraConfig(r=16, target_modules=["a", "b"]))
    model.add_adapter("small", VeraConfig(r=4, target_modules=["a", "b"]))
    randomise(model, 1)
    assert model.base_model.vera_basis.shape == (16, 48, 48)
    assert_definition(model, "default")
    assert_definition(model, "small")
    # and it merges exactly
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = model(x)
        model.merge_adapter(["small"])
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_larger_rank_later_with_a_declared_basis() -> None:
    first = VeraConfig(r=8, target_modules=["a", "b"], basis_shape=(32, 48, 48))
    model = adapt(Net(), first)
    assert model.base_model.vera_basis.shape == (32, 48, 48)
    model.add_adapter("big", VeraConfig(r=32, target_modules=["a", "b"]))
    randomise(model, 2)
    assert_definition(model, "default")
    assert_definition(model, "big")


def test_larger_layers_later_with_a_declared_basis() -> None:
    first = VeraConfig(r=8, target_modules=["a", "b"], basis_shape=(8, 48, 80))
    model = adapt(Net(), first)
    model.add_adapter("wider", VeraConfig(r=8, target_modules=["a", "wide"]))
    randomise(model, 3)
    assert_definition(model, "default")
    assert_definition(model, "wider")


def test_without_a_declared_basis_the_error_says_how_to_declare_one() -> None:
    model = adapt(Net(), VeraConfig(r=8, target_modules=["a", "b"]))
    before = [n for n, _ in model.named_parameters()]
    with pytest.raises(AdapterStateError, match=r"basis_shape=\(r, max_in, max_out\)"):
        model.add_adapter("big", VeraConfig(r=32, target_modules=["a", "b"]))
    assert [n for n, _ in model.named_parameters()] == before


def test_declared_basis_smaller_than_needed_is_refused() -> None:
    with pytest.raises(ConfigError, match="basis_shape has rank 4 but r is 8"):
        VeraConfig(r=8, basis_shape=(4, 64, 64))
    with pytest.raises(ConfigError, match="three positive integers"):
        VeraConfig(r=8, basis_shape=(8, 64))
    with pytest.raises(ConfigError, match=r"smaller than adapter 'default' needs.*\(8, 48, 48\)"):
        adapt(Net(), VeraConfig(r=8, target_modules=["a", "b"], basis_shape=(8, 40, 48)))


def test_declared_basis_round_trips_with_and_without_projection(tmp_path: Path) -> None:
    for save_projection in (True, False):
        config = VeraConfig(
            r=8,
            target_modules=["a", "b"],
            basis_shape=(16, 64, 96),
            save_projection=save_projection,
        )
        model = adapt(Net(), config)
        randomise(model, 4)
        x = torch.randn(3, 32)
        with torch.no_grad():
            want = model(x)
        folder = tmp_path / str(save_projection)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.save_pretrained(folder)
        messages = [str(w.message) for w in caught]
        if save_projection:
            # PEFT loads the saved slices in place of the basis it regenerates: no warning
            assert not [m for m in messages if "VeRA" in m]
        else:
            assert any("loading it in PEFT will give different outputs" in m for m in messages)
        assert json.loads((folder / "adapter_config.json").read_text())["basis_shape"] == [
            16,
            64,
            96,
        ]
        loaded = AdaptedModel.from_pretrained(Net(), folder)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), want)


def test_config_file_leaves_out_an_undeclared_basis() -> None:
    assert "basis_shape" not in VeraConfig(r=8).to_dict()
