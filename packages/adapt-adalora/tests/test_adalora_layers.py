"""The SVD-form layer against its definition, merge/unmerge, Conv1D, the regulariser."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from adalora_testutils import LLAMA_TARGETS, gpt2, ids, llama
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adapt.adalora import AdaLoraConfig, AdaLoraLayer, SVDLinear, orthogonal_regulariser
from adapt.core import AdaptedModel, AdapterStateError, ConfigError, adapt
from adapt.core.testing import randomise_adapters
from adapt.lora import LoraConfig


def config(**kw: object) -> AdaLoraConfig:
    base: dict[str, object] = {
        "init_r": 6,
        "target_r": 3,
        "total_step": 50,
        "target_modules": LLAMA_TARGETS,
        "lora_alpha": 12,
    }
    base.update(kw)
    return AdaLoraConfig(**base)  # type: ignore[arg-type]


def logits(model: nn.Module, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids(), **kw).logits  # type: ignore[no-any-return]


def test_starts_as_identity() -> None:
    base = llama().eval()
    want = logits(base)
    model = adapt(copy.deepcopy(base), config()).eval()
    assert torch.equal(logits(model), want)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SVDLinear)
    assert layer.lora_A["default"].shape == (6, 64)
    assert layer.lora_E["default"].shape == (6, 1)
    assert layer.lora_B["default"].shape == (64, 6)
    assert torch.all(layer.lora_E["default"] == 0)


@pytest.mark.parametrize("factory", [llama, gpt2], ids=["llama", "gpt2-conv1d"])
def test_output_is_the_svd_form_definition(factory: object) -> None:
    targets = LLAMA_TARGETS if factory is llama else ["c_attn", "c_proj", "c_fc"]
    model = adapt(factory(), config(target_modules=targets)).eval()  # type: ignore[operator]
    randomise_adapters(model)
    for _, layer in model.adapter_layers():
        assert isinstance(layer, AdaLoraLayer)
        a, e, b = (getattr(layer, n)["default"] for n in ("lora_A", "lora_E", "lora_B"))
        want = b @ torch.diag(e.view(-1)) @ a * 12 / (6 + 1e-5)
        torch.testing.assert_close(layer.delta_weight("default"), want)
        x = torch.randn(3, layer.in_features)
        base_w = layer.backend.get_weight(layer.base_layer)
        bias = getattr(layer.base_layer, "bias", None)
        with torch.no_grad():
            got = layer(x)
        ref = x @ (base_w + want).T + (0 if bias is None else bias)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_merge_equals_unmerged_and_unmerge_restores() -> None:
    model = adapt(llama(), config()).eval()
    randomise_adapters(model)
    weights = {p: lay.base_layer.weight.detach().clone() for p, lay in model.adapter_layers()}
    unmerged = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for path, layer in model.adapter_layers():
        torch.testing.assert_close(layer.base_layer.weight, weights[path], atol=1e-6, rtol=0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), unmerged, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    n_in=st.integers(1, 24),
    n_out=st.integers(1, 24),
    init_r=st.integers(1, 8),
    alpha=st.floats(0.5, 32),
    seed=st.integers(0, 2**16),
)
def test_merge_unmerge_property(
    n_in: int, n_out: int, init_r: int, alpha: float, seed: int
) -> None:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(n_in, n_out))
    cfg = AdaLoraConfig(
        init_r=init_r, target_r=1, total_step=10, lora_alpha=alpha, target_modules=["0"]
    )
    model = adapt(net, cfg)
    x = torch.randn(5, n_in)
    with torch.no_grad():
        assert torch.equal(model(x), net[0].base_layer(x))  # identity at init
    randomise_adapters(model, seed=seed)
    weight = net[0].base_layer.weight.detach().clone()
    with torch.no_grad():
        before = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
    torch.testing.assert_close(net[0].base_layer.weight, weight, atol=1e-5, rtol=0)


def test_orthogonal_regulariser_value_and_loss() -> None:
    model = adapt(llama(), config(orth_reg_weight=0.25))
    layers = [layer for _, layer in model.adapter_layers()]
    with torch.no_grad():  # orthonormal rows of A and columns of B: regulariser is zero
        for layer in layers:
            q, _ = torch.linalg.qr(torch.randn(layer.in_features, 6))
            layer.lora_A["default"].copy_(q.T)
            q, _ = torch.linalg.qr(torch.randn(layer.out_features, 6))
            layer.lora_B["default"].copy_(q)
    assert orthogonal_regulariser(model, "default").item() < 1e-5
    randomise_adapters(model)
    reg = orthogonal_regulariser(model, "default")
    manual = []
    for layer in layers:
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        manual.append(torch.linalg.norm(a @ a.T - torch.eye(6)))
        manual.append(torch.linalg.norm(b.T @ b - torch.eye(6)))
    torch.testing.assert_close(reg, torch.stack(manual).mean())
    batch = ids()
    with torch.no_grad():
        plain = model.model(input_ids=batch, labels=batch).loss
        with_reg = model(input_ids=batch, labels=batch).loss
    torch.testing.assert_close(with_reg, plain + 0.25 * reg.detach(), rtol=1e-6, atol=1e-6)
    # the regulariser has gradients for A and B
    reg.backward()
    assert all(layer.lora_A["default"].grad is not None for layer in layers)


def test_no_regulariser_without_labels_or_when_loaded_for_inference(tmp_path: Path) -> None:
    model = adapt(llama(), config())
    randomise_adapters(model)
    out = model(input_ids=ids())
    assert out.loss is None
    model.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(llama(), tmp_path)
    batch = ids()
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=batch, labels=batch).loss,
            loaded.model(input_ids=batch, labels=batch).loss,
        )


def test_only_one_trainable_adalora_adapter() -> None:
    model = adapt(llama(), config())
    before = [n for n, _ in model.named_parameters()]
    with pytest.raises(ConfigError, match="one AdaLoRA adapter at a time"):
        model.add_adapter("second", config())
    assert [n for n, _ in model.named_parameters()] == before
    model.add_adapter("frozen", config(inference_mode=True))
    assert "frozen" in model.peft_config


def test_update_and_allocate_needs_adalora() -> None:
    model = adapt(llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(AdapterStateError, match="AdaLoRA"):
        model.update_and_allocate(0)


def test_negative_rank_is_refused() -> None:
    layer = SVDLinear(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="non-negative"):
        layer.update_layer("x", config(), r=-1)


def test_add_delta_weight_and_no_grad_forward_over_many_rows() -> None:
    from adapt.adalora import AdaLoraConfig as _Config
    from adapt.core import adapt as _adapt

    torch.manual_seed(0)
    model = _adapt(
        nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 32)),
        _Config(init_r=4, target_r=2, total_step=10, target_modules=["0", "1"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_()
    model.eval()
    layer = model.model[0]
    w = layer.base_layer.weight
    torch.testing.assert_close(
        layer.add_delta_weight(w, "default"), w + layer.delta_weight("default")
    )
    x = torch.randn(4, 64, 32)
    with_grad = model(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), with_grad.detach(), rtol=1e-5, atol=1e-5)


def test_orthogonal_regulariser_gradients_equal_the_per_matrix_definition() -> None:
    """Stacked by shape (the tiny Llama's layers have several), the regulariser's gradients
    are the per-matrix sum's."""
    model = adapt(llama(), config(orth_reg_weight=0.25))
    randomise_adapters(model)
    layers = [layer for _, layer in model.adapter_layers()]
    params = [p for layer in layers for p in (layer.lora_A["default"], layer.lora_B["default"])]
    assert len({p.shape for p in params}) > 2
    got = torch.autograd.grad(orthogonal_regulariser(model, "default"), params)
    manual = []
    for layer in layers:
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        manual.append(torch.linalg.norm(a @ a.T - torch.eye(a.shape[0])))
        manual.append(torch.linalg.norm(b.T @ b - torch.eye(b.shape[1])))
    want = torch.autograd.grad(torch.stack(manual).mean(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
