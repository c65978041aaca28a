"""Several VeRA adapters on one model: one shared basis, one key, lower ranks sliced along r,
clear refusals that leave the model untouched, mixed batches, merging, deleting."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from vera_testutils import (
    LLAMA_TARGETS,
    base_weights,
    basis_of,
    hand_delta,
    input_ids,
    randomise_lambdas,
    tiny_llama,
)

from adapt.core import AdaptedModel, AdapterStateError, ConfigError, SharedBasis, adapt
from adapt.vera import VeraConfig, VeraLinear, VeraMethod


def _snapshot(model: AdaptedModel) -> dict[str, object]:
    """Everything a failed add must leave as it was."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ptrs": {k: v.data_ptr() for k, v in model.state_dict().items()},
        "layer_adapters": {p: list(la.adapter_names) for p, la in model.adapter_layers()},
        "layer_r": {p: dict(la.r) for p, la in model.adapter_layers()},
        "dropouts": {p: list(la.vera_dropout.keys()) for p, la in model.adapter_layers()},
        "peft_config": list(model.peft_config),
        "active": list(model.active_adapters),
        "basis_shape": basis_of(model).shape,
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
    }


def _assert_unchanged(model: AdaptedModel, snap: dict[str, object]) -> None:
    now = _snapshot(model)
    for key in ("modules", "ptrs", "layer_adapters", "layer_r", "dropouts", "peft_config"):
        assert now[key] == snap[key], key
    assert now["active"] == snap["active"]
    assert now["basis_shape"] == snap["basis_shape"]
    assert now["trainable"] == snap["trainable"]
    state = snap["state"]
    assert isinstance(state, dict)
    for key, value in now["state"].items():  # type: ignore[union-attr]
        assert torch.equal(value, state[key]), key


# -- the PRNG key -------------------------------------------------------------------------------


def test_second_adapter_with_another_key_is_refused_naming_both_keys() -> None:
    model = adapt(
        tiny_llama(), VeraConfig(r=8, target_modules=LLAMA_TARGETS, projection_prng_key=3)
    )
    snap = _snapshot(model)
    cfg = VeraConfig(r=8, target_modules=LLAMA_TARGETS, projection_prng_key=17)
    with pytest.raises(ConfigError) as info:
        model.add_adapter("b", cfg)
    msg = str(info.value)
    assert "3" in msg and "17" in msg
    assert "'default'" in msg and "'b'" in msg
    assert "projection_prng_key=3" in msg  # says what to do
    _assert_unchanged(model, snap)


def test_second_adapter_with_same_key_shares_the_basis() -> None:
    model = adapt(tiny_llama(), VeraConfig(r=8, target_modules=LLAMA_TARGETS))
    basis = basis_of(model)
    a_ptr = basis.A.data_ptr()
    model.add_adapter("b", VeraConfig(r=8, target_modules=["q_proj", "down_proj"]))
    assert basis_of(model) is basis and basis.A.data_ptr() == a_ptr
    assert sum(1 for m in model.modules() if isinstance(m, SharedBasis)) == 1
    layers = dict(model.adapter_layers())
    assert layers["model.layers.0.self_attn.q_proj"].adapter_names == ["default", "b"]
    assert layers["model.layers.0.self_attn.k_proj"].adapter_names == ["default"]
    for layer in layers.values():
        assert layer.basis is basis


# -- basis too small ----------------------------------------------------------------------------


def test_larger_rank_than_basis_is_refused_and_model_unchanged() -> None:
    model = adapt(tiny_llama(), VeraConfig(r=4, target_modules=LLAMA_TARGETS))
    snap = _snapshot(model)
    with pytest.raises(AdapterStateError) as info:
        model.add_adapter("b", VeraConfig(r=8, target_modules=["q_proj"]))
    msg = str(info.value)
    assert "'b'" in msg and "r=8" in msg and "r=4" in msg
    assert "Add the adapter with the largest rank and layers first" in msg
    _assert_unchanged(model, snap)
    # and the model still works afterwards
    model.add_adapter("c", VeraConfig(r=4, target_modules=["q_proj"]))
    assert "c" in model.peft_config


def test_larger_layers_than_basis_are_refused_and_model_unchanged() -> None:
    # first adapter only on k/v (64 -> 32): the basis is (r, 64, 32)
    model = adapt(tiny_llama(), VeraConfig(r=8, target_modules=["k_proj", "v_proj"]))
    assert basis_of(model).shape == (8, 64, 32)
    snap = _snapshot(model)
    with pytest.raises(AdapterStateError) as info:
        # overlaps k_proj (already adapted) and needs out=128 (gate/up) and in=128 (down)
        model.add_adapter("b", VeraConfig(r=8, target_modules=["k_proj", "gate_proj", "down_proj"]))
    msg = str(info.value)
    assert "in=128" in msg and "out=128" in msg and "in=64, out=32" in msg
    assert "largest rank and layers first" in msg
    _assert_unchanged(model, snap)
    assert not any(isinstance(m, VeraLinear) for n, m in model.named_modules() if "gate_proj" in n)


def test_largest_first_order_works() -> None:
    model = adapt(tiny_llama(), VeraConfig(r=8, target_modules=LLAMA_TARGETS))
    model.add_adapter("b", VeraConfig(r=8, target_modules=["k_proj", "v_proj"]))
    assert basis_of(model).shape == (8, 128, 128)


# -- lower rank: sliced along r ----------------------------------------------------------------


def _two_adapter_model() -> AdaptedModel:
    model = adapt(tiny_llama(), VeraConfig(r=16, target_modules=LLAMA_TARGETS, init_weights=False))
    model.add_adapter(
        "b", VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=False)
    )
    randomise_lambdas(model, seed=11)
    return model


def test_lower_rank_second_adapter_forward_uses_r_slice() -> None:
    model = _two_adapter_model()
    basis = basis_of(model)
    assert basis.shape == (16, 128, 128)
    model.set_adapter("b")
    g = torch.Generator().manual_seed(0)
    seen = 0
    for path, layer in model.adapter_layers():
        if "b" not in layer.adapter_names:
            continue
        seen += 1
        assert layer.r == {"default": 16, "b": 4}
        assert layer.vera_lambda_d["b"].shape == (4,)
        a, b = layer.sliced_basis("b", torch.float32, torch.device("cpu"))
        assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4)
        assert a.data_ptr() == basis.A.data_ptr()
        x = torch.randn(2, 5, layer.in_features, generator=g)
        with torch.no_grad():
            want = layer.base_layer(x) + x @ hand_delta(layer, basis, "b").T
            torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5, msg=path)
    assert seen == 6
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=input_ids()).logits).all()


def test_lower_rank_second_adapter_merges() -> None:
    model = _two_adapter_model()
    model.set_adapter("b")
    ids = input_ids()
    before = base_weights(model)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter(["b"])
        for path, layer in model.adapter_layers():
            key = f"base_model.model.{path}.base_layer.weight"
            expected = before[key]
            if "b" in layer.adapter_names:
                expected = expected + hand_delta(layer, basis_of(model), "b")
            torch.testing.assert_close(layer.base_layer.weight, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
    after = base_weights(model)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)


def test_merge_unmerge_with_two_adapters_active() -> None:
    model = _two_adapter_model()
    model.set_adapter(["default", "b"])
    ids = input_ids()
    before = base_weights(model)
    with torch.no_grad():
        both = model(input_ids=ids).logits
        model.set_adapter("default")
        only_default = model(input_ids=ids).logits
        assert (both - only_default).abs().max() > 1e-4  # b really contributes
        model.set_adapter(["default", "b"])
        model.merge_adapter()
        for _, layer in model.adapter_layers():
            assert sorted(layer.merged_adapters) == sorted(layer.adapter_names)
        torch.testing.assert_close(model(input_ids=ids).logits, both, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
        assert not any(la.merged for _, la in model.adapter_layers())
        torch.testing.assert_close(model(input_ids=ids).logits, both, atol=1e-5, rtol=1e-5)
    after = base_weights(model)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)


def test_mixed_batch_equals_per_sample_results() -> None:
    model = _two_adapter_model()
    ids = input_ids(batch=5)
    names = ["default", "b", "__base__", "b", "default"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        per_adapter = {}
        for name in ("default", "b"):
            model.set_adapter(name)
            per_adapter[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            per_adapter["__base__"] = model(input_ids=ids).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], per_adapter[name][i], atol=1e-5, rtol=1e-5)
    # the three routes really differ, so the comparison above is meaningful
    assert (per_adapter["default"] - per_adapter["b"]).abs().max() > 1e-4
    assert (per_adapter["b"] - per_adapter["__base__"]).abs().max() > 1e-4


def test_mixed_batch_refuses_merged_adapters() -> None:
    model = _two_adapter_model()
    model.merge_adapter(["default"])
    with pytest.raises(AdapterStateError, match="unmerge_adapter"):
        model(input_ids=input_ids(batch=2), adapter_names=["default", "b"])


# -- deleting ----------------------------------------------------------------------------------


def test_delete_keeps_basis_while_an_adapter_remains_and_removes_it_after_the_last() -> None:
    model = _two_adapter_model()
    basis = basis_of(model)
    model.delete_adapter("default")
    assert VeraMethod.basis(model) is basis
    assert basis.shape == (16, 128, 128)  # unchanged though the remaining adapter is smaller
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=input_ids()).logits).all()
    model.delete_adapter("b")
    assert VeraMethod.basis(model) is None
    assert not any(isinstance(m, (SharedBasis, VeraLinear)) for m in model.modules())
    assert not any("vera" in k for k in model.state_dict())
    assert all(type(m) is not VeraLinear and not hasattr(m, "_basis") for m in model.modules())


def test_after_deleting_the_last_adapter_a_new_key_and_size_are_allowed() -> None:
    model = adapt(tiny_llama(), VeraConfig(r=4, target_modules=["k_proj"], projection_prng_key=1))
    model.delete_adapter("default")
    model.add_adapter("x", VeraConfig(r=8, target_modules=LLAMA_TARGETS, projection_prng_key=2))
    basis = basis_of(model)
    assert basis.shape == (8, 128, 128) and basis.seed == 2


def test_unload_removes_basis_and_returns_plain_model() -> None:
    model = _two_adapter_model()
    plain = model.unload()
    assert not any(isinstance(m, (SharedBasis, VeraLinear)) for m in plain.modules())
    assert VeraMethod.basis(model) is None
    assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)


def test_config_versus_state_conflicts_are_value_errors_as_in_peft() -> None:
    """PEFT raises these as ValueError; migrated `except ValueError` code must keep catching."""
    model = adapt(tiny_llama(), VeraConfig(r=4, target_modules=LLAMA_TARGETS))
    with pytest.raises(ValueError, match="largest rank"):  # a basis too small
        model.add_adapter("b", VeraConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="projection_prng_key"):  # another PRNG key
        model.add_adapter("c", VeraConfig(r=4, projection_prng_key=7, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no adapter named"):
        model.set_adapter("missing")
    with pytest.raises(ValueError, match="unknown adapters"):
        model(input_ids=torch.ones(2, 4, dtype=torch.long), adapter_names=["default", "nope"])
