"""The shared basis: deterministic generation, bounds, zero-copy slices, one storage per model,
frozen (gradients reach λ only), and its memory against per-layer copies."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from vera_testutils import (
    LLAMA_TARGETS,
    Toy,
    basis_of,
    input_ids,
    reference_basis,
    tiny_llama,
)

from adapt.core import SharedBasis, adapt
from adapt.vera import VeraConfig, VeraLinear


def _bound(fan_in: int) -> float:
    return math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)


# -- SharedBasis itself -------------------------------------------------------------------------


def test_same_key_gives_bit_identical_basis() -> None:
    one, two = SharedBasis(16, 40, 24, seed=1234), SharedBasis(16, 40, 24, seed=1234)
    assert torch.equal(one.A, two.A)
    assert torch.equal(one.B, two.B)
    assert one.A.data_ptr() != two.A.data_ptr()  # equal values, not a cached tensor


def test_generation_ignores_global_rng_state() -> None:
    torch.manual_seed(0)
    one = SharedBasis(8, 12, 10, seed=5)
    torch.manual_seed(99)
    torch.rand(100)
    two = SharedBasis(8, 12, 10, seed=5)
    assert torch.equal(one.A, two.A) and torch.equal(one.B, two.B)


def test_different_key_gives_different_basis() -> None:
    one, two = SharedBasis(16, 40, 24, seed=0), SharedBasis(16, 40, 24, seed=1)
    assert not torch.equal(one.A, two.A)
    assert not torch.equal(one.B, two.B)


def test_shapes_and_order_a_then_b_match_an_independent_generator() -> None:
    basis = SharedBasis(8, 40, 24, seed=42)
    assert basis.A.shape == (8, 40)
    assert basis.B.shape == (24, 8)
    assert basis.shape == (8, 40, 24)
    ref_a, ref_b = reference_basis(8, 40, 24, key=42)
    assert torch.equal(basis.A, ref_a)
    assert torch.equal(basis.B, ref_b)
    # drawing B first would give other values: the order is part of the format
    g = torch.Generator().manual_seed(42)
    b_first = torch.empty(24, 8).uniform_(-_bound(8), _bound(8), generator=g)
    assert not torch.equal(basis.B, b_first)


@pytest.mark.parametrize(("r", "max_in", "max_out"), [(4, 300, 200), (64, 8, 500), (1, 1, 1)])
def test_values_are_uniform_within_kaiming_bounds(r: int, max_in: int, max_out: int) -> None:
    basis = SharedBasis(r, max_in, max_out, seed=3)
    bound_a, bound_b = _bound(max_in), _bound(r)  # fan_in = the second dimension
    assert basis.A.abs().max() <= bound_a
    assert basis.B.abs().max() <= bound_b
    if basis.A.numel() >= 1000:  # fills the range, not a narrower one
        assert basis.A.abs().max() > 0.95 * bound_a
        assert basis.A.min() < 0 < basis.A.max()
        assert abs(basis.A.mean().item()) < 0.1 * bound_a
    if basis.B.numel() >= 1000:
        assert basis.B.abs().max() > 0.95 * bound_b
        assert basis.B.min() < 0 < basis.B.max()


def test_basis_is_frozen_buffers_not_parameters() -> None:
    basis = SharedBasis(4, 8, 8, seed=0)
    assert list(basis.parameters()) == []
    assert {n for n, _ in basis.named_buffers()} == {"A", "B"}
    assert not basis.A.requires_grad and not basis.B.requires_grad


def test_slices_are_zero_copy_views() -> None:
    basis = SharedBasis(8, 40, 24, seed=0)
    a, b = basis.slices(in_features=10, out_features=5, r=3)
    assert a.shape == (3, 10) and b.shape == (5, 3)
    assert a.untyped_storage().data_ptr() == basis.A.untyped_storage().data_ptr()
    assert b.untyped_storage().data_ptr() == basis.B.untyped_storage().data_ptr()
    assert a.data_ptr() == basis.A.data_ptr() and b.data_ptr() == basis.B.data_ptr()
    assert torch.equal(a, basis.A[:3, :10]) and torch.equal(b, basis.B[:5, :3])


def test_require_fits_and_refuses_with_advice() -> None:
    basis = SharedBasis(8, 40, 24, seed=0)
    basis.require(8, 40, 24, what="x")  # exactly the size: fine
    basis.require(1, 1, 1, what="x")
    for args in [(9, 40, 24), (8, 41, 24), (8, 40, 25)]:
        with pytest.raises(
            RuntimeError, match="Add the adapter with the largest rank and layers first"
        ):
            basis.require(*args, what="VeRA adapter 'b'")


@pytest.mark.parametrize("sizes", [(0, 4, 4), (4, 0, 4), (4, 4, 0)])
def test_empty_basis_is_refused(sizes: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="positive sizes"):
        SharedBasis(*sizes, seed=0)


# -- the basis inside a model -------------------------------------------------------------------


def _llama(r: int = 8, **kw: object) -> tuple[nn.Module, object]:
    model = adapt(tiny_llama(), VeraConfig(r=r, target_modules=LLAMA_TARGETS, **kw))
    return model, basis_of(model)


def test_basis_is_sized_to_the_largest_layer_and_regenerates_from_the_key() -> None:
    model, basis = _llama(r=8, projection_prng_key=11)
    layers = [layer for _, layer in model.adapter_layers()]
    assert basis.shape == (
        8,
        max(la.in_features for la in layers),
        max(la.out_features for la in layers),
    )
    assert basis.shape == (8, 128, 128)
    ref_a, ref_b = reference_basis(8, 128, 128, key=11)
    assert torch.equal(basis.A, ref_a) and torch.equal(basis.B, ref_b)
    _, other_basis = _llama(r=8, projection_prng_key=11)
    assert torch.equal(other_basis.A, basis.A) and torch.equal(other_basis.B, basis.B)


def test_layers_take_zero_copy_slices_of_the_one_basis() -> None:
    model, basis = _llama(r=8)
    layers = [layer for _, layer in model.adapter_layers()]
    assert len(layers) == 14
    for layer in layers:
        assert layer.basis is basis
        a, b = layer.sliced_basis("default", torch.float32, torch.device("cpu"))
        assert a.shape == (8, layer.in_features) and b.shape == (layer.out_features, 8)
        assert a.untyped_storage().data_ptr() == basis.A.untyped_storage().data_ptr()
        assert b.untyped_storage().data_ptr() == basis.B.untyped_storage().data_ptr()
        assert a.data_ptr() == basis.A.data_ptr()


@pytest.mark.parametrize("num_layers", [1, 2, 5])
def test_exactly_one_a_and_one_b_storage_per_model(num_layers: int) -> None:
    model = adapt(
        tiny_llama(num_hidden_layers=num_layers),
        VeraConfig(r=8, target_modules=LLAMA_TARGETS),
    )
    basis = basis_of(model)
    state = model.state_dict()
    storages = {k: v.untyped_storage().data_ptr() for k, v in state.items()}
    a_ptr, b_ptr = basis.A.untyped_storage().data_ptr(), basis.B.untyped_storage().data_ptr()
    assert a_ptr != b_ptr
    assert [k for k, p in storages.items() if p == a_ptr] == ["base_model.vera_basis.A"]
    assert [k for k, p in storages.items() if p == b_ptr] == ["base_model.vera_basis.B"]
    # exactly one (r, max_in) and one (max_out, r) tensor in the whole model
    assert sum(1 for v in state.values() if v.shape == basis.A.shape) == 1
    assert sum(1 for v in state.values() if v.shape == basis.B.shape) == 1
    assert sum(1 for m in model.modules() if isinstance(m, SharedBasis)) == 1
    # no layer registers its own copy (or a reference) of the basis
    layers = [layer for _, layer in model.adapter_layers()]
    assert len(layers) == 7 * num_layers
    for layer in layers:
        own = dict(layer.named_parameters()) | dict(layer.named_buffers())
        assert set(own) == {
            "base_layer.weight",
            "vera_lambda_b.default",
            "vera_lambda_d.default",
        }
        assert not any(isinstance(m, SharedBasis) for m in layer.modules())


def test_gradients_flow_to_lambdas_only() -> None:
    model, basis = _llama(r=8, init_weights=False)
    model.train()
    out = model(input_ids=input_ids()).logits
    out.float().pow(2).mean().backward()
    assert basis.A.grad is None and basis.B.grad is None
    assert not basis.A.requires_grad and not basis.B.requires_grad
    for _, layer in model.adapter_layers():
        for container in (layer.vera_lambda_b, layer.vera_lambda_d):
            grad = container["default"].grad
            assert grad is not None
            assert grad.abs().sum() > 0
        assert layer.base_layer.weight.grad is None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("vera_lambda_" in n for n in trainable)
    assert model.trainable_parameters()[0] == 14 * 8 + sum(
        la.out_features for _, la in model.adapter_layers()
    )


def test_identity_init_still_gives_lambda_b_a_gradient() -> None:
    """With init λ_b = 0 the output does not depend on λ_d yet, but λ_b must get a gradient."""
    model, _ = _llama(r=8)
    model(input_ids=input_ids()).logits.pow(2).mean().backward()
    for _, layer in model.adapter_layers():
        assert layer.vera_lambda_b["default"].grad.abs().sum() > 0
        assert torch.count_nonzero(layer.vera_lambda_d["default"].grad) == 0


def test_memory_of_shared_basis_vs_per_layer_copies() -> None:
    """The basis is stored once; per-layer copies of the slices would cost far more."""
    for r in (8, 256):
        model, basis = _llama(r=r)
        shared = basis.A.untyped_storage().nbytes() + basis.B.untyped_storage().nbytes()
        assert shared == 4 * (r * 128 + 128 * r)
        per_layer = 0
        for _, layer in model.adapter_layers():
            a, b = layer.sliced_basis("default", torch.float32, torch.device("cpu"))
            per_layer += a.numel() * a.element_size() + b.numel() * b.element_size()
        # 14 layers: in 4·64 + 2·64 + 2·64 + ... against one 128×r + 128×r pair
        assert per_layer == 4 * r * sum(
            la.in_features + la.out_features for _, la in model.adapter_layers()
        )
        assert per_layer > 6 * shared
        # and the model really holds only the shared bytes for the basis
        ptrs = {basis.A.untyped_storage().data_ptr(), basis.B.untyped_storage().data_ptr()}
        held = sum(
            v.untyped_storage().nbytes()
            for v in {
                v.untyped_storage().data_ptr(): v for v in model.state_dict().values()
            }.values()
            if v.untyped_storage().data_ptr() in ptrs
        )
        assert held == shared


def test_basis_follows_the_base_layer_device_and_toy_shapes() -> None:
    model = adapt(
        Toy([(5, 7), (9, 3), (2, 11)]), VeraConfig(r=6, target_modules=["l0", "l1", "l2"])
    )
    basis = basis_of(model)
    assert basis.shape == (6, 9, 11)
    assert basis.A.device.type == "cpu"
    assert all(isinstance(m, VeraLinear) for _, m in model.adapter_layers())


def test_deepcopy_keeps_one_shared_basis_per_copy() -> None:
    import copy

    model, basis = _llama(r=8)
    clone = copy.deepcopy(model)
    clone_basis = basis_of(clone)
    assert clone_basis is not basis
    assert torch.equal(clone_basis.A, basis.A)
    assert all(layer.basis is clone_basis for _, layer in clone.adapter_layers())
    assert all(layer.basis is basis for _, layer in model.adapter_layers())


def test_dtype_cast_after_adapt_keeps_slices_zero_copy() -> None:
    model, _ = _llama(r=8)
    model.double()
    basis = basis_of(model)  # buffers were replaced by the cast; layers must see the new ones
    assert basis.A.dtype == torch.float64
    for _, layer in model.adapter_layers():
        a, b = layer.sliced_basis("default", torch.float64, torch.device("cpu"))
        assert a.data_ptr() == basis.A.data_ptr() and b.data_ptr() == basis.B.data_ptr()
    with torch.no_grad():
        assert model(input_ids=input_ids()).logits.dtype == torch.float64
