"""LoRA on tiny transformers models: injection, trainability, adapters, merging, checkpoints,
generation and training."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from lora_testutils import (  # noqa: E402
    LLAMA_TARGETS,
    ids,
    max_diff,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)

from adapt.core import AdaptedModel, AdapterLayer, ModulesToSave, adapt  # noqa: E402
from adapt.lora import LoraConfig, LoraLayer, LoraLinear  # noqa: E402

TOL = 1e-5


def _logits(model: nn.Module, input_ids: torch.Tensor, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=input_ids, **kw).logits
    return out


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _lora_layers(model: AdaptedModel) -> dict[str, LoraLayer]:
    return {p: m for p, m in model.adapter_layers() if isinstance(m, LoraLayer)}


def _randomise_b(model: AdaptedModel, adapter: str, seed: int) -> None:
    """Give an identity-initialised adapter a non-zero B (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            assert isinstance(layer, LoraLayer)
            if adapter in layer.lora_B:
                w = layer.lora_B[adapter].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)


# -- injection and trainability -------------------------------------------------------------------
def test_adapt_llama_returns_adapted_model_with_lora_on_targets() -> None:
    model = adapt(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    assert isinstance(model, AdaptedModel)
    assert isinstance(model, nn.Module)
    layers = _lora_layers(model)
    assert sorted(layers) == [
        f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("q_proj", "v_proj")
    ]
    assert all(type(m) is LoraLinear for m in layers.values())
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.lora_A["default"].weight.shape == (4, 32)
    assert q.lora_B["default"].weight.shape == (32, 4)
    v = layers["model.layers.0.self_attn.v_proj"]
    assert v.lora_B["default"].weight.shape == (16, 4)  # 2 kv heads × head_dim 8


def test_identity_init_leaves_llama_logits_unchanged() -> None:
    base = tiny_llama()
    expected = _logits(base, ids())
    model = adapt(base, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    assert torch.equal(_logits(model, ids()), expected)


def test_only_active_lora_tensors_are_trainable() -> None:
    model = adapt(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    names = _trainable_names(model)
    assert names, "the active adapter must be trainable"
    assert all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in names), names
    assert len(names) == 2 * 4
    model.set_adapter("other")
    names = _trainable_names(model)
    assert all(re.search(r"\.lora_[AB]\.other\.weight$", n) for n in names), names
    assert len(names) == 2 * 2


def test_bias_lora_only_trains_biases_of_adapted_layers() -> None:
    model = adapt(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"], bias="lora_only"))
    names = _trainable_names(model)
    biases = {n for n in names if n.endswith("bias")}
    assert len(biases) == 4
    assert all(re.search(r"attention\.self\.(query|value)\.base_layer\.bias$", n) for n in biases)
    assert all("lora_" in n for n in names - biases)


def test_bias_all_trains_every_bias() -> None:
    base = tiny_bert()
    n_bias = sum(1 for n, _ in base.named_parameters() if n.endswith("bias"))
    model = adapt(base, LoraConfig(r=2, target_modules=["query", "value"], bias="all"))
    names = _trainable_names(model)
    biases = {n for n in names if n.endswith("bias")}
    assert len(biases) == n_bias
    assert any("LayerNorm" in n for n in biases)
    assert all("lora_" in n for n in names - biases)


def test_bias_is_saved_with_the_adapter(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = adapt(tiny_bert(), LoraConfig(r=2, target_modules=["query"], bias="lora_only"))
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert not any(".default." in k for k in keys)


def test_modules_to_save_copy_is_trainable_and_used() -> None:
    model = adapt(
        tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, modules_to_save=["lm_head"])
    )
    head = model.model.lm_head
    assert isinstance(head, ModulesToSave)
    names = _trainable_names(model)
    assert "base_model.model.lm_head.modules_to_save.default.weight" in names
    assert "base_model.model.lm_head.original_module.weight" not in names
    before = _logits(model, ids())
    with torch.no_grad():
        head.modules_to_save["default"].weight.mul_(2)
    assert max_diff(_logits(model, ids()), 2 * before) < TOL
    with model.disable_adapter():
        assert max_diff(_logits(model, ids()), before) < TOL


def test_print_trainable_parameters_uses_peft_format(capsys: pytest.CaptureFixture[str]) -> None:
    base = tiny_llama()
    n_base = sum(p.numel() for p in base.parameters())
    model = adapt(base, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    # per layer: q (A 4×32 + B 32×4) + v (A 4×32 + B 16×4)
    n_lora = 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert model.trainable_parameters() == (n_lora, n_base + n_lora)
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    pct = 100 * n_lora / (n_base + n_lora)
    assert (
        line
        == f"trainable params: {n_lora:,} || all params: {n_base + n_lora:,} || trainable%: {pct:.4f}"
    )
    assert re.fullmatch(
        r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", line
    )


def test_gpt2_conv1d_lora_matches_hand_delta() -> None:
    base = tiny_gpt2()
    original = copy.deepcopy(base)
    model = adapt(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    )
    layer = model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (2, 32) and b.shape == (96, 2)
    x = torch.randn(2, 5, 32)
    ref = original.transformer.h[0].attn.c_attn
    with torch.no_grad():
        assert max_diff(layer(x), x @ ref.weight + ref.bias + x @ (b @ a).T * 2.0) < TOL
    # merged model equals the adapted one and keeps Conv1D's (in, out) storage
    adapted = _logits(model, ids())
    merged = model.merge_and_unload()
    assert merged.transformer.h[0].attn.c_attn.weight.shape == (32, 96)
    assert max_diff(_logits(merged, ids()), adapted) < 1e-4


# -- several adapters -----------------------------------------------------------------------------
def _two_adapter_llama() -> tuple[nn.Module, AdaptedModel]:
    base = tiny_llama()
    original = copy.deepcopy(base)
    model = adapt(base, LoraConfig(r=4, target_modules=LLAMA_TARGETS), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    _randomise_b(model, "a", 1)
    _randomise_b(model, "b", 2)
    return original, model.eval()


def test_set_adapter_switches_outputs() -> None:
    original, model = _two_adapter_llama()
    x = ids()
    base = _logits(original, x)
    assert model.active_adapter == "a"
    out_a = _logits(model, x)
    model.set_adapter("b")
    assert model.active_adapter == "b"
    out_b = _logits(model, x)
    assert max_diff(out_a, base) > 1e-3 and max_diff(out_b, base) > 1e-3
    assert max_diff(out_a, out_b) > 1e-3
    model.set_adapter("a")
    assert torch.equal(_logits(model, x), out_a)


def test_mixed_batch_equals_per_sample_results() -> None:
    original, model = _two_adapter_llama()
    x = ids(batch=3)
    mixed = _logits(model, x, adapter_names=["a", "b", "__base__"])
    model.set_adapter("a")
    want_a = _logits(model, x[:1])
    model.set_adapter("b")
    want_b = _logits(model, x[1:2])
    want_base = _logits(original, x[2:])
    assert max_diff(mixed[0:1], want_a) < TOL
    assert max_diff(mixed[1:2], want_b) < TOL
    assert max_diff(mixed[2:], want_base) < TOL
    # routing does not leak into the next call
    assert torch.equal(_logits(model, x[1:2]), want_b)


def test_mixed_batch_with_embedding_targets_and_modules_to_save() -> None:
    base = tiny_llama()
    original = copy.deepcopy(base)
    model = adapt(
        base,
        LoraConfig(
            r=4,
            target_modules=["embed_tokens", "q_proj"],
            modules_to_save=["lm_head"],
            init_lora_weights=False,
        ),
        adapter_name="a",
    )
    model.add_adapter(
        "b",
        LoraConfig(
            r=2,
            target_modules=["embed_tokens", "v_proj"],
            modules_to_save=["lm_head"],
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():
        model.model.lm_head.modules_to_save["a"].weight.mul_(2)
        model.model.lm_head.modules_to_save["b"].weight.mul_(-1)
    x = ids(batch=4)
    mixed = _logits(model, x, adapter_names=["b", "__base__", "a", "b"])
    model.set_adapter("a")
    want_a = _logits(model, x[2:3])
    model.set_adapter("b")
    want_b = _logits(model, x[[0, 3]])
    assert max_diff(mixed[[0, 3]], want_b) < TOL
    assert max_diff(mixed[2:3], want_a) < TOL
    assert max_diff(mixed[1:2], _logits(original, x[1:2])) < TOL


def test_embedding_adapter_round_trips_and_merges(tmp_path: Path) -> None:
    model = adapt(
        tiny_llama(),
        LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False),
    )
    emb = model.model.model.embed_tokens
    assert emb.lora_embedding_A["default"].shape == (4, 64)
    assert emb.lora_embedding_B["default"].shape == (32, 4)
    x = ids()
    want = _logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    assert max_diff(_logits(loaded, x), want) < TOL
    merged = loaded.merge_and_unload()
    assert type(merged.model.embed_tokens) is nn.Embedding
    assert max_diff(_logits(merged, x), want) < 1e-4


def test_disable_adapter_gives_base_outputs() -> None:
    original, model = _two_adapter_llama()
    x = ids()
    adapted = _logits(model, x)
    with model.disable_adapter():
        assert max_diff(_logits(model, x), _logits(original, x)) < TOL
    assert torch.equal(_logits(model, x), adapted)


def test_merge_and_unload_equals_adapted_output_and_leaves_no_lora() -> None:
    _, model = _two_adapter_llama()
    x = ids()
    adapted = _logits(model, x)
    merged = model.merge_and_unload()
    assert isinstance(merged, transformers.LlamaForCausalLM)
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in merged.modules())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert max_diff(_logits(merged, x), adapted) < 1e-4


def test_merge_adapter_then_unmerge_restores_outputs() -> None:
    original, model = _two_adapter_llama()
    x = ids()
    adapted = _logits(model, x)
    model.merge_adapter()
    assert max_diff(_logits(model, x), adapted) < 1e-4
    model.unmerge_adapter()
    base_sd = original.state_dict()
    for path, layer in model.adapter_layers():
        w0 = base_sd[f"{path}.weight"]
        assert max_diff(layer.get_base_layer().weight, w0) < 1e-6
    assert max_diff(_logits(model, x), adapted) < TOL


def test_unload_returns_the_original_weights() -> None:
    base = tiny_llama()
    original_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = adapt(base, LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    assert max_diff(_logits(model, ids()), _logits(tiny_llama(), ids())) > 1e-4
    plain = model.unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    sd = plain.state_dict()
    assert sorted(sd) == sorted(original_sd)
    assert all(torch.equal(sd[k], original_sd[k]) for k in sd)


def test_unload_after_merge_takes_the_adapter_back_out() -> None:
    base = tiny_llama()
    original_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = adapt(base, LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    model.merge_adapter()
    plain = model.unload()
    sd = plain.state_dict()
    assert sorted(sd) == sorted(original_sd)
    assert max(max_diff(sd[k], original_sd[k]) for k in sd) < 1e-6


def test_delete_adapter() -> None:
    original, model = _two_adapter_llama()
    x = ids()
    out_a = _logits(model, x)
    model.delete_adapter("b")
    assert sorted(model.peft_config) == ["a"]
    assert not any(".b." in n for n, _ in model.named_parameters())
    # o_proj was only adapted by "b": it is a plain Linear again
    assert type(model.model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert torch.equal(_logits(model, x), out_a)
    model.delete_adapter("a")
    assert model.peft_config == {}
    assert not any(isinstance(m, AdapterLayer) for m in model.model.modules())
    assert max_diff(_logits(model, x), _logits(original, x)) < TOL


def test_delete_active_adapter_activates_the_remaining_one() -> None:
    _, model = _two_adapter_llama()
    model.set_adapter("b")
    model.delete_adapter("b")
    assert model.active_adapter == "a"
    assert _trainable_names(model) and all(".a." in n for n in _trainable_names(model))


# -- generation -----------------------------------------------------------------------------------
def test_generate_passes_through_for_llama() -> None:
    base = tiny_llama()
    plain = copy.deepcopy(base)
    model = adapt(
        base, LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    ).eval()
    prompt = ids(batch=1, length=5)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        assert out.shape == (1, 8)
        assert torch.equal(out[:, :5], prompt)
        # greedy decoding by hand from the adapted model's logits
        seq = prompt
        for _ in range(3):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(out, seq)
        with model.disable_adapter():
            base_out = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs
            )
        want = plain.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert torch.equal(base_out, want)


# -- checkpoints ----------------------------------------------------------------------------------
def test_save_and_load_round_trip_with_patterns_and_modules_to_save(tmp_path: Path) -> None:
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 6},
        alpha_pattern={r"layers\.0\.self_attn\.v_proj": 3.0},
        modules_to_save=["lm_head"],
        init_lora_weights=False,
    )
    model = adapt(tiny_llama(), cfg)
    layers = _lora_layers(model)
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == 4
    assert layers["model.layers.1.self_attn.q_proj"].r["default"] == 2
    assert layers["model.layers.1.mlp.up_proj"].r["default"] == 6
    assert layers["model.layers.1.mlp.up_proj"].scaling["default"] == pytest.approx(8 / 6)
    assert layers["model.layers.0.self_attn.v_proj"].scaling["default"] == pytest.approx(3.0 / 4)
    assert layers["model.layers.1.self_attn.v_proj"].scaling["default"] == pytest.approx(8 / 4)
    with torch.no_grad():
        model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    x = ids()
    expected = _logits(model, x)
    model.save_pretrained(tmp_path)

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA"
    assert written["rank_pattern"] == {"layers.1.self_attn.q_proj": 2, "up_proj": 6}
    assert written["alpha_pattern"] == {r"layers\.0\.self_attn\.v_proj": 3.0}
    assert written["modules_to_save"] == ["lm_head"]
    assert written["inference_mode"] is True

    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    assert _lora_layers(loaded)["model.layers.1.self_attn.q_proj"].lora_A[
        "default"
    ].weight.shape == (2, 32)
    assert max_diff(_logits(loaded, x), expected) < TOL
    assert _trainable_names(loaded) == set()  # is_trainable=False by default
    with loaded.disable_adapter():
        assert max_diff(_logits(loaded, x), _logits(tiny_llama(), x)) < TOL

    trainable = AdaptedModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert "base_model.model.lm_head.modules_to_save.default.weight" in _trainable_names(trainable)


def test_second_adapter_saved_in_subfolder_and_loaded_with_load_adapter(tmp_path: Path) -> None:
    _, model = _two_adapter_llama()
    x = ids()
    model.set_adapter("b")
    want_b = _logits(model, x)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() is False  # no adapter named "default"
    assert (tmp_path / "b" / "adapter_model.safetensors").exists()
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    assert loaded.active_adapter == "a"
    loaded.set_adapter("b")
    assert max_diff(_logits(loaded, x), want_b) < TOL


# -- training -------------------------------------------------------------------------------------
def test_adamw_steps_lower_the_loss_and_touch_only_adapter_parameters() -> None:
    model = adapt(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = ids(batch=2, length=8)
    losses = []
    for _ in range(5):
        loss = model(input_ids=x, labels=x).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = model(input_ids=x, labels=x).loss.item()
    assert final < losses[0]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(params[n].grad is None for n in frozen)
    changed = [n for n, v in trained.items() if not torch.equal(params[n], v)]
    assert sorted(changed) == sorted(trained)


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (tiny_llama, {"q_proj", "v_proj"}),
        (tiny_gpt2, {"c_attn"}),
        (tiny_bert, {"query", "value"}),
    ],
)
def test_no_target_modules_takes_the_architecture_default(
    factory: Callable[[], nn.Module], expected: set[str], tmp_path: Path
) -> None:
    model = adapt(factory(), LoraConfig(r=2))
    assert {path.rsplit(".", 1)[-1] for path, _ in model.adapter_layers()} == expected
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved["target_modules"]) == expected
    reloaded = AdaptedModel.from_pretrained(factory(), tmp_path)
    assert sorted(p for p, _ in reloaded.adapter_layers()) == sorted(
        p for p, _ in model.adapter_layers()
    )
