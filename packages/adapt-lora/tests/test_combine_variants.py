"""``add_weighted_adapter`` beyond plain LoRA factors: LoRA biases and DoRA magnitudes combine by
task arithmetic; the low-rank ``svd`` route equals the dense SVD; half precision and autocast."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

transformers = pytest.importorskip("transformers")

from lora_testutils import ids, max_diff, tiny_llama  # noqa: E402

from adapt.core import AdaptedModel, adapt  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402
from adapt.lora.combine_math import lowrank_svd_factors, svd_factors  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def logits(model: nn.Module, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids(), **kw).logits
    return out.float()


def trained_like(model: AdaptedModel, seed: int) -> None:
    """Random values in every adapter tensor (magnitudes moved off their initial norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=gen))
            elif "lora_B" in name and name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def dora_pair(**kw: Any) -> AdaptedModel:
    torch.manual_seed(0)
    base: dict[str, Any] = dict(target_modules=TARGETS, init_lora_weights=False, use_dora=True)
    model = adapt(tiny_llama(), LoraConfig(r=4, lora_alpha=8, **base, **kw))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, **base, **kw))
    trained_like(model, 1)
    return model


def row_norms(layer: Any) -> torch.Tensor:
    weight = layer.get_base_layer().weight
    return weight.detach().norm(dim=1)


# ---------------------------------------------------------------------------- DoRA


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.8, -0.5]])
def test_dora_magnitudes_combine_by_task_arithmetic(weights: list[float]) -> None:
    model = dora_pair()
    model.add_weighted_adapter(["default", "b"], weights, "mix", combination_type="cat")
    assert model.peft_config["mix"].use_dora
    for _, layer in model.adapter_layers():
        mags = layer.variant_tensors("lora_magnitude_vector")
        m0 = row_norms(layer)
        expected = m0 + sum(
            w * (mags[n] - m0) for n, w in zip(["default", "b"], weights, strict=True)
        )
        assert max_diff(mags["mix"], expected) < 1e-5
        expected_delta = weights[0] * layer.delta_weight("default")
        expected_delta = expected_delta + weights[1] * layer.delta_weight("b")
        assert max_diff(layer.delta_weight("mix"), expected_delta) < 1e-6


def test_a_dora_adapter_combined_with_itself_is_itself() -> None:
    model = dora_pair()
    model.set_adapter("default")
    expected = logits(model)
    model.add_weighted_adapter(["default", "default"], [0.5, 0.5], "same", "cat")
    model.set_adapter("same")
    assert max_diff(logits(model), expected) < 1e-5  # PEFT's magnitude ‖W‖ would change it


def test_combined_dora_adapter_merges_and_reloads(tmp_path: Any) -> None:
    model = dora_pair()
    model.add_weighted_adapter(["default", "b"], [0.6, 0.4], "mix", "svd", svd_rank=3)
    model.set_adapter("mix")
    expected = logits(model)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    reloaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "mix")
    assert max_diff(logits(reloaded), expected) < 1e-5
    assert max_diff(logits(reloaded.merge_and_unload()), expected) < 1e-4


# ---------------------------------------------------------------------------- LoRA biases


def bias_pair() -> AdaptedModel:
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(target_modules=TARGETS, init_lora_weights=False)
    model = adapt(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_bias=True, **kw))
    model.add_adapter("plain", LoraConfig(r=4, lora_alpha=4, **kw))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=6, lora_bias=True, use_rslora=True, **kw))
    trained_like(model, 2)
    return model


def adapter_effect(layer: Any, name: str, x: torch.Tensor) -> torch.Tensor:
    """The adapter's own term in the layer's output: s·(B A x + b)."""
    a, b = layer.lora_A[name], layer.lora_B[name]
    out: torch.Tensor = b(a(x)) * layer.scaling[name]
    return out


@pytest.mark.parametrize("kind", ["cat", "svd", "linear"])
def test_lora_biases_add_up_weighted_and_scaled(kind: str) -> None:
    model = bias_pair()
    names, weights = ["default", "plain"], [0.9, -0.6]
    if kind == "svd":
        names, weights = ["default", "plain", "b"], [0.9, -0.6, 0.4]
    model.add_weighted_adapter(names, weights, "mix", kind, svd_rank=12)
    assert model.peft_config["mix"].lora_bias
    x = torch.randn(5, 64)
    for _, layer in model.adapter_layers():
        if layer.in_features != 64:
            continue
        bias = layer.lora_B["mix"].bias
        expected = sum(
            w * layer.scaling[n] * layer.lora_B[n].bias
            for n, w in zip(names, weights, strict=True)
            if layer.lora_B[n].bias is not None
        )
        assert max_diff(bias, expected) < 1e-6
        if kind != "linear":  # cat and full-rank svd: the whole term is the weighted sum
            want = sum(w * adapter_effect(layer, n, x) for n, w in zip(names, weights, strict=True))
            assert max_diff(adapter_effect(layer, "mix", x), want) < 1e-5


def test_combined_lora_bias_merges_into_the_base_bias() -> None:
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(target_modules=["c_attn"], init_lora_weights=False, lora_bias=True)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    )
    model = adapt(gpt2.eval(), LoraConfig(r=4, **kw))
    model.add_adapter("b", LoraConfig(r=4, **kw))
    trained_like(model, 3)
    model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", "cat")
    model.set_adapter("mix")
    expected = logits(model)
    assert max_diff(logits(model.merge_and_unload()), expected) < 1e-4


# ---------------------------------------------------------------------------- the low-rank route


@settings(max_examples=30, deadline=None)
@given(
    out=st.integers(2, 40),
    inner=st.integers(2, 40),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    keep=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_lowrank_route_is_the_svd_of_the_product(
    out: int, inner: int, ranks: list[int], keep: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    total = sum(ranks)
    b_cat = torch.randn(out, total, generator=gen)
    a_cat = torch.randn(total, inner, generator=gen)
    delta = b_cat @ a_cat
    rank = min(keep, out, inner)
    got = lowrank_svd_factors(b_cat, a_cat, rank, None, None)
    if rank > min(out, inner, total):
        assert got is None  # the dense SVD pads with zero directions; the route says so
        return
    assert got is not None
    b, a = got
    s = torch.linalg.svdvals(delta.double())
    scale = s[0].item()
    # the retained singular values are the product's, and the factors are orthogonal
    assert torch.allclose(b.double().norm(dim=0), s[:rank], atol=1e-4 * scale)
    assert torch.allclose(a @ a.T, torch.eye(rank), atol=1e-4)
    if rank >= min(out, inner, total) or s[rank - 1] > 1.01 * s[rank]:
        dense_b, dense_a = svd_factors(delta, rank, None, True, None)
        assert max_diff(b @ a, dense_b @ dense_a) < 1e-4 * scale


def test_svd_type_equals_the_dense_route_on_a_convolution() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    kw: dict[str, Any] = dict(target_modules=["0", "2"], init_lora_weights=False)
    model = adapt(conv, LoraConfig(r=3, **kw))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=5, **kw))
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix", "svd", svd_rank=5)
    for _, layer in model.adapter_layers():
        want = 0.7 * layer.delta_weight("default") + 0.3 * layer.delta_weight("b")
        assert max_diff(layer.delta_weight("mix"), want) < 1e-5  # rank 5 = the sum: exact


# ---------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_combines_and_runs(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(target_modules=TARGETS, init_lora_weights=False, lora_bias=True)
    model = adapt(tiny_llama().to(dtype), LoraConfig(r=4, **kw))
    model.add_adapter("b", LoraConfig(r=4, use_dora=False, **kw))
    trained_like(model, 4)
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix", "svd", svd_rank=8)
    for _, layer in model.adapter_layers():
        # the adapters keep their own dtype (float32 on a half base, as PEFT's autocast)
        assert layer.lora_A["mix"].weight.dtype == layer.lora_A["default"].weight.dtype
        assert layer.get_base_layer().weight.dtype == dtype
        want = 0.7 * layer.delta_weight("default").float() + 0.3 * layer.delta_weight("b").float()
        got = layer.delta_weight("mix").float()
        assert max_diff(got, want) < 1e-5 * want.abs().max().item() + 1e-6
    model.set_adapter("mix")
    assert torch.isfinite(logits(model)).all()


def test_combined_dora_adapter_under_bf16_autocast() -> None:
    model = dora_pair()
    model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", "cat")
    model.set_adapter("mix")
    exact = logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logits(model)
    assert max_diff(got, exact) < 5e-2 * exact.abs().max().item()
