"""End to end: LoRA fine-tuning of a small model made of GatedLinear layers, through adapt's
public API only (the plugin is found through its entry points)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from adapt_gated_linear import GatedLinear, GatedLoraLinear
from safetensors.torch import load_file
from torch import nn

from adapt.core import AdaptedModel, adapt
from adapt.lora import LoraConfig

TARGETS = ["up", "mid", "down"]


class GatedMLP(nn.Module):
    def __init__(self, n_in: int = 8, hidden: int = 32, n_out: int = 4) -> None:
        super().__init__()
        self.up = GatedLinear(n_in, hidden)
        self.mid = GatedLinear(hidden, hidden)
        self.down = GatedLinear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def make_model(seed: int = 0) -> GatedMLP:
    torch.manual_seed(seed)
    return GatedMLP()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the outputs of another GatedMLP: a task the frozen model cannot do."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 8, generator=gen)
    with torch.no_grad():
        y = make_model(seed=1)(x)
    return x, y


def finetune(model: nn.Module, steps: int = 300) -> list[float]:
    x, y = data()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_finetune_save_load_merge(tmp_path: Path) -> None:
    base_weights = {k: v.clone() for k, v in make_model().state_dict().items()}
    model = adapt(make_model(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))

    # the plugin's layer wraps every target; only LoRA tensors train
    layers = dict(model.adapter_layers())
    assert sorted(layers) == sorted(TARGETS)
    assert all(type(layer) is GatedLoraLinear for layer in layers.values())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    n_trainable, n_total = model.trainable_parameters()
    assert 0 < n_trainable < n_total / 2

    losses = finetune(model)
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])

    # the base weights (weight, bias, gate) did not move: only the adapter learned
    for key, value in model.model.state_dict().items():
        if "lora_" not in key:
            torch.testing.assert_close(value, base_weights[key.replace(".base_layer", "")])

    x, _ = data()
    with torch.no_grad():
        tuned = model(x)

    # PEFT's checkpoint format: adapter_config.json + adapter_model.safetensors
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    tensors = load_file(out / "adapter_model.safetensors")
    assert "base_model.model.up.lora_A.weight" in tensors
    assert tuple(tensors["base_model.model.mid.lora_B.weight"].shape) == (32, 4)
    assert len(tensors) == 2 * len(TARGETS)

    loaded = AdaptedModel.from_pretrained(make_model(), out)
    with torch.no_grad():
        reloaded = loaded(x)
    torch.testing.assert_close(reloaded, tuned, rtol=0, atol=1e-6)

    # merging folds ΔW into GatedLinear.weight (through the plugin's backend): same outputs
    merged = loaded.merge_and_unload()
    assert isinstance(merged, GatedMLP)
    assert all(type(m) is GatedLinear for m in (merged.up, merged.mid, merged.down))
    with torch.no_grad():
        after_merge = merged(x)
    torch.testing.assert_close(after_merge, tuned, rtol=0, atol=1e-5)
    assert not torch.allclose(merged.up.weight, base_weights["up.weight"])


def test_disable_and_unmerge_restore_the_base() -> None:
    x, _ = data()
    with torch.no_grad():
        base_out = make_model()(x)
    model = adapt(make_model(), LoraConfig(r=4, target_modules=TARGETS))
    finetune(model, steps=20)
    with torch.no_grad():
        tuned = model(x)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base_out, rtol=0, atol=1e-6)
        model.merge_adapter()
        torch.testing.assert_close(model(x), tuned, rtol=0, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), tuned, rtol=0, atol=1e-5)
        unloaded = model.unload()
        torch.testing.assert_close(unloaded(x), base_out, rtol=0, atol=1e-5)
