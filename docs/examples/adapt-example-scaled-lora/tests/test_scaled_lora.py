"""The variant "scaled" on every LoRA layer type: the definition, training, merging, saving,
and the refusals of its options."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from adapt_example_scaled_lora import DEFAULT_GATE_INIT, ScaledLora
from safetensors.torch import load_file
from torch import nn

from adapt.core import AdaptedModel, ConfigError, adapt
from adapt.lora import LoraConfig, LoraLayer

GATE = 2.5


class Host(nn.Module):
    """A one-module model: ``target`` is the layer under test."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.target(x)
        return out


def linear() -> nn.Module:
    return nn.Linear(12, 9)


def conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf=9, nx=12)  # GPT-2's layer: weight stored (in, out)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)  # Conv1D starts with a zero bias
    module: nn.Module = layer
    return module


def embedding() -> nn.Module:
    return nn.Embedding(20, 9)


def conv2d() -> nn.Module:
    return nn.Conv2d(3, 5, 3, padding=1)


#: layer type → (base module, input, adapt-lora's layer class name)
LAYERS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str]] = {
    "linear": (linear, lambda: torch.randn(5, 12), "LoraLinear"),
    "conv1d": (conv1d, lambda: torch.randn(2, 4, 12), "LoraLinear"),
    "embedding": (embedding, lambda: torch.randint(0, 20, (3, 7)), "LoraEmbedding"),
    "conv2d": (conv2d, lambda: torch.randn(2, 3, 6, 6), "LoraConv"),
}


def config(**kwargs: object) -> LoraConfig:
    # init_lora_weights=False: B is random, so the adapter changes the output
    base = {"r": 3, "target_modules": ["target"], "variant": "scaled", "init_lora_weights": False}
    return LoraConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def build(kind: str, seed: int = 0, **kwargs: object) -> tuple[AdaptedModel, LoraLayer]:
    make_base = LAYERS[kind][0]
    if kind == "conv1d":
        pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = adapt(Host(make_base()), config(**kwargs))
    layer = model.model.target
    assert isinstance(layer, LoraLayer)
    assert type(layer).__name__ == LAYERS[kind][2]  # adapt-lora's own layer, not a subclass
    return model, layer


def make_input(kind: str) -> torch.Tensor:
    torch.manual_seed(1)
    return LAYERS[kind][1]()


def set_gate(layer: LoraLayer, value: float, adapter_name: str = "default") -> None:
    with torch.no_grad():
        layer.lora_gate[adapter_name].fill_(value)


KINDS = list(LAYERS)


@pytest.mark.parametrize("kind", KINDS)
def test_output_is_base_plus_gate_times_plain_lora(kind: str) -> None:
    model, layer = build(kind)
    model.eval()
    x = make_input(kind)
    assert isinstance(layer.lora_variant["default"], ScaledLora)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        set_gate(layer, 1.0)
        plain = model(x) - base  # the same adapter with g = 1: plain LoRA
        set_gate(layer, GATE)
        gated = model(x) - base
    assert plain.abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(gated, GATE * plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gate_one_is_exactly_plain_lora(kind: str) -> None:
    """With g = 1 the variant computes what plain LoRA does with the same A and B."""
    scaled, scaled_layer = build(kind)
    torch.manual_seed(0)
    plain = adapt(
        Host(LAYERS[kind][0]()),
        LoraConfig(r=3, target_modules=["target"], init_lora_weights=False),
    )
    plain.load_state_dict(
        {k: v for k, v in scaled.state_dict().items() if "lora_gate" not in k}, strict=True
    )
    set_gate(scaled_layer, 1.0)
    x = make_input(kind)
    with torch.no_grad():
        torch.testing.assert_close(scaled.eval()(x), plain.eval()(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv2d"])
def test_definition_holds_with_dropout_in_training(kind: str) -> None:
    """Training mode, lora_dropout > 0: the gate scales the dropped-out LoRA path (an
    embedding's LoRA has no dropout, as in PEFT, and its token ids must not get any)."""
    model, layer = build(kind, lora_dropout=0.5)
    model.train()
    x = make_input(kind)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        set_gate(layer, 1.0)
        torch.manual_seed(7)
        plain = model(x) - base
        set_gate(layer, GATE)
        torch.manual_seed(7)  # the same dropout mask
        gated = model(x) - base
    torch.testing.assert_close(gated, GATE * plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gate_is_trainable_and_gets_a_gradient(kind: str) -> None:
    model, layer = build(kind)
    model.train()
    gate = layer.lora_gate["default"]
    assert gate.shape == (1,) and gate.requires_grad
    assert gate.item() == DEFAULT_GATE_INIT
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.target.lora_gate.default" in trainable
    x = make_input(kind)
    # dL/dg = <dL/dout, plain LoRA contribution> = sum(plain) for L = sum(out)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        plain = model(x) - base  # g = 1
    model(x).sum().backward()
    assert gate.grad is not None
    torch.testing.assert_close(gate.grad, plain.sum().reshape(1), rtol=1e-4, atol=1e-5)
    optimiser = torch.optim.SGD([gate], lr=0.1)
    optimiser.step()
    assert gate.item() != DEFAULT_GATE_INIT


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_unmerged_and_unmerge_restores(kind: str) -> None:
    model, layer = build(kind)
    model.eval()
    set_gate(layer, GATE)
    x = make_input(kind)
    weight = layer.backend.get_weight(layer.base_layer).detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        assert layer.merged_adapters == ["default"]
        merged_weight = layer.backend.get_weight(layer.base_layer).detach()
        expected = weight + GATE * layer.delta_weight("default")
        torch.testing.assert_close(merged_weight, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        assert layer.merged_adapters == []
        restored = layer.backend.get_weight(layer.base_layer).detach()
        torch.testing.assert_close(restored, weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_and_unload_gives_the_plain_module(kind: str) -> None:
    model, layer = build(kind)
    model.eval()
    set_gate(layer, -0.75)
    x = make_input(kind)
    with torch.no_grad():
        unmerged = model(x)
        plain = model.merge_and_unload()
        assert type(plain.target) is type(LAYERS[kind][0]())
        torch.testing.assert_close(plain(x), unmerged, rtol=1e-5, atol=1e-5)


def test_two_gated_adapters_on_one_layer_add_up_and_merge() -> None:
    model, layer = build("linear")
    model.add_adapter("other", config(variant_options={"gate_init": 0.5}))
    assert layer.lora_gate["other"].item() == 0.5
    set_gate(layer, GATE)
    model.eval()
    x = make_input("linear")
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        model.set_adapter("default")
        one = model(x) - base
        model.set_adapter("other")
        two = model(x) - base
        model.set_adapter(["default", "other"])
        both = model(x)
        torch.testing.assert_close(both, base + one + two, rtol=1e-5, atol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(model(x), both, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        # a mixed batch: each sample with its own adapter's gate
        names = ["default", "other", "__base__", "default", "other"]
        mixed = model(x, adapter_names=names)
        expected = torch.stack(
            [(base + one)[0], (base + two)[1], base[2], (base + one)[3], (base + two)[4]]
        )
        torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_restore_the_gates(kind: str, tmp_path: Path) -> None:
    model, layer = build(kind, variant_options={"gate_init": 0.5})
    assert layer.lora_gate["default"].item() == 0.5
    set_gate(layer, -1.25)  # "trained": not the initial value
    model.eval()
    x = make_input(kind)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "scaled")

    saved = json.loads((tmp_path / "scaled" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    assert saved["variant"] == "scaled"
    assert saved["variant_options"] == {"gate_init": 0.5}
    tensors = load_file(tmp_path / "scaled" / "adapter_model.safetensors")
    gate = tensors["base_model.model.target.lora_gate"]
    assert gate.shape == (1,) and gate.item() == -1.25

    torch.manual_seed(0)
    fresh = Host(LAYERS[kind][0]())
    loaded = AdaptedModel.from_pretrained(fresh, tmp_path / "scaled").eval()
    loaded_layer = loaded.model.target
    assert isinstance(loaded_layer.lora_variant["default"], ScaledLora)
    assert loaded_layer.lora_gate["default"].item() == -1.25
    assert loaded.peft_config["default"].variant_options == {"gate_init": 0.5}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)


def test_gpt2_end_to_end(tmp_path: Path) -> None:
    """On a real model (GPT-2's Conv1D layers): train a step, save, load, merge."""
    pytest.importorskip("transformers")
    from adapt.core.testing import tiny_gpt2, token_ids

    model = adapt(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], variant="scaled"))
    ids = token_ids(2, 8)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimiser.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimiser.step()
    gates = [layer.lora_gate["default"].item() for _, layer in model.adapter_layers()]
    assert len(gates) == 2 and all(g != 1.0 for g in gates)
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "gpt2-scaled")
    loaded = AdaptedModel.from_pretrained(tiny_gpt2(), tmp_path / "gpt2-scaled").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


# -- options ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gate": 0.5}, r"takes only the variant_options key 'gate_init', got \['gate'\]"),
        ({"gate_init": "0.5"}, r"gate_init'\] must be a finite number .* got '0.5'"),
        ({"gate_init": True}, r"must be a finite number .* got True"),
        ({"gate_init": float("nan")}, r"must be a finite number .* got nan"),
        ({"gate_init": None}, r"must be a finite number .* got None"),
    ],
)
def test_bad_options_are_refused_before_anything_changes(
    options: dict[str, object], message: str
) -> None:
    host = Host(nn.Linear(4, 3))
    with pytest.raises(ConfigError, match=message):
        adapt(host, config(variant_options=options))
    assert type(host.target) is nn.Linear  # nothing was wrapped


def test_check_options() -> None:
    variant = ScaledLora()
    variant.check_options({})
    variant.check_options({"gate_init": 0})
    variant.check_options({"gate_init": -3.5})
    assert ScaledLora.gate_init({}) == DEFAULT_GATE_INIT
    assert ScaledLora.gate_init({"gate_init": 2}) == 2.0


def test_integer_gate_init_and_deleting_the_adapter() -> None:
    model, layer = build("linear", variant_options={"gate_init": 2})
    assert layer.lora_gate["default"].dtype == torch.float32
    assert layer.lora_gate["default"].item() == 2.0
    model.add_adapter("other", config())
    model.delete_adapter("default")
    assert "default" not in layer.lora_gate and "default" not in layer.lora_variant
    assert list(layer.lora_gate) == ["other"]
