"""adapt.core.integrations.transformers.Trainer: adapters saved in PEFT's format, resumed,
loaded back by adapt and by PEFT; bf16; a 4-bit bitsandbytes model is accepted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import sft_rows, tiny_llama, word_tokenizer

from adapt.core import AdaptedModel, adapt
from adapt.lora import LoraConfig

transformers = pytest.importorskip("transformers")
from adapt.core.integrations.transformers import Trainer  # noqa: E402

CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
MODEL_FILES = {"model.safetensors", "pytorch_model.bin"}


class LMData(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        tok = word_tokenizer()
        self.rows = [tok(r["text"])["input_ids"] for r in sft_rows(16)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "labels": ids.clone()}


def _args(out: Path, **kw: Any) -> Any:
    base = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "report_to": [],
        "use_cpu": True,
        "save_steps": 2,
        "logging_steps": 1,
        "seed": 0,
        "data_seed": 0,
    }
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _lora_tensors(model: AdaptedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state_dict("default").items()}


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_model_writes_the_adapter_only_and_it_loads_back(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), LoraConfig(**CONFIG))
    trainer = Trainer(
        model=model, args=_args(tmp_path / "out", max_steps=4), train_dataset=LMData()
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "out" / "checkpoint-2"):
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
        assert not files & MODEL_FILES, files
    ids = torch.randint(3, 30, (2, 7))
    model.eval()
    want = _logits(model, ids)
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "final")
    assert torch.equal(_logits(loaded, ids), want)
    assert not torch.equal(_logits(tiny_llama(), ids), want)  # the adapter trained


def test_resume_from_checkpoint_continues_the_same_run(tmp_path: Path) -> None:
    full = adapt(tiny_llama(), LoraConfig(**CONFIG))
    Trainer(model=full, args=_args(tmp_path / "a", max_steps=4), train_dataset=LMData()).train()

    half = adapt(tiny_llama(), LoraConfig(**CONFIG))
    Trainer(model=half, args=_args(tmp_path / "b", max_steps=4), train_dataset=LMData()).train()
    resumed = adapt(tiny_llama(), LoraConfig(**CONFIG))
    with torch.no_grad():  # another starting point: resuming must replace it
        for param in resumed.parameters():
            if param.requires_grad:
                param.normal_()
    trainer = Trainer(
        model=resumed, args=_args(tmp_path / "b", max_steps=4), train_dataset=LMData()
    )
    before = _lora_tensors(resumed)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    after = _lora_tensors(resumed)
    want = _lora_tensors(full)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    for key, value in want.items():
        torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-6)


def test_resume_from_a_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), LoraConfig(**CONFIG))
    trainer = Trainer(
        model=model, args=_args(tmp_path / "out", max_steps=2), train_dataset=LMData()
    )
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no adapter weights"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "ckpt"))


def test_saved_adapter_loads_in_peft_with_the_same_outputs(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = adapt(tiny_llama(), LoraConfig(**CONFIG))
    Trainer(model=model, args=_args(tmp_path / "out", max_steps=2), train_dataset=LMData()).train()
    model.eval()
    ids = torch.randint(3, 30, (2, 7))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out" / "checkpoint-2"))
    torch.testing.assert_close(_logits(theirs, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 4.x keeps bf16 autocast on for later Trainers in the process",
)
def test_bf16_trainer_trains_and_saves_float32_adapters(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), LoraConfig(**CONFIG))
    trainer = Trainer(
        model=model, args=_args(tmp_path / "out", max_steps=2, bf16=True), train_dataset=LMData()
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    trainer.save_model(str(tmp_path / "final"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_trainer_accepts_an_adapted_4bit_model(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path / "base")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quant, device_map="cpu"
    )
    model = adapt(base, LoraConfig(**CONFIG))
    trainer = Trainer(
        model=model, args=_args(tmp_path / "out", max_steps=2), train_dataset=LMData()
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()


def test_plain_trainer_save_warns_and_points_to_the_integration(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), LoraConfig(**CONFIG))
    args = _args(tmp_path / "out", max_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=LMData())
    with pytest.warns(UserWarning, match=r"adapt\.core\.integrations\.transformers import Trainer"):
        trainer.save_model(str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "model.safetensors").is_file()  # what transformers does


@pytest.fixture
def fresh_accelerate_state() -> Any:
    """An Accelerator of our own (Trainers of earlier tests configured the process-wide state);
    reset again after, so bf16 does not leak into later tests."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_bf16_loop_and_save(tmp_path: Path, fresh_accelerate_state: Any) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = adapt(tiny_llama(), LoraConfig(**CONFIG))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    loader = torch.utils.data.DataLoader(LMData(), batch_size=1)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        loss = prepared(**batch).loss
        assert torch.isfinite(loss)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    assert {p.dtype for p in params} == {torch.float32}
    unwrapped = accelerator.unwrap_model(prepared)
    assert unwrapped is model
    unwrapped.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 30, (2, 7))
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    model.eval()
    torch.testing.assert_close(
        _logits(loaded, ids), _logits(model.get_base_model(), ids), rtol=1e-5, atol=1e-5
    )


def test_importing_adapt_core_imports_no_training_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, adapt.core, adapt.core.integrations, adapt.lora\n"
        "loaded = [m for m in ('transformers', 'trl', 'sentence_transformers', 'datasets') "
        "if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
