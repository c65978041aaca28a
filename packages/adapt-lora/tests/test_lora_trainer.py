"""An adapted tiny Llama trains under transformers' ``Trainer``."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lora_testutils import LLAMA_TARGETS, tiny_llama  # noqa: E402

from adapt.core import AdaptedModel, adapt  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402


class TokenDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Eight dicts with ``input_ids`` and ``labels``, as a tokenised LM dataset yields."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        input_ids = (torch.arange(8) * (i + 1) + 3) % 64
        return {"input_ids": input_ids, "labels": input_ids.clone()}


def _train(
    tmp_path: Path, **extra: object
) -> tuple[AdaptedModel, transformers.TrainOutput, dict[str, torch.Tensor]]:
    model = adapt(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **extra,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())
    result = trainer.train()
    params = dict(model.named_parameters())
    # the frozen base is bit-identical after training
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    return model, result, before


def _assert_adapters_trained(model: AdaptedModel, before: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert before and all(".lora_" in n for n in before)
    changed = [n for n, v in before.items() if not torch.equal(params[n], v)]
    assert sorted(changed) == sorted(before)


def test_trainer_keeps_the_columns_and_trains_the_adapter(tmp_path: Path) -> None:
    # Trainer keeps only the columns AdaptedModel.forward's signature names
    params = inspect.signature(
        adapt(tiny_llama(), LoraConfig(target_modules=["q_proj"])).forward
    ).parameters
    assert "input_ids" in params and "labels" in params
    model, result, before = _train(tmp_path)  # remove_unused_columns defaults to True
    assert result.global_step == 3
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    _assert_adapters_trained(model, before)


def test_trainer_with_gradient_checkpointing(tmp_path: Path) -> None:
    model, result, before = _train(tmp_path, gradient_checkpointing=True)
    assert model.model.is_gradient_checkpointing
    assert result.global_step == 3
    assert math.isfinite(result.training_loss)
    _assert_adapters_trained(model, before)


def test_checkpoint_callback_writes_a_loadable_adapter_into_each_checkpoint(
    tmp_path: Path,
) -> None:
    from adapt.core.trainer import AdapterCheckpointCallback

    torch.manual_seed(0)
    model = adapt(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(),
        callbacks=[AdapterCheckpointCallback()],
    )
    trainer.train()
    for step in (2, 4):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()
    # the last checkpoint is the trained adapter
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "out" / "checkpoint-4")
    ids = TokenDataset()[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits
        )
    # resuming from such a checkpoint still works (Trainer reads its own files). Not on
    # transformers 4.x: its resume loads rng_state.pth with torch.load, which torch ≥ 2.6 refuses
    # (weights_only) for any model, adapted or not.
    if int(transformers.__version__.split(".")[0]) >= 5:
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_checkpoint_callback_refuses_a_model_that_is_not_adapted() -> None:
    from adapt.core.trainer import AdapterCheckpointCallback

    callback = AdapterCheckpointCallback()
    args = transformers.TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    state = transformers.TrainerState()
    with pytest.raises(TypeError, match="needs the AdaptedModel that adapt\\(\\) returned"):
        callback.on_save(args, state, None, model=tiny_llama())
