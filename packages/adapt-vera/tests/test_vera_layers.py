"""VeRA layers on nn.Linear and transformers Conv1D of mixed shapes: outputs against ΔW computed
by hand from the basis, identity init, merge / unmerge."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from vera_testutils import (
    GPT2_TARGETS,
    LLAMA_TARGETS,
    Toy,
    base_weights,
    basis_of,
    hand_delta,
    input_ids,
    randomise_lambdas,
    tiny_gpt2,
    tiny_llama,
)

from adapt.core import AdaptedModel, SharedBasis, adapt
from adapt.vera import VeraConfig, VeraLinear, VeraMethod

ATOL = 1e-5


def _check_layers_by_hand(model: AdaptedModel, adapter: str = "default") -> set[tuple[int, int]]:
    """Each layer's output equals base(x) + x @ ΔWᵀ; returns the (in, out) shapes seen."""
    basis = basis_of(model)
    shapes = set()
    g = torch.Generator().manual_seed(7)
    for path, layer in model.adapter_layers():
        assert isinstance(layer, VeraLinear), path
        x = torch.randn(2, 3, layer.in_features, generator=g)
        delta = hand_delta(layer, basis, adapter)
        assert delta.shape == (layer.out_features, layer.in_features)
        assert delta.abs().max() > 0, path
        with torch.no_grad():
            got = layer(x)
            want = layer.base_layer(x) + x @ delta.T
            torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5, msg=path)
            torch.testing.assert_close(layer.delta_weight(adapter), delta, atol=1e-6, rtol=1e-6)
        shapes.add((layer.in_features, layer.out_features))
    return shapes


# -- Llama (nn.Linear, GQA) ---------------------------------------------------------------------


def test_llama_each_layer_matches_delta_by_hand() -> None:
    model = adapt(tiny_llama(), VeraConfig(r=16, target_modules=LLAMA_TARGETS, init_weights=False))
    randomise_lambdas(model)
    shapes = _check_layers_by_hand(model)
    assert len(shapes) >= 3
    assert shapes == {(64, 64), (64, 32), (64, 128), (128, 64)}


def test_llama_init_weights_false_uses_lambda_b_one_and_random_lambda_d() -> None:
    model = adapt(tiny_llama(), VeraConfig(r=16, target_modules=LLAMA_TARGETS, init_weights=False))
    for _, layer in model.adapter_layers():
        assert torch.equal(layer.vera_lambda_b["default"], torch.ones(layer.out_features))
        assert layer.vera_lambda_d["default"].shape == (16,)
        assert layer.vera_lambda_d["default"].std() > 0
    _check_layers_by_hand(model)  # the un-randomised init gives a non-zero ΔW too


def test_llama_init_weights_true_is_identity() -> None:
    base = tiny_llama()
    ids = input_ids()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = adapt(
        copy.deepcopy(base), VeraConfig(r=16, target_modules=LLAMA_TARGETS, d_initial=0.3)
    )
    for _, layer in model.adapter_layers():
        assert torch.count_nonzero(layer.vera_lambda_b["default"]) == 0
        assert layer.vera_lambda_b["default"].shape == (layer.out_features,)
        assert torch.equal(layer.vera_lambda_d["default"], torch.full((16,), 0.3))
        assert torch.count_nonzero(layer.delta_weight("default")) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_llama_adapter_changes_output_and_disable_restores_base() -> None:
    base = tiny_llama()
    ids = input_ids()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = adapt(copy.deepcopy(base), VeraConfig(r=16, target_modules=LLAMA_TARGETS))
    randomise_lambdas(model)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        assert (adapted - expected).abs().max() > 1e-3
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_llama_merged_equals_unmerged_and_unmerge_restores() -> None:
    model = adapt(tiny_llama(), VeraConfig(r=16, target_modules=LLAMA_TARGETS))
    randomise_lambdas(model, seed=3)
    ids = input_ids()
    before = base_weights(model)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        assert all(layer.merged for _, layer in model.adapter_layers())
        for path, layer in model.adapter_layers():
            key = f"base_model.model.{path}.base_layer.weight"
            torch.testing.assert_close(
                layer.base_layer.weight,
                before[key] + hand_delta(layer, basis_of(model), "default"),
                atol=1e-6,
                rtol=0,
            )
        merged = model(input_ids=ids).logits
        torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
    after = base_weights(model)
    assert after.keys() == before.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)


def test_llama_merge_and_unload_gives_plain_model_with_same_output() -> None:
    model = adapt(tiny_llama(), VeraConfig(r=16, target_modules=LLAMA_TARGETS))
    randomise_lambdas(model, seed=4)
    ids = input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        plain = model.merge_and_unload()
        assert not any(isinstance(m, (VeraLinear, SharedBasis)) for m in plain.modules())
        assert VeraMethod.basis(model) is None
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_safe_merge_refuses_nan_and_leaves_weights() -> None:
    model = adapt(tiny_llama(), VeraConfig(r=8, target_modules=["q_proj", "down_proj"]))
    before = base_weights(model)
    layer = dict(model.adapter_layers())["model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        layer.vera_lambda_b["default"][0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        model.merge_adapter(safe_merge=True)
    assert not any(la.merged for _, la in model.adapter_layers())
    after = base_weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_dropout_is_applied_to_the_adapter_input_only_in_training() -> None:
    model = adapt(
        tiny_llama(),
        VeraConfig(r=8, target_modules=["q_proj"], vera_dropout=0.5, init_weights=False),
    )
    layer = dict(model.adapter_layers())["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer.vera_dropout["default"], nn.Dropout)
    x = torch.randn(4, 64)
    layer.eval()
    with torch.no_grad():
        want = layer.base_layer(x) + x @ hand_delta(layer, basis_of(model), "default").T
        torch.testing.assert_close(layer(x), want, atol=ATOL, rtol=1e-5)
        layer.train()
        torch.manual_seed(0)
        assert (layer(x) - want).abs().max() > 1e-4


def test_float64_base_gets_float64_adapter() -> None:
    model = adapt(
        tiny_llama().double(), VeraConfig(r=8, target_modules=LLAMA_TARGETS, init_weights=False)
    )
    for _, layer in model.adapter_layers():
        assert layer.vera_lambda_d["default"].dtype == torch.float64
    with torch.no_grad():
        assert model(input_ids=input_ids()).logits.dtype == torch.float64


def test_bfloat16_base_gets_float32_adapter_and_keeps_its_dtype() -> None:
    model = adapt(
        tiny_llama().to(torch.bfloat16),
        VeraConfig(r=8, target_modules=LLAMA_TARGETS, init_weights=False),
    )
    assert basis_of(model).A.dtype == torch.float32
    for _, layer in model.adapter_layers():
        assert layer.vera_lambda_b["default"].dtype == torch.float32
        assert layer.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(input_ids=input_ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("bias", ["vera_only", "all"])
def test_bias_training_options(bias: str) -> None:
    toy = Toy([(5, 7), (9, 3)])
    model = adapt(toy, VeraConfig(r=4, target_modules=["l0"], bias=bias))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = [
        "base_model.model.l0.base_layer.bias",
        "base_model.model.l0.vera_lambda_b.default",
        "base_model.model.l0.vera_lambda_d.default",
    ]
    if bias == "all":
        expected.insert(0, "base_model.model.l1.bias")
    assert sorted(trainable) == sorted(expected)
    saved = model.adapter_state_dict("default")
    assert "base_model.model.l0.base_layer.bias" in saved
    assert ("base_model.model.l1.bias" in saved) == (bias == "all")
    assert not any("weight" in k for k in saved)


# -- GPT-2 (transformers Conv1D) ----------------------------------------------------------------


def test_gpt2_conv1d_layers_match_delta_by_hand() -> None:
    model = adapt(tiny_gpt2(), VeraConfig(r=8, target_modules=GPT2_TARGETS, init_weights=False))
    randomise_lambdas(model, seed=5)
    shapes = _check_layers_by_hand(model)
    assert shapes == {(32, 96), (32, 32), (32, 128), (128, 32)}
    assert basis_of(model).shape == (8, 128, 128)
    for _, layer in model.adapter_layers():
        assert type(layer.base_layer).__name__ == "Conv1D"


def test_gpt2_fan_in_fan_out_flag_does_not_change_conv1d_results() -> None:
    """The weight backend knows Conv1D is transposed; PEFT's flag is accepted either way."""
    outs = []
    for flag in (False, True):
        model = adapt(
            tiny_gpt2(), VeraConfig(r=8, target_modules=GPT2_TARGETS, fan_in_fan_out=flag)
        )
        randomise_lambdas(model, seed=2)
        with torch.no_grad():
            outs.append(model(input_ids=input_ids(vocab_size=100)).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_gpt2_merge_unmerge_transposed_weights() -> None:
    model = adapt(tiny_gpt2(), VeraConfig(r=8, target_modules=GPT2_TARGETS))
    randomise_lambdas(model, seed=6)
    ids = input_ids(vocab_size=100)
    before = base_weights(model)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        for path, layer in model.adapter_layers():
            # Conv1D stores (in, out): the merged weight is W + ΔWᵀ
            key = f"base_model.model.{path}.base_layer.weight"
            torch.testing.assert_close(
                layer.base_layer.weight,
                before[key] + hand_delta(layer, basis_of(model), "default").T,
                atol=1e-6,
                rtol=0,
            )
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
    after = base_weights(model)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)


def test_linear_and_conv1d_mixed_in_one_model() -> None:
    from transformers.pytorch_utils import Conv1D

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(12, 20)
            self.conv = Conv1D(nf=7, nx=30)  # 30 -> 7, weight stored (30, 7)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    model = adapt(Mixed(), VeraConfig(r=5, target_modules=["lin", "conv"], init_weights=False))
    randomise_lambdas(model)
    assert basis_of(model).shape == (5, 30, 20)
    assert _check_layers_by_hand(model) == {(12, 20), (30, 7)}


# -- property: merge -> unmerge over random toy shapes ------------------------------------------

_shapes = st.lists(st.tuples(st.integers(1, 24), st.integers(1, 24)), min_size=1, max_size=4)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(shapes=_shapes, r=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_property_merge_unmerge_over_shapes_and_rank(
    shapes: list[tuple[int, int]], r: int, seed: int
) -> None:
    toy = Toy(shapes, seed=seed)
    names = [f"l{i}" for i in range(len(shapes))]
    model = adapt(toy, VeraConfig(r=r, target_modules=names, projection_prng_key=seed))
    basis = basis_of(model)
    assert basis.shape == (r, max(i for i, _ in shapes), max(o for _, o in shapes))
    randomise_lambdas(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(3, fan_in, generator=g) for fan_in, _ in shapes]
    before = {n: getattr(model.model, n).base_layer.weight.detach().clone() for n in names}
    with torch.no_grad():
        unmerged = model(xs)
        for name, x, y in zip(names, xs, unmerged, strict=True):
            layer = getattr(model.model, name)
            want = layer.base_layer(x) + x @ hand_delta(layer, basis, "default").T
            torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
        model.merge_adapter()
        merged = model(xs)
        for a, b in zip(merged, unmerged, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
    for name in names:
        layer = getattr(model.model, name)
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, before[name], atol=1e-5, rtol=0)
