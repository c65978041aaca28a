"""Mixed batches of AdaLoRA adapters (``adapter_names=``) in two batched products: each sample
gets its adapter (ranks differ, pruned triplets included), ``__base__`` rows are bitwise the base
model's, gradients equal the per-adapter path's, bf16 autocast works."""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adapt.adalora import AdaLoraConfig  # noqa: E402
from adapt.core import AdaptedModel, adapt  # noqa: E402
from adapt.core.testing import tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
NAMES = ["a0", "a2", "__base__", "a1", "a2", "a0"]
KW: dict[str, Any] = dict(target_modules=TARGETS, total_step=100, target_r=2)


def model_of() -> AdaptedModel:
    torch.manual_seed(0)
    model = adapt(tiny_llama(), AdaLoraConfig(init_r=4, **KW), "a0")
    model.add_adapter("a1", AdaLoraConfig(init_r=6, inference_mode=True, **KW))
    model.add_adapter("a2", AdaLoraConfig(init_r=4, lora_alpha=3, inference_mode=True, **KW))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.3)  # trained-like sizes (bf16 errors grow with the update)
        model.model.model.layers[0].self_attn.q_proj.lora_E["a2"][1:].zero_()  # pruned
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (len(NAMES), 7), generator=torch.Generator().manual_seed(1))


def one_by_one(model: AdaptedModel) -> torch.Tensor:
    rows = []
    for i, name in enumerate(NAMES):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(input_ids=ids()[i : i + 1]).logits)
        else:
            model.set_adapter(name)
            rows.append(model(input_ids=ids()[i : i + 1]).logits)
    return torch.cat(rows)


def test_each_sample_gets_its_adapter() -> None:
    model = model_of()
    with torch.no_grad():
        out = model(input_ids=ids(), adapter_names=NAMES).logits
        assert (out - one_by_one(model)).abs().max().item() < 1e-5
        with model.disable_adapter():
            assert torch.equal(out[2], model(input_ids=ids()).logits[2])


def test_gradients_equal_the_per_adapter_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapt.adalora.layer import SVDLinear

    def grads() -> dict[str, torch.Tensor]:
        model = model_of()
        model.train()
        model(input_ids=ids(), adapter_names=NAMES, labels=ids()).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    fast = grads()
    monkeypatch.setattr(SVDLinear, "gathered_adapter_effect", lambda *a, **k: None)
    slow = grads()
    assert fast.keys() == slow.keys() and fast
    assert all(torch.allclose(fast[k], slow[k], atol=1e-6) for k in fast)


def test_bf16_autocast() -> None:
    model = model_of()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids(), adapter_names=NAMES).logits.float()
        ref = one_by_one(model).float()
    assert (out - ref).abs().max().item() < 5e-2 * ref.abs().max().item()


@pytest.mark.compile
def test_compiled_mixes_do_not_recompile() -> None:
    torch._dynamo.reset()
    model = model_of()
    mixes = [NAMES, ["a1"] * 6, ["__base__", "a2", "a2", "a0", "a1", "a1"]]
    with torch.no_grad():
        eager = [model(input_ids=ids(), adapter_names=m).logits for m in mixes]
    model.prepare_mixed_batches_for_compile()
    graphs = [0]

    def backend(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        graphs[0] += 1
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for _ in range(2):
            for mix, want in zip(mixes, eager, strict=True):
                out = compiled(input_ids=ids(), adapter_names=mix).logits
                assert (out - want).abs().max().item() < 1e-5
    assert graphs[0] == 1


def test_whole_batch_mixes_add_onto_the_base_output_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No ``__base__`` row: the product goes straight onto the base output
    (``add_gathered_adapter_effect``); logits and gradients as the per-adapter path's."""
    from adapt.adalora.layer import SVDLinear

    names = ["a0", "a2", "a1", "a2", "a0", "a1"]
    calls = [0]
    original = SVDLinear.add_gathered_adapter_effect

    def counting(self: Any, *args: Any) -> Any:
        out = original(self, *args)
        calls[0] += out is not None
        return out

    def run(model: AdaptedModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.train()
        out = model(input_ids=ids(), adapter_names=names, labels=ids())
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    monkeypatch.setattr(SVDLinear, "add_gathered_adapter_effect", counting)
    fast_logits, fast = run(model_of())
    assert calls[0] == 2 * len(TARGETS)
    monkeypatch.setattr(SVDLinear, "add_gathered_adapter_effect", lambda *a, **k: None)
    monkeypatch.setattr(SVDLinear, "gathered_adapter_effect", lambda *a, **k: None)
    slow_logits, slow = run(model_of())
    assert (fast_logits - slow_logits).abs().max().item() < 1e-5
    assert fast.keys() == slow.keys() and fast
    assert all(torch.allclose(fast[k], slow[k], atol=1e-6) for k in fast)
