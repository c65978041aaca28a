"""adapt.core.integrations.trl: TRL's SFTTrainer and DPOTrainer with TRL's default configs
(bf16 and gradient checkpointing on) take an AdaptedModel, save adapters in PEFT's format; plain
TRL and an adapter on lm_head are refused; DPO's reference is the base, not a second model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import dpo_rows, sft_rows, tiny_llama, word_tokenizer

from adapt.core import AdaptedModel, adapt
from adapt.core.errors import IntegrationError
from adapt.lora import LoraConfig

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from adapt.core.integrations.trl import DPOTrainer, ReferenceModel, SFTTrainer  # noqa: E402

CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
COMMON = {
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-2,
    "report_to": [],
    "use_cpu": True,
    "logging_steps": 1,
    "seed": 0,
}


def _sft(out: Path, model: Any, trainer: Any = SFTTrainer, **kw: Any) -> Any:
    args = trl.SFTConfig(output_dir=str(out), max_steps=3, save_steps=2, **COMMON, **kw)
    data = datasets.Dataset.from_list(sft_rows())
    return trainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer())


def _dpo(out: Path, model: Any, trainer: Any = DPOTrainer, **kw: Any) -> Any:
    args = trl.DPOConfig(output_dir=str(out), max_steps=3, save_steps=2, **COMMON, **kw)
    data = datasets.Dataset.from_list(dpo_rows())
    return trainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer())


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _check_saved(folder: Path, model: AdaptedModel) -> None:
    """Adapter files only; adapt and PEFT load them to the trained model's outputs."""
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, files
    model.eval()
    ids = torch.randint(3, 30, (2, 7))
    # the wrapped model: accelerate wraps the trainer's model's forward in bf16 autocast
    want = _logits(model.get_base_model(), ids)
    ours = AdaptedModel.from_pretrained(tiny_llama(), folder)
    torch.testing.assert_close(_logits(ours, ids), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(tiny_llama(), ids), want, atol=1e-4)  # it trained
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(folder))
    torch.testing.assert_close(_logits(theirs, ids), want, rtol=1e-5, atol=1e-5)


def test_sft_default_config_trains_and_saves_a_peft_adapter(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), LoraConfig(**CONFIG))
    base = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    trainer = _sft(tmp_path / "out", model)
    assert trainer.args.bf16 and trainer.args.gradient_checkpointing  # TRL's defaults
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    for name, value in model.named_parameters():
        if name in base:
            assert torch.equal(value, base[name]), f"{name} (frozen) changed"
    trainer.save_model(str(tmp_path / "final"))
    _check_saved(tmp_path / "final", model)
    _check_saved(
        tmp_path / "out" / "checkpoint-2",
        AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "out" / "checkpoint-2"),
    )


def test_sft_loss_is_the_models_own_loss(tmp_path: Path) -> None:
    """The fused head on the wrapped model computes what the model's forward computes."""
    model = adapt(tiny_llama(), LoraConfig(**CONFIG, init_lora_weights="gaussian"))
    trainer = _sft(tmp_path / "out", model, bf16=False)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        fused = model(**batch, fused_lm_head=True).loss
        plain = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_plain_trl_is_refused_with_a_pointer(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = adapt(tiny_llama(), LoraConfig(**CONFIG))
    with pytest.raises(IntegrationError, match=r"adapt\.core\.integrations\.trl"):
        _sft(tmp_path / "a", model, trainer=trl.SFTTrainer)
    # plain DPO first loads a second model as reference (from the base's folder), then is refused
    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with pytest.raises(IntegrationError, match=r"adapt\.core\.integrations\.trl"):
        _dpo(tmp_path / "b", adapt(base, LoraConfig(**CONFIG)), trainer=trl.DPOTrainer)


def test_an_adapter_on_lm_head_is_refused(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(IntegrationError, match="lm_head"):
        _sft(tmp_path / "out", model)


def test_a_modules_to_save_lm_head_trains(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), LoraConfig(**CONFIG, modules_to_save=["lm_head"]))
    before = model.get_base_model().get_output_embeddings().weight.detach().clone()
    _sft(tmp_path / "out", model).train()
    after = model.get_base_model().get_output_embeddings().weight
    assert not torch.equal(before, after)


def test_dpo_reference_is_the_base_without_a_second_model(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), LoraConfig(**CONFIG))
    trainer = _dpo(tmp_path / "out", model)
    assert isinstance(trainer.ref_model, ReferenceModel)
    assert sum(p.numel() for p in trainer.ref_model.parameters()) == 0
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # step 1: a new LoRA adapter is the identity, policy == reference
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    ids = torch.randint(3, 30, (2, 7))
    model.eval()
    ref = trainer.ref_model(input_ids=ids).logits  # in bf16 autocast, as accelerate runs it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = _logits(tiny_llama(), ids)
    torch.testing.assert_close(ref, base.float(), rtol=0, atol=0)
    trainer.save_model(str(tmp_path / "final"))
    _check_saved(tmp_path / "final", model)


def test_dpo_with_precomputed_reference_log_probs(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), LoraConfig(**CONFIG))
    trainer = _dpo(tmp_path / "out", model, precompute_ref_log_probs=True)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_dpo_sync_ref_model_and_peft_config_are_refused(tmp_path: Path) -> None:
    with pytest.raises(IntegrationError, match="sync_ref_model"):
        _dpo(tmp_path / "a", adapt(tiny_llama(), LoraConfig(**CONFIG)), sync_ref_model=True)
    peft = pytest.importorskip("peft")
    with pytest.raises(IntegrationError, match="peft_config"):
        SFTTrainer(
            model=adapt(tiny_llama(), LoraConfig(**CONFIG)),
            args=trl.SFTConfig(output_dir=str(tmp_path / "b"), **COMMON),
            train_dataset=datasets.Dataset.from_list(sft_rows()),
            processing_class=word_tokenizer(),
            peft_config=peft.LoraConfig(r=4),
        )
