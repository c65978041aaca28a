"""AdaLoRA that cannot silently become LoRA: the Trainer callback, the optimizer hook, and the
warnings when rank allocation never runs or runs past total_step."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from adalora_testutils import LLAMA_TARGETS, ids, llama

from adapt.adalora import AdaLoraCallback, AdaLoraConfig, allocate_on_step
from adapt.core import adapt

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

STEPS = 12


def config() -> AdaLoraConfig:
    return AdaLoraConfig(
        init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=STEPS, lora_alpha=8,
        target_modules=LLAMA_TARGETS,
    )  # fmt: skip


class Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.ids = ids(batch=64, length=12, seed=3)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer(model: torch.nn.Module, tmp_path: Path, callbacks: list[object]) -> object:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=callbacks)


def test_trainer_with_the_callback_reaches_the_target_budget(tmp_path: Path) -> None:
    model = adapt(llama(), config())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*rank allocation has never run.*")
        warnings.filterwarnings("error", message=".*past total_step.*")
        trainer(model, tmp_path, [AdaLoraCallback()]).train()  # type: ignore[attr-defined]
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None
    assert sum(sum(m) for m in pattern.values()) == 2 * 2 * len(LLAMA_TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "adapter")


def test_trainer_without_the_callback_warns(tmp_path: Path) -> None:
    model = adapt(llama(), config())
    with pytest.warns(UserWarning, match="rank allocation has never run") as record:
        trainer(model, tmp_path, []).train()  # type: ignore[attr-defined]
    msg = next(str(w.message) for w in record if "never run" in str(w.message))
    assert "AdaLoraCallback" in msg and "allocate_on_step" in msg
    # attributed to the user's trainer.train() line, not to transformers or torch
    assert {w.filename for w in record if "never run" in str(w.message)} == {__file__}
    assert model.peft_config["default"].rank_pattern is None
    with pytest.warns(
        UserWarning, match="it is being saved, but rank allocation has never run"
    ) as saved:
        model.save_pretrained(tmp_path / "adapter")
    assert {w.filename for w in saved if "being saved" in str(w.message)} == {__file__}


def test_optimizer_hook_runs_allocation() -> None:
    model = adapt(llama(), config())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = allocate_on_step(model, opt)
    batch = ids(batch=8, length=12, seed=1)
    for _ in range(STEPS):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    handle.remove()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None
    assert sum(sum(m) for m in pattern.values()) == 2 * 2 * len(LLAMA_TARGETS)


def test_steps_past_total_step_warn_once() -> None:
    model = adapt(llama(), config())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocate_on_step(model, opt)
    batch = ids(batch=4, length=8)
    with pytest.warns(UserWarning, match=r"past total_step=12") as record:
        for _ in range(STEPS + 3):
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
    assert sum("past total_step" in str(w.message) for w in record) == 1
    # attributed to the user's opt.step() line, not to torch's optimizer internals
    assert {w.filename for w in record if "past total_step" in str(w.message)} == {__file__}


def test_a_trained_config_builds_init_r_ranks_and_loading_applies_the_pattern(
    tmp_path: Path,
) -> None:
    """Training writes rank_pattern into the config object (as PEFT does); adapt(new, cfg) must
    still build init_r ranks, and only loading the checkpoint shapes layers to the pattern."""
    from adapt.adalora.method import adalora_layers
    from adapt.core import AdaptedModel

    model = adapt(llama(), cfg := config())
    trainer(model, tmp_path, [AdaLoraCallback()]).train()  # type: ignore[attr-defined]
    assert cfg.rank_pattern is not None and model.peft_config["default"] is cfg
    model.save_pretrained(tmp_path / "adapter")

    fresh = adapt(llama(), cfg)
    assert {layer.r["default"] for layer in adalora_layers(fresh, "default").values()} == {4}

    loaded = AdaptedModel.from_pretrained(llama(), tmp_path / "adapter")
    kept = {p: layer.r["default"] for p, layer in adalora_layers(loaded, "default").items()}
    assert kept == {p: sum(cfg.kept_ranks(p) or []) for p in kept}
    assert sum(kept.values()) == 2 * 2 * len(LLAMA_TARGETS)  # target_r per layer, on average
    x = ids(batch=2, length=12, seed=9)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    # load_adapter applies it too
    fresh.load_adapter(tmp_path / "adapter", adapter_name="again")
    assert {p: layer.r["again"] for p, layer in adalora_layers(fresh, "again").items()} == kept


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 4.x resume loads rng_state.pth with torch.load, which torch >= 2.6 "
    "refuses for any model",
)
def test_in_process_resume_from_checkpoint_after_training(tmp_path: Path) -> None:
    model = adapt(llama(), cfg := config())
    first = trainer(model, tmp_path, [AdaLoraCallback()])
    first.args.save_strategy = "steps"  # type: ignore[attr-defined]
    first.args.save_steps = 6  # type: ignore[attr-defined]
    first.train()  # type: ignore[attr-defined]
    assert cfg.rank_pattern is not None
    # the same process, the same (now budgeted) config object: a new model resumes at step 6
    again = adapt(llama(), cfg)
    second = trainer(again, tmp_path, [AdaLoraCallback()])
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))  # type: ignore[attr-defined]
    assert second.state.global_step == STEPS  # type: ignore[attr-defined]
