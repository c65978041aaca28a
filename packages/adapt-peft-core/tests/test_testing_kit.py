"""The public test kit itself: registration helpers and the assertions plugin authors use."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from core_testutils import mlp, tiny_llama

from adapt.core import MissingMethodError, adapt, get_registry
from adapt.core.registry import GROUP_LAYERS, Registry
from adapt.core.testing import (
    ToyConfig,
    ToyLayer,
    assert_merge_roundtrip,
    assert_mixed_batch_matches,
    isolated_registry,
    output_tensor,
    randomise_adapters,
    registered_toy,
    tiny_bert,
    tiny_gpt2,
    tiny_llama_config,
    token_ids,
)


def test_registered_toy_unregisters_afterwards(registry: Registry) -> None:
    with isolated_registry() as inner:
        assert get_registry() is inner
        with pytest.raises(MissingMethodError):
            inner.get_method("toy")
        with registered_toy() as method:
            assert inner.get_method("TOY") is method
            assert [e.obj for e in inner.entries(GROUP_LAYERS)] == [ToyLayer]
        assert inner.entries(GROUP_LAYERS) == []
        with pytest.raises(MissingMethodError):
            inner.get_method("toy")
    assert get_registry() is registry  # the outer registry is back


def test_helpers_on_a_transformers_model() -> None:
    model = adapt(tiny_llama(), ToyConfig(target_modules=["q_proj", "v_proj"], init_identity=False))
    model.add_adapter("b", ToyConfig(target_modules=["o_proj"], init_identity=False))
    batch = {"input_ids": token_ids(3, 5, low=3, vocab_size=32, seed=0)}
    assert_merge_roundtrip(model, lambda: batch, atol=1e-5)
    assert_mixed_batch_matches(model, batch, ["b", "__base__", "default"], atol=1e-5)
    with torch.no_grad():
        assert output_tensor(model(**batch)).shape == (3, 5, 32)


class WrongDelta(ToyLayer):
    """A buggy layer: its ΔW disagrees with its forward contribution."""

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return 2 * super().delta_weight(adapter_name)


def test_merge_roundtrip_catches_a_wrong_delta_weight(registry: Registry) -> None:
    with registered_toy(registry, layer=WrongDelta):
        model = adapt(mlp(), ToyConfig(target_modules=["up"], init_identity=False))
    x = torch.randn(2, 8)
    with pytest.raises(AssertionError, match="merged output vs unmerged output"):
        assert_merge_roundtrip(model, lambda: x, atol=1e-6)


def test_merge_roundtrip_refuses_a_merged_model() -> None:
    model = adapt(mlp(), ToyConfig(target_modules=["up"], init_identity=False))
    model.merge_adapter()
    with pytest.raises(AssertionError, match="up is already merged"):
        assert_merge_roundtrip(model, lambda: torch.randn(2, 8))


def test_output_tensor() -> None:
    t = torch.zeros(1)
    assert output_tensor(t) is t
    assert output_tensor((t, 1)) is t
    with pytest.raises(TypeError, match="cannot find the output tensor in a dict"):
        output_tensor({"a": 1})


# ----------------------------------------------------------------------------- check_layer


def _linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(10, 7)


def test_check_layer_passes_a_correct_layer() -> None:
    from adapt.core.testing import check_layer

    report = check_layer(ToyLayer, _linear, ToyConfig(r=3))
    assert report.ok and not report.skipped
    assert len(report.passed) == 12
    text = str(report)
    assert text.startswith("adapt conformance of adapt.core.testing.ToyLayer: 12 passed")
    assert "PASS  merged output equals unmerged" in text


class LeakyLayer(ToyLayer):
    """Broken: its checkpoint names carry the adapter name (PEFT's keys do not)."""

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = super().adapter_tensors(adapter_name)
        return {f"{k}.{adapter_name}": v for k, v in out.items()}


def test_check_layer_reports_a_wrong_delta_weight_in_words() -> None:
    from adapt.core.testing import check_layer

    with pytest.raises(AssertionError) as info:
        check_layer(WrongDelta, _linear, ToyConfig(r=3))
    msg = str(info.value)
    print(msg)
    assert "adapt conformance of" in msg and "WrongDelta" in msg
    assert (
        "FAIL  merged output equals unmerged, merge→unmerge restores the weight: "
        "AssertionError: merged output vs unmerged output: max abs difference" in msg
    )
    # the failure does not cascade: the forward-only checks still pass
    assert "PASS  disable_adapter() gives the base output" in msg
    assert "PASS  save_pretrained → from_pretrained gives the same output" in msg


def test_check_layer_reports_bad_checkpoint_names() -> None:
    from adapt.core.testing import check_layer

    report = check_layer(LeakyLayer, _linear, ToyConfig(r=3), raise_on_failure=False)
    failed = dict(report.failed)
    assert (
        "contains the adapter name" in failed["state-dict names follow the checkpoint convention"]
    )


def test_check_layer_documents_a_non_identity_start() -> None:
    from adapt.core.testing import check_layer

    report = check_layer(ToyLayer, _linear, ToyConfig(r=3, init_identity=False),
                         identity_at_init=False)  # fmt: skip
    assert report.ok
    assert report.skipped == [("a new adapter starts as the identity", "documented as not")]


def test_check_layer_says_when_the_registry_picks_another_class() -> None:
    from adapt.core.testing import check_layer

    class NotForLinear(ToyLayer):
        base_types = (torch.nn.Conv1d,)

    with pytest.raises(AssertionError, match="the registry picks the layer class"):
        check_layer(NotForLinear, _linear, ToyConfig(r=3))


def test_importing_the_kit_imports_no_transformers_and_no_method() -> None:
    code = (
        "import sys, adapt.core.testing; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'bitsandbytes', 'peft') or m.startswith('adapt.') and "
        "not m.startswith('adapt.core')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_model_builders_are_seeded_and_take_config_overrides() -> None:
    a, b = tiny_gpt2(), tiny_gpt2()
    assert not a.training and tiny_gpt2(training=True).training
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    other = tiny_gpt2(seed=1)
    assert not torch.equal(other.transformer.wte.weight, a.transformer.wte.weight)
    bert = tiny_bert(hidden_size=32, intermediate_size=48)
    assert bert.encoder.layer[0].intermediate.dense.weight.shape == (48, 32)
    cfg = tiny_llama_config(vocab_size=40)
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (64, 2, 40)


def test_token_ids_and_randomise_adapters() -> None:
    ids = token_ids(4, 6, low=3, vocab_size=9, seed=2)
    assert ids.shape == (4, 6) and int(ids.min()) >= 3 and int(ids.max()) < 9
    assert torch.equal(ids, token_ids(4, 6, low=3, vocab_size=9, seed=2))
    net = mlp()
    net.up.weight.requires_grad_(False)
    frozen = net.up.weight.detach().clone()
    assert randomise_adapters(net, seed=3) == 5  # every trainable tensor, not up.weight
    assert torch.equal(net.up.weight, frozen)
    assert randomise_adapters(net, where=lambda name, _: name.startswith("head")) == 2
