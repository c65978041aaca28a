"""DoRA (QDoRA) on real bitsandbytes 8-bit and 4-bit layers: forward against the definition
with the dequantised weight, gradients, training, save/load, merge with its error report,
unmerge, mixed batches (QDoRA on a transformers model loaded with ``BitsAndBytesConfig``:
test_bnb_transformers.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bnb_testutils import KINDS, MAIN_KINDS, base_error, layer_inputs, quantised_net

from adapt.core import AdaptedModel, adapt
from adapt.lora import LoraConfig
from adapt.lora.layer import LoraLayer


def adapted(kind: str, **kwargs: object) -> AdaptedModel:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["up", "down"],
        **kwargs,  # type: ignore[arg-type]
    )
    model = adapt(quantised_net(kind), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def x_batch(seed: int = 3) -> torch.Tensor:
    return torch.randn(6, 64, generator=torch.Generator().manual_seed(seed))


def definition(layer: LoraLayer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """c ⊙ (x (W + ΔW)ᵀ) + b with W the dequantised weight, c = m / ‖W + ΔW‖."""
    base = layer.base_layer
    weight = layer.backend.get_weight(base).float() + layer.delta_weight(name).float()
    c = layer.lora_magnitude_vector[name].float() / weight.norm(dim=1)
    bias = base.bias.float() if base.bias is not None else 0
    return c * (x.float() @ weight.t()) + bias


@pytest.mark.parametrize("kind", [*MAIN_KINDS, "nf4-dq"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_matches_the_definition_on_the_dequantised_weight(kind: str, mode: str) -> None:
    model = adapted(kind)
    model.train(mode == "train")
    x = x_batch()
    inputs = layer_inputs(model, x)
    for path, layer in model.adapter_layers():
        assert isinstance(layer, LoraLayer)
        inp = inputs[id(layer)]
        with torch.no_grad():
            got = layer(inp)
            want = definition(layer, inp)
        c = (
            layer.lora_magnitude_vector["default"].abs().max().item()
            / layer.backend.get_weight(layer.base_layer).float().norm(dim=1).min().item()
        )
        own = base_error(layer, inp)
        err = float((got.float() - want).abs().max())
        assert err <= 2 * c * own + 1e-4, f"{kind} {path}: {err:.3g} vs bnb's own {own:.3g}"
        # DoRA moves the output well beyond that tolerance, so the check has teeth
        plain = layer.base_layer(inp).float()
        assert (want - plain).abs().max().item() > 3 * (2 * c * own + 1e-4)


@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_gradients_reach_only_adapter_tensors_and_training_reduces_the_loss(kind: str) -> None:
    model = adapted(kind, lora_dropout=0.1)
    model.train()
    x = x_batch()
    target = torch.randn(6, 64, generator=torch.Generator().manual_seed(9))
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p.shape == (128,) for p in params)  # the up layer's magnitudes
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_save_load_round_trip(kind: str, tmp_path: Path) -> None:
    model = adapted(kind).eval()
    x = x_batch()
    with torch.no_grad():
        before = model(x)
    model.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(quantised_net(kind), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(before, loaded(x))


@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_merge_reports_its_error_and_unmerge_restores_within_it(kind: str) -> None:
    model = adapted(kind).eval()
    x = x_batch()
    before = {
        p: layer.backend.get_weight(layer.base_layer).clone() for p, layer in model.adapter_layers()
    }
    with torch.no_grad():
        unmerged = model(x)
        report = model.merge_adapter()
        merged = model(x)
    assert report.lossy and report.rel_error > 0
    bound = 0.02 if KINDS[kind]["bits"] == 8 else 0.25
    rel = ((merged - unmerged).norm() / unmerged.norm()).item()
    assert rel < bound, rel
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.unmerge_adapter()
    assert any("lossy" in str(w.message) for w in seen)
    for path, layer in model.adapter_layers():
        now = layer.backend.get_weight(layer.base_layer)
        assert ((now - before[path]).norm() / before[path].norm()).item() < 2 * bound, path
    print(f"{kind}: merged vs unmerged output {rel:.2%}, merge error {report.rel_error:.2%}")


@pytest.mark.parametrize("kind", ["8bit", "nf4"])
def test_merge_and_unload_gives_a_quantised_model_with_the_outputs(kind: str) -> None:
    model = adapted(kind).eval()
    x = x_batch()
    with torch.no_grad():
        unmerged = model(x)
    plain = model.merge_and_unload().eval()
    assert type(plain.up).__name__ == ("Linear8bitLt" if kind == "8bit" else "Linear4bit")
    with torch.no_grad():
        out = plain(x)
    rel = ((out - unmerged).norm() / unmerged.norm()).item()
    assert torch.isfinite(out).all() and rel < (0.05 if kind == "8bit" else 0.5), rel


@pytest.mark.parametrize("kind", ["8bit", "nf4"])
def test_mixed_batch_with_dora_and_lora_adapters(kind: str) -> None:
    model = adapted(kind).eval()
    model.add_adapter(
        "lora", LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False)
    )
    x = x_batch()
    names = ["default", "lora", "__base__", "default", "lora", "__base__"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model(x[i : i + 1])
            else:
                model.set_adapter(name)
                single = model(x[i : i + 1])
            assert (mixed[i : i + 1] - single).abs().max().item() <= 1e-5, (i, name)
