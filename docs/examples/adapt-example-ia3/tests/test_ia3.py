"""IA³'s definition, on plain layers and tiny transformers models: forward, composition,
merging and its refusals, the config, the saved files, mixed batches, half precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapt_example_ia3 import IA3Config
from ia3_testutils import (
    TwoLayers,
    config_of,
    ia3_vector,
    layer_at,
    logits,
    max_diff,
    randomise_ia3,
)
from torch import nn

from adapt.core import AdaptedModel, AdapterStateError, ConfigError, adapt
from adapt.core.testing import assert_mixed_batch_matches, tiny_llama, token_ids

X = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))


def vector(model: AdaptedModel, path: str, adapter: str = "default") -> torch.Tensor:
    return ia3_vector(model, path, adapter).detach().clone()


def adapted(**config: object) -> AdaptedModel:
    """TwoLayers with IA³ on ``proj`` (random vectors); ``config`` overrides."""
    settings: dict[str, object] = {"target_modules": ["proj"], "init_ia3_weights": False}
    settings.update(config)
    return adapt(TwoLayers(), IA3Config(**settings))  # type: ignore[arg-type]


# -- forward ----------------------------------------------------------------------------------
def test_output_side_scales_the_output() -> None:
    model = adapted()
    base = TwoLayers()
    l_out = vector(model, "proj")
    assert l_out.shape == (6, 1)
    want = base.ff(torch.tanh(base.proj(X) * l_out.flatten()))
    torch.testing.assert_close(logits(model, X), want.detach(), rtol=0, atol=1e-6)


def test_feedforward_scales_the_input() -> None:
    model = adapted(feedforward_modules=["proj"])
    base = TwoLayers()
    l_in = vector(model, "proj")
    assert l_in.shape == (1, 8)
    want = base.ff(torch.tanh(base.proj(X * l_in)))
    torch.testing.assert_close(logits(model, X), want.detach(), rtol=0, atol=1e-6)


def test_new_adapter_is_the_identity() -> None:
    model = adapt(TwoLayers(), IA3Config(target_modules=["proj", "ff"]))
    assert torch.equal(vector(model, "ff"), torch.ones(4, 1))
    torch.testing.assert_close(logits(model, X), logits(TwoLayers(), X), rtol=0, atol=0)


def test_two_adapters_multiply() -> None:
    """Output side: base · l1 · l2; feed-forward on the same layer: base(x · l3) · l1 · l2."""
    model = adapted()
    torch.manual_seed(5)
    model.add_adapter("b", IA3Config(target_modules=["proj"], init_ia3_weights=False))
    model.add_adapter(
        "c",
        IA3Config(target_modules=["proj"], feedforward_modules=["proj"], init_ia3_weights=False),
    )
    l1, l2, l3 = (vector(model, "proj", n) for n in ("default", "b", "c"))
    assert l3.shape == (1, 8)  # each adapter is feed-forward or not on its own
    base = TwoLayers()
    h = base.proj(X)
    model.set_adapter(["default", "b"])
    out = logits(model, X)
    product = base.ff(torch.tanh(h * l1.flatten() * l2.flatten())).detach()
    as_sum = base.ff(torch.tanh(h * (l1 + l2 - 1).flatten())).detach()
    torch.testing.assert_close(out, product, rtol=0, atol=1e-6)
    assert max_diff(out, as_sum) > 1e-3
    model.set_adapter(["default", "b", "c"])
    want = base.ff(torch.tanh(base.proj(X * l3) * l1.flatten() * l2.flatten())).detach()
    torch.testing.assert_close(logits(model, X), want, rtol=0, atol=1e-6)


# -- merging ----------------------------------------------------------------------------------
def proj_tensors(model: AdaptedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the weight and bias of ``proj``'s base ``nn.Linear``."""
    base = layer_at(model, "proj").get_base_layer()
    assert isinstance(base, nn.Linear) and base.bias is not None
    return base.weight.detach().clone(), base.bias.detach().clone()


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_merge_scales_weight_and_bias_and_unmerge_restores(feedforward: bool) -> None:
    model = adapted(feedforward_modules=["proj"] if feedforward else [])
    randomise_ia3(model)  # around 1, so that unmerging is well conditioned
    w0, b0 = proj_tensors(model)
    vec = vector(model, "proj")
    unmerged = logits(model, X)
    model.merge_adapter()
    assert layer_at(model, "proj").merged_adapters == ["default"]
    torch.testing.assert_close(logits(model, X), unmerged, rtol=0, atol=1e-6)
    weight, bias = proj_tensors(model)
    torch.testing.assert_close(weight, w0 * vec, rtol=0, atol=1e-7)  # rows, or columns
    want_bias = b0 if feedforward else b0 * vec.flatten()  # the bias scales on the output side
    torch.testing.assert_close(bias, want_bias, rtol=0, atol=1e-7)
    model.unmerge_adapter()
    assert not layer_at(model, "proj").merged
    weight, bias = proj_tensors(model)
    torch.testing.assert_close(weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(bias, b0, rtol=0, atol=1e-6)
    merged = model.merge_and_unload()
    assert type(merged.get_submodule("proj")) is nn.Linear
    torch.testing.assert_close(logits(merged, X), unmerged, rtol=0, atol=1e-6)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_unmerge_refused_when_a_factor_is_zero(feedforward: bool) -> None:
    model = adapted(feedforward_modules=["proj"] if feedforward else [])
    with torch.no_grad():
        ia3_vector(model, "proj", "default")[0, 0] = 0.0
    model.merge_adapter()
    weight, bias = proj_tensors(model)
    with pytest.raises(AdapterStateError, match=r"'default' from proj: 1 of its \d+ factors"):
        model.unmerge_adapter()
    assert layer_at(model, "proj").merged_adapters == ["default"]  # left merged, and unchanged
    after_weight, after_bias = proj_tensors(model)
    assert torch.equal(after_weight, weight) and torch.equal(after_bias, bias)


def test_refused_unmerge_leaves_the_whole_model_merged() -> None:
    model = adapt(tiny_llama(), IA3Config())
    with torch.no_grad():
        ia3_vector(model, "model.layers.1.self_attn.k_proj", "default")[0, 0] = 0.0
    model.merge_adapter()
    with pytest.raises(AdapterStateError, match=r"model\.layers\.1\.self_attn\.k_proj"):
        model.unmerge_adapter()
    assert all(layer.merged for _, layer in model.adapter_layers())


def test_safe_merge_refuses_nan() -> None:
    model = adapted()
    with torch.no_grad():
        ia3_vector(model, "proj", "default")[2, 0] = float("nan")
    weight = layer_at(model, "proj").weight.detach().clone()
    with pytest.raises(AdapterStateError, match="NaN or Inf"):
        model.merge_adapter(safe_merge=True)
    assert not layer_at(model, "proj").merged
    assert torch.equal(layer_at(model, "proj").weight, weight)


# -- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"feedforward_modules": 3}, "feedforward_modules must be a list of module names"),
        ({"feedforward_modules": ["a", 1]}, "feedforward_modules must be a list"),
        ({"feedforward_modules": "(unclosed"}, "not a valid regular expression"),
        ({"fan_in_fan_out": "yes"}, "fan_in_fan_out must be true or false"),
        ({"init_ia3_weights": 1}, "init_ia3_weights must be true or false"),
        ({"layers_to_transform": [0]}, "IA3Config has no layers_to_transform"),
        ({"layers_pattern": "layers"}, "IA3Config has no layers_pattern"),
        (
            {"target_modules": ["q", "v"], "feedforward_modules": ["v", "down", "up"]},
            r"subset of target_modules \(PEFT's rule\): \['down', 'up'\] not in",
        ),
    ],
)
def test_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IA3Config(**kwargs)  # type: ignore[arg-type]


def test_config_accepts_peft_spellings() -> None:
    config = IA3Config(target_modules={"q", "v"}, feedforward_modules={"v"})  # type: ignore[arg-type]
    assert config.feedforward_modules == ["v"]
    assert IA3Config(target_modules="all-linear", feedforward_modules=["mlp"]).target_modules
    assert IA3Config(feedforward_modules=".*mlp.*").feedforward_modules == ".*mlp.*"


def test_explicit_feedforward_outside_default_targets_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"\['gate_proj'\] not in target_modules"):
        adapt(tiny_llama(), IA3Config(feedforward_modules=["gate_proj"]))


def test_peft_style_unsubset_config_is_read_as_the_same_rule() -> None:
    """PEFT saves its default feed-forward modules next to explicit targets that do not hold
    them (and then cannot read the file); adapt reads it as the same selection."""
    data = {"peft_type": "IA3", "target_modules": ["q_proj", "v_proj"], "feedforward_modules": ["down_proj"]}  # fmt: skip
    with pytest.warns(UserWarning, match="not a subset"):
        assert IA3Config.from_dict(data).feedforward_modules == []
    data = {"peft_type": "IA3", "target_modules": ["c_attn", "c_proj"], "feedforward_modules": ["mlp.c_proj"]}  # fmt: skip
    with pytest.warns(UserWarning, match="not a subset"):
        rule = IA3Config.from_dict(data).feedforward_modules
    assert rule == r".*(?:mlp\.c_proj)"
    model = adapt(TwoLayers(), IA3Config(target_modules=["proj"]))  # only for the model type
    assert config_of(model).feedforward_modules == []  # a plain model: none


def test_saved_config_has_peft_keys_only(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), IA3Config())
    # the defaults that were used, written back into the config (and so saved)
    assert config_of(model).target_modules == ["k_proj", "v_proj", "down_proj"]
    assert config_of(model).feedforward_modules == ["down_proj"]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3"
    assert "layers_to_transform" not in saved and "layers_pattern" not in saved
    assert saved["feedforward_modules"] == ["down_proj"]
    assert set(saved) == {
        "peft_type", "target_modules", "exclude_modules", "feedforward_modules",
        "fan_in_fan_out", "modules_to_save", "init_ia3_weights", "task_type",
        "base_model_name_or_path", "revision", "inference_mode",
    }  # fmt: skip


def test_feedforward_defaults_follow_explicit_targets() -> None:
    """No feedforward_modules: PEFT's default for the model type, kept to the targets."""
    model = adapt(tiny_llama(), IA3Config(target_modules=["q_proj", "down_proj"]))
    assert config_of(model).feedforward_modules == ["down_proj"]
    assert ia3_vector(model, "model.layers.0.mlp.down_proj", "default").shape == (1, 128)
    assert ia3_vector(model, "model.layers.0.self_attn.q_proj", "default").shape == (64, 1)
    model = adapt(tiny_llama(), IA3Config(target_modules=["q_proj", "v_proj"]))
    assert config_of(model).feedforward_modules == []


# -- files, inspect ---------------------------------------------------------------------------
def test_save_load_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from adapt.core.cli import main

    x = token_ids(2, 8)
    model = adapt(tiny_llama(), IA3Config())
    randomise_ia3(model)
    want = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    assert config_of(loaded).feedforward_modules == ["down_proj"]
    torch.testing.assert_close(logits(loaded, x), want, rtol=0, atol=0)

    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "method:       IA3" in out
    assert "feedforward_modules: ['down_proj']" in out
    assert "model.layers.0.mlp.down_proj" in out and "ia3_l [1, 128]" in out
    assert "model.layers.0.self_attn.k_proj" in out and "ia3_l [32, 1]" in out


# -- mixed batches ----------------------------------------------------------------------------
def test_mixed_batch_with_output_side_and_feedforward_adapters() -> None:
    model = adapt(tiny_llama(), IA3Config())  # k/v output side, down_proj feed-forward
    model.add_adapter(
        "ff", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["k_proj"])
    )
    randomise_ia3(model)
    x = token_ids(5, 8)
    assert_mixed_batch_matches(model, x, ["default", "ff", "__base__", "ff", "default"], 1e-5)


def test_mixed_batch_on_plain_layers() -> None:
    model = adapted()
    model.add_adapter(
        "ff",
        IA3Config(target_modules=["proj"], feedforward_modules=["proj"], init_ia3_weights=False),
    )
    assert_mixed_batch_matches(model, X, ["ff", "default", "__base__", "default", "ff"], 1e-6)


# -- half precision ---------------------------------------------------------------------------
def test_bfloat16_base_and_autocast_are_close_to_float32() -> None:
    x = token_ids(2, 8)
    model = adapt(tiny_llama(), IA3Config())
    randomise_ia3(model)
    want = logits(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = logits(model, x)
    assert auto.dtype == torch.bfloat16
    # a bfloat16 base: the adapter is created in float32 (adapter_dtype_device)
    half = adapt(tiny_llama().to(torch.bfloat16), IA3Config())
    assert ia3_vector(half, "model.layers.0.mlp.down_proj", "default").dtype == torch.float32
    half.load_adapter_state_dict(model.adapter_state_dict("default"))
    low = logits(half, x)
    assert low.dtype == torch.bfloat16
    scale = float(want.abs().max())
    assert max_diff(auto, want) < 0.05 * scale
    assert max_diff(low, want) < 0.05 * scale
    # merging into bf16 weights rounds once per weight; the output stays close
    merged = logits(half.merge_and_unload(), x)
    assert max_diff(merged, want) < 0.05 * scale
