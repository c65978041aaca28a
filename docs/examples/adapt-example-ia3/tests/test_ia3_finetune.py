"""End to end: IA³ fine-tuning of a tiny Llama through adapt's public API (the method and the
layer are found through their entry points), then save, load and merge."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from adapt_example_ia3 import IA3Config, IA3Linear
from ia3_testutils import logits, max_diff

from adapt.core import AdaptedModel, adapt
from adapt.core.testing import tiny_llama, token_ids


def finetune(model: torch.nn.Module, batch: torch.Tensor, steps: int = 40) -> list[float]:
    """AdamW on the causal-LM loss of one fixed batch (learn to continue it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_finetune_save_load_merge(tmp_path: Path) -> None:
    batch = token_ids(4, 16, seed=3)
    base_state = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    # every linear layer but the head; down_proj feed-forward (PEFT's default for Llama)
    model = adapt(tiny_llama(), IA3Config(target_modules="all-linear"))

    layers = dict(model.adapter_layers())
    assert len(layers) == 7 * 2 and all(type(layer) is IA3Linear for layer in layers.values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".ia3_l." in n for n in trainable), trainable
    n_trainable, n_total = model.trainable_parameters()
    assert n_trainable < n_total / 50
    # per decoder layer: q, o (64, 1); k, v (32, 1); gate, up (128, 1); down (1, 128)
    assert n_trainable == 2 * (64 + 64 + 32 + 32 + 128 + 128 + 128)

    losses = finetune(model, batch)
    assert losses[-1] < 0.95 * losses[0], (losses[0], losses[-1])
    # only the vectors learned
    for key, value in model.model.state_dict().items():
        if "ia3_l" not in key:
            torch.testing.assert_close(value, base_state[key.replace(".base_layer", "")])
    tuned = logits(model, batch)

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]

    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    assert max_diff(logits(loaded, batch), tuned) <= 1e-6
    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, IA3Linear) for m in merged.modules())
    assert max_diff(logits(merged, batch), tuned) <= 1e-4
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(merged.state_dict()[key], base_state[key])
