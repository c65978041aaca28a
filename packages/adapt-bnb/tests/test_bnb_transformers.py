"""Methods on models that transformers loads with BitsAndBytesConfig on the CPU, k-bit training
preparation, and the error for a quantised layer type nobody provides a backend for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bnb_testutils import MAIN_KINDS, ids, llama_folder, load_llama, quantised_net

from adapt.bnb import prepare_for_kbit_training
from adapt.core import AdaptedModel, TargetError, adapt
from adapt.core.testing import isolated_registry
from adapt.lora import LoraConfig
from adapt.vera import VeraConfig

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = llama_folder(tmp_path_factory.mktemp("llama"))
    try:
        load_llama(path, "nf4")
    except AttributeError as exc:
        # transformers 4.46's bitsandbytes check calls .discard on a frozenset when only the
        # CPU is present: that transformers cannot load any bnb model on the CPU.
        pytest.skip(
            f"transformers {transformers.__version__} cannot load bitsandbytes models on the "
            f"CPU ({exc}); these tests run with the latest transformers"
        )
    return path


def config(method: str) -> object:
    if method in ("lora", "dora"):  # DoRA on a quantised base: QDoRA
        return LoraConfig(r=4, lora_alpha=8, use_dora=method == "dora", target_modules=TARGETS)
    return VeraConfig(r=16, target_modules=TARGETS)


def train(model: torch.nn.Module, steps: int, lr: float) -> list[float]:
    batch = ids(batch=4, length=16, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_transformers_quantised_llama_trains_saves_and_reloads(
    folder: Path, kind: str, method: str, tmp_path: Path
) -> None:
    base = load_llama(folder, kind)
    layer_type = type(base.model.layers[0].mlp.down_proj).__name__
    assert layer_type == ("Linear8bitLt" if kind == "8bit" else "Linear4bit")
    model = adapt(base, config(method))
    losses = train(model, steps=8, lr=5e-2 if method == "vera" else 1e-2)
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids()).logits
    model.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(load_llama(folder, kind), tmp_path).eval()
    with torch.no_grad():
        after = loaded(input_ids=ids()).logits
    assert torch.equal(before, after)
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        out = merged(input_ids=ids()).logits
    assert torch.isfinite(out).all()
    assert type(merged.model.layers[0].mlp.down_proj).__name__ == layer_type


@pytest.mark.parametrize("kind", ["8bit", "nf4"])
def test_prepare_for_kbit_training(folder: Path, kind: str) -> None:
    base = load_llama(folder, kind, dtype=torch.bfloat16)
    assert base.model.norm.weight.dtype == torch.bfloat16
    prepared = prepare_for_kbit_training(
        base, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    assert prepared is base
    assert not any(p.requires_grad for p in base.parameters())
    # norms, embeddings and the head are float32 now; quantised weights are untouched
    assert base.model.norm.weight.dtype == torch.float32
    assert base.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert base.lm_head.weight.dtype == torch.float32
    assert base.model.embed_tokens.weight.dtype == torch.float32
    qweight = base.model.layers[0].self_attn.q_proj.weight
    assert qweight.dtype in (torch.int8, torch.uint8)
    assert base.is_gradient_checkpointing
    # with re-entrant checkpointing, gradients reach the adapters only because the frozen
    # embedding's output was made to require grad
    model = adapt(base, LoraConfig(r=4, target_modules=TARGETS))
    model.train()
    loss = model(input_ids=ids(), labels=ids()).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    # B starts at zero, so A's gradient is zero on the first step; B's is not
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_prepare_without_checkpointing_leaves_it_off(folder: Path) -> None:
    base = load_llama(folder, "nf4", dtype=torch.bfloat16)
    prepare_for_kbit_training(base, use_gradient_checkpointing=False)
    assert not base.is_gradient_checkpointing
    assert base.model.norm.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", ["8bit", "nf4"])
def test_quantised_layer_without_backend_names_the_package(kind: str) -> None:
    import adapt.lora.layer as lora_layers
    from adapt.lora.method import METHOD

    net = quantised_net(kind)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with isolated_registry() as reg:
        # LoRA is installed, adapt-bnb is not
        reg.register_method(METHOD)
        reg.register_layer(lora_layers.LoraLinear)
        with pytest.raises(TargetError) as info:
            adapt(net, LoraConfig(r=4, target_modules=["up", "down"]))
    msg = str(info.value)
    cls = "Linear8bitLt" if kind == "8bit" else "Linear4bit"
    assert f"bitsandbytes.nn.modules.{cls}" in msg
    assert "pip install adapt-bnb" in msg
    # nothing was applied
    assert type(net.up).__name__ == cls
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
