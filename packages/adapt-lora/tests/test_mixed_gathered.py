"""Mixed batches through the gathered path (:mod:`adapt.lora.gathered`): each sample's output is
its adapter's (plain LoRA, DoRA, LoRA biases, different ranks and scalings), ``__base__`` rows
are bitwise the base model's, gradients equal the per-adapter path's, the stacks are rebuilt
when a factor changes, and the fallbacks (dropout, embeddings) still route right."""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adapt.core import AdaptedModel, adapt  # noqa: E402
from adapt.core.testing import counting_torch_calls, tiny_gpt2, tiny_llama  # noqa: E402
from adapt.lora import LoraConfig, gathered  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = ["a0", "a3", "__base__", "a1", "a3", "a2"]


def model_of(extra: dict[str, Any] | None = None, targets: Any = LINEAR, base: Any = None) -> Any:
    torch.manual_seed(0)
    kw: dict[str, Any] = {"target_modules": targets, "init_lora_weights": False, **(extra or {})}
    model = adapt(base if base is not None else tiny_llama(), LoraConfig(r=4, **kw), "a0")
    for i in range(1, 4):
        model.add_adapter(f"a{i}", LoraConfig(r=2 + i, lora_alpha=3 * i, **kw))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "magnitude" in name or (name.endswith("bias") and "lora_B" in name):
                param.add_(torch.rand_like(param) * 0.1)
    return model.eval()


def ids(batch: int = len(NAMES)) -> torch.Tensor:
    return torch.randint(0, 64, (batch, 7), generator=torch.Generator().manual_seed(1))


def one_by_one(model: AdaptedModel, tokens: torch.Tensor, names: list[str]) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(input_ids=tokens[i : i + 1]).logits)
        else:
            model.set_adapter(name)
            rows.append(model(input_ids=tokens[i : i + 1]).logits)
    return torch.cat(rows)


def count_gathered(monkeypatch: pytest.MonkeyPatch, name: str = "gathered_effect") -> list[int]:
    """Count the calls of ``adapt.lora.gathered.<name>`` (as the layers call it) that served."""
    calls = [0]
    original = getattr(gathered, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        calls[0] += out is not None
        return out

    monkeypatch.setattr(f"adapt.lora.layer.{name}", counting)
    return calls


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}, {"lora_bias": True}])
def test_each_sample_gets_its_adapter(
    extra: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_of(extra)
    calls = count_gathered(monkeypatch)
    with torch.no_grad():
        mixed = model(input_ids=ids(), adapter_names=NAMES).logits
        assert calls[0] == 2 * 7  # every linear layer of both blocks took the gathered path
        assert (mixed - one_by_one(model, ids(), NAMES)).abs().max().item() < 1e-5


def test_base_rows_are_bitwise_the_base_models() -> None:
    model = model_of({"use_dora": True})
    with torch.no_grad():
        mixed = model(input_ids=ids(), adapter_names=NAMES).logits
        with model.disable_adapter():
            plain = model(input_ids=ids()).logits
    assert torch.equal(mixed[2], plain[2])


def test_gradients_equal_the_per_adapter_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def grads(use_gathered: bool) -> dict[str, torch.Tensor]:
        model = model_of({"lora_bias": True})
        if not use_gathered:
            monkeypatch.setattr("adapt.lora.layer.gathered_effect", lambda *a, **k: None)
        model.zero_grad()
        out = model(input_ids=ids(), adapter_names=NAMES, labels=ids()).loss
        out.backward()
        monkeypatch.undo()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, slow = grads(True), grads(False)
    assert fast.keys() == slow.keys() and fast
    assert all(torch.allclose(fast[k], slow[k], atol=1e-6) for k in fast)


def test_stacks_follow_changed_factors_and_scalings() -> None:
    model = model_of()
    with torch.no_grad():
        before = model(input_ids=ids(), adapter_names=NAMES).logits
        layer = model.model.model.layers[0].self_attn.q_proj
        layer.lora_B["a3"].weight.mul_(2)  # in place: the cached stack must not be reused
        after = model(input_ids=ids(), adapter_names=NAMES).logits
        assert (after - one_by_one(model, ids(), NAMES)).abs().max().item() < 1e-5
        assert not torch.allclose(after[1], before[1])
        layer.scaling["a1"] = 0.0
        zeroed = model(input_ids=ids(), adapter_names=NAMES).logits
        assert (zeroed - one_by_one(model, ids(), NAMES)).abs().max().item() < 1e-5


def test_gpt2_conv1d_layers() -> None:
    model = model_of(targets=["c_attn", "c_proj", "c_fc"], base=tiny_gpt2().eval())
    with torch.no_grad():
        mixed = model(input_ids=ids(), adapter_names=NAMES).logits
        assert (mixed - one_by_one(model, ids(), NAMES)).abs().max().item() < 1e-5


def test_dropout_and_embeddings_take_the_per_adapter_path() -> None:
    model = model_of({"lora_dropout": 0.5}, targets=[*LINEAR, "embed_tokens"])
    model.train()
    torch.manual_seed(3)
    out = model(input_ids=ids(), adapter_names=NAMES).logits  # dropout active: per adapter
    assert torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids=ids(), adapter_names=NAMES).logits
        assert (mixed - one_by_one(model, ids(), NAMES)).abs().max().item() < 1e-5


@pytest.mark.parametrize("tokens", [7, 1])  # the gathered products; the masked dense product
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_and_autocast(dtype: torch.dtype, tokens: int) -> None:
    batch = ids()[:, :tokens]
    model = model_of({"use_dora": True}, base=tiny_llama().to(dtype))
    with torch.no_grad():
        mixed = model(input_ids=batch, adapter_names=NAMES).logits.float()
        ref = one_by_one(model, batch, NAMES).float()
        assert (mixed - ref).abs().max().item() < 2e-2 * ref.abs().max().item()
    model = model_of()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        mixed = model(input_ids=batch, adapter_names=NAMES).logits.float()
        ref = one_by_one(model, batch, NAMES).float()
    assert (mixed - ref).abs().max().item() < 5e-2 * ref.abs().max().item()


def test_mixed_batches_after_preparing_for_hotswap() -> None:
    from adapt.lora import prepare_model_for_compiled_hotswap

    model = model_of()
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    with torch.no_grad():
        mixed = model(input_ids=ids(), adapter_names=NAMES).logits
        assert (mixed - one_by_one(model, ids(), NAMES)).abs().max().item() < 1e-5
        layer = model.model.model.layers[0].self_attn.q_proj
        layer.scaling["a1"].fill_(0.0)  # in place, as a hot swap does: the stacks follow
        mixed = model(input_ids=ids(), adapter_names=NAMES).logits
        assert (mixed - one_by_one(model, ids(), NAMES)).abs().max().item() < 1e-5


def test_stacks_follow_an_adapter_deleted_and_added_again() -> None:
    model = model_of()
    with torch.no_grad():
        model(input_ids=ids(), adapter_names=NAMES)  # the stacks are cached now
        model.delete_adapter("a1")
        model.add_adapter("a1", LoraConfig(r=5, target_modules=LINEAR, init_lora_weights=False))
        mixed = model(input_ids=ids(), adapter_names=NAMES).logits
        assert (mixed - one_by_one(model, ids(), NAMES)).abs().max().item() < 1e-5


def test_whole_batch_mixes_add_the_product_onto_the_base_output_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No ``__base__`` row: plain adapters' product goes straight onto the base output
    (``add_gathered_effect``); same logits as one by one, gradients as the per-adapter path."""
    names = ["a0", "a3", "a1", "a3", "a2"]
    calls = count_gathered(monkeypatch, "add_gathered_effect")
    model = model_of()
    with torch.no_grad():
        mixed = model(input_ids=ids(5), adapter_names=names).logits
        assert calls[0] == 2 * 7
        assert (mixed - one_by_one(model, ids(5), names)).abs().max().item() < 1e-5

    def grads(fast: bool) -> dict[str, torch.Tensor]:
        model = model_of()
        if not fast:
            monkeypatch.setattr("adapt.lora.layer.add_gathered_effect", lambda *a, **k: None)
            monkeypatch.setattr("adapt.lora.layer.gathered_effect", lambda *a, **k: None)
        model.train()
        model(input_ids=ids(5), adapter_names=names, labels=ids(5)).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, slow = grads(True), grads(False)
    assert fast.keys() == slow.keys() and fast
    assert all(torch.allclose(fast[k], slow[k], atol=1e-6) for k in fast)


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}, {"lora_bias": True}])
def test_one_token_rows_take_the_masked_dense_product(
    extra: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoding step's shape (one token per row, 4 adapters × 1 ≤ DENSE_MIX_LIMIT): every
    layer multiplies all rows by all stacked factors, no batched product, same outputs."""
    model = model_of(extra)
    calls = count_gathered(monkeypatch)  # a __base__ row: not the in-place whole-batch hook
    tokens = ids()[:, :1]
    with torch.no_grad():
        with counting_torch_calls(torch.bmm, torch.Tensor.baddbmm_) as batched:
            mixed = model(input_ids=tokens, adapter_names=NAMES).logits
        assert calls[0] == 2 * 7 and batched.calls == 0
        assert (mixed - one_by_one(model, tokens, NAMES)).abs().max().item() < 1e-5
