"""LoRA, VeRA and AdaLoRA on a tiny Llama quantised by torchao (``quantize_``, weight-only int8
and int4): training, save / load, merge with its error report, unmerge, merge_and_unload."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchao_testutils import (
    BACKENDS,
    MAIN,
    ids,
    plain_parameters,
    quantised_llama,
    quantised_weights,
    rel,
)

from adapt.adalora import AdaLoraConfig
from adapt.core import AdaptedModel, adapt
from adapt.core.testing import randomise_adapters
from adapt.lora import LoraConfig
from adapt.vera import VeraConfig

TARGETS = ["q_proj", "v_proj", "down_proj"]
METHODS: dict[str, Callable[[], Any]] = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS),
    "vera": lambda: VeraConfig(r=16, target_modules=TARGETS),
    "adalora": lambda: AdaLoraConfig(
        init_r=6, target_r=3, tinit=2, tfinal=2, total_step=10, lora_alpha=12,
        target_modules=TARGETS,
    ),
}  # fmt: skip
#: VeRA trains two vectors per layer: a larger step
LEARNING_RATE = {"lora": 1e-2, "dora": 1e-2, "vera": 5e-2, "adalora": 1e-2}


def adapted(kind: str, method: str) -> AdaptedModel:
    """Seeded adapters whose update is about a fifth of the weight, as a trained one's."""
    model = adapt(quantised_llama(kind), METHODS[method]())
    # DoRA's magnitudes keep their values (the row norms): noise would make them arbitrary
    randomise_adapters(
        model, scale=0.03, where=lambda n, p: p.requires_grad and "magnitude" not in n
    )
    return model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits  # type: ignore[no-any-return]


def train(model: AdaptedModel, method: str, steps: int = 10) -> list[float]:
    model.train()
    x = ids()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LEARNING_RATE[method])
    losses = []
    for step in range(steps):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if method == "adalora":
            model.update_and_allocate(step)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", MAIN)
def test_adapters_train_on_the_quantised_model_and_only_they_change(kind: str, method: str) -> None:
    model = adapt(quantised_llama(kind), METHODS[method]())
    layers = [layer for _, layer in model.adapter_layers()]
    assert len(layers) == 6 and all(type(x.backend) is BACKENDS[kind] for x in layers)
    codes = quantised_weights(model)
    before = plain_parameters(model)
    losses = train(model, method)
    assert losses[-1] < 0.98 * losses[0], losses
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "vera_lambda" in n) for n in trainable)
    changed = {n for n, p in plain_parameters(model).items() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable, changed - trainable
    assert quantised_weights(model).keys() == codes.keys()
    for name, tensor in quantised_weights(model).items():
        assert torch.equal(tensor, codes[name]), name  # the quantised base is untouched


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", MAIN)
def test_save_and_load_give_the_same_outputs(kind: str, method: str, tmp_path: Path) -> None:
    model = adapted(kind, method)
    before = logits(model)
    model.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(quantised_llama(kind), tmp_path).eval()
    assert torch.equal(logits(loaded), before)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", MAIN)
def test_merge_reports_the_requantisation_error_and_stays_close(
    kind: str, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = adapted(kind, method)
    unmerged = logits(model)
    with model.disable_adapter():
        effect = rel(unmerged, logits(model))
    wanted = {}
    for path, layer in model.adapter_layers():
        dense = layer.backend.get_weight(layer.base_layer)
        if layer.merge_depends_on_weight():  # DoRA: W' = c ⊙ (W + ΔW), its test has the rest
            wanted[path] = layer.merged_weight(layer.active_adapters)
        else:
            wanted[path] = dense + sum(layer.delta_weight(n) for n in layer.active_adapters)
    with caplog.at_level(logging.INFO, logger="adapt"):
        report = model.merge_adapter()
    assert "requantisation changed the weights" in caplog.text
    assert report.lossy
    assert 0 < report.rel_error <= BACKENDS[kind].max_rel_error
    worst = max(
        rel(layer.backend.get_weight(layer.base_layer), wanted[path])
        for path, layer in model.adapter_layers()
    )
    assert report.rel_error == pytest.approx(worst, rel=1e-6)
    change = rel(logits(model), unmerged)
    print(
        f"{kind}/{method}: merge error {report.rel_error:.2%}, output change {change:.2%} "
        f"(the adapter's effect: {effect:.2%})"
    )
    assert change <= 2 * report.rel_error


@pytest.mark.parametrize("kind", MAIN)
def test_unmerge_warns_that_it_is_lossy(kind: str) -> None:
    model = adapted(kind, "lora")
    before = logits(model)
    weights = {p: x.backend.get_weight(x.base_layer) for p, x in model.adapter_layers()}
    model.merge_adapter()
    merge_error = {}
    for path, layer in model.adapter_layers():
        wanted = weights[path] + layer.delta_weight("default")
        merge_error[path] = (layer.backend.get_weight(layer.base_layer) - wanted).norm()
    with pytest.warns(UserWarning, match="lossy"):
        model.unmerge_adapter()
    bound = BACKENDS[kind].max_rel_error
    for path, layer in model.adapter_layers():
        assert not layer.merged
        # two requantisations: the merge's error, and the unmerge's, within the declared bound
        restored = layer.backend.get_weight(layer.base_layer)
        error = (restored - weights[path]).norm()
        assert 0 < error <= merge_error[path] + bound * weights[path].norm(), path
    assert rel(logits(model), before) <= 2 * bound


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", MAIN)
def test_merge_and_unload_leaves_a_quantised_llama_close_to_the_adapted_one(
    kind: str, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = adapted(kind, method)
    unmerged = logits(model)
    with caplog.at_level(logging.INFO, logger="adapt"):
        merged = model.merge_and_unload().eval()
    assert "requantisation changed the weights" in caplog.text
    assert not any("lora_" in n or "vera_" in n for n, _ in merged.named_parameters())
    backend = BACKENDS[kind]()
    linears = [m for m in merged.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 15
    assert all(type(m) is nn.Linear and backend.supports(m) for m in linears)
    change = rel(logits(merged), unmerged)
    assert change <= 2 * backend.max_rel_error, change
