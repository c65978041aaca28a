"""One rank of the DeepSpeed tests: adapt's ``Trainer`` under ZeRO-2 / ZeRO-3 on the CPU.

Launched by ``tests/distributed/test_deepspeed.py`` through torchrun (``DS_ACCELERATOR=cpu``)::

    python -m torch.distributed.run --nproc_per_node 2 ... deepspeed_worker.py --zero 3 --out DIR

For every (method, model) it trains with ``adapt.core.integrations.transformers.Trainer`` and a
DeepSpeed config, each rank on its half of every global batch (sequential sampling), and saves
the adapter (``save_model``, plus the ``checkpoint-N`` folder). ``--persist 0`` partitions the
adapter parameters too (``stage3_param_persistence_threshold: 0``). :func:`run_single` is the
same training in one process, on the whole global batch, without DeepSpeed.

Refused cases are run too and their messages written to ``DIR/refusals-rank<r>.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from adapt.adalora import AdaLoraCallback, AdaLoraConfig
from adapt.core import AdapterConfig, adapt, testing
from adapt.core.distributed import is_partitioned
from adapt.lora import LoraConfig
from adapt.vera import VeraConfig

METHODS = ("lora", "vera", "adalora")
MODELS = ("llama", "gpt2")
WORLD_SIZE = 2
PER_DEVICE = 2
GLOBAL_BATCH = PER_DEVICE * WORLD_SIZE
SEQ_LEN = 16
VOCAB = 128
STEPS = 6
LR = 1e-2
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def model_config(model: str) -> Any:
    """The kit's tiny Llama or GPT-2 config."""
    if model == "llama":
        return testing.tiny_llama_config(vocab_size=VOCAB)
    # no dropout: a single process draws other dropout masks than two ranks do
    return testing.tiny_gpt2_config(
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )


def base_model(model: str) -> torch.nn.Module:
    """``from_config``: under ZeRO-3 transformers builds it inside ``deepspeed.zero.Init``
    (partitioned as it is created), as ``from_pretrained`` does."""
    import transformers

    torch.manual_seed(0)
    built = transformers.AutoModelForCausalLM.from_config(model_config(model))
    fill(built)
    return built


def fill(model: torch.nn.Module) -> None:
    """The same base weights in every run: ``zero.Init`` initialises in its own order, so the
    random init alone would differ from a single process. Written whole (ZeRO-3: gathered,
    rank 0's values kept)."""
    import contextlib

    for i, (_, p) in enumerate(model.named_parameters()):
        ctx: Any = contextlib.nullcontext()
        if hasattr(p, "ds_id"):
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=0)
        with ctx, torch.no_grad():
            gen = torch.Generator().manual_seed(100 + i)
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def adapter_config(method: str, model: str) -> AdapterConfig:
    targets = TARGETS[model]
    if method == "lora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    if method == "vera":
        return VeraConfig(r=16, target_modules=targets)
    # warm-up 1, budget decreasing over steps 2..3, final pattern at step 4, then fixed
    return AdaLoraConfig(
        init_r=6,
        target_r=3,
        tinit=1,
        tfinal=2,
        deltaT=1,
        total_step=STEPS,
        lora_alpha=12,
        target_modules=targets,
    )


def dataset() -> Any:
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH * STEPS, SEQ_LEN), generator=gen)

    class Data(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "labels": ids[i]}

    return Data()


def ds_config(zero: int, persist: int | None) -> dict[str, Any]:
    opt: dict[str, Any] = {"stage": zero}
    if zero == 3 and persist is not None:
        opt["stage3_param_persistence_threshold"] = persist
    return {
        "zero_optimization": opt,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1000,
    }


def training_args(out: Path, method: str, batch: int, deepspeed: Any = None) -> Any:
    import transformers

    return transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=STEPS,
        learning_rate=LR,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        # AdaLoRA: the loss of each rank is its own mean (and so is the regulariser); the
        # default would scale both by the world size (see docs/guides/distributed.md)
        average_tokens_across_devices=method != "adalora",
        save_strategy="steps",
        save_steps=STEPS,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        deepspeed=deepspeed,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )


def train(
    out: Path, method: str, model: str, batch: int, deepspeed: Any = None, plain: bool = False
) -> dict[str, Any]:
    """``plain``: transformers' own Trainer with ``AdapterCheckpointCallback`` (the adapter in
    each checkpoint-N only; its save_model writes no adapter)."""
    import transformers

    from adapt.core.integrations.transformers import Trainer as AdaptTrainer
    from adapt.core.trainer import AdapterCheckpointCallback

    args = training_args(out, method, batch, deepspeed)  # before the model: ZeRO-3 Init
    assert args.world_size == (WORLD_SIZE if deepspeed else 1)  # sets up the process group
    base = base_model(model)
    torch.manual_seed(1)
    adapted = adapt(base, adapter_config(method, model))
    callbacks = [AdaLoraCallback()] if method == "adalora" else []
    trainer_class = transformers.Trainer if plain else AdaptTrainer
    if plain:
        callbacks.append(AdapterCheckpointCallback())
    trainer = trainer_class(model=adapted, args=args, train_dataset=dataset(), callbacks=callbacks)
    result = trainer.train()
    if not plain:
        trainer.save_model(str(out / "final"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    pattern = getattr(adapted.peft_config["default"], "rank_pattern", None)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    return {
        "losses": losses,
        "rank_pattern": pattern,
        "train_loss": result.training_loss,
        "trainable": len(trainable),
        # adapter parameters ZeRO-3 holds partitioned (empty on this rank) after training
        "partitioned": sum(is_partitioned(p) for p in trainable),
    }


def train_resumed(out: Path, method: str, model: str, deepspeed: Any) -> dict[str, Any]:
    """Half the steps (a checkpoint at STEPS // 2), then a new process's model, its adapter
    scrambled, resumed from that checkpoint to the end: the result must be the uninterrupted
    run's (resume goes through DeepSpeed's own checkpoint in checkpoint-N)."""
    from adapt.core.integrations.transformers import Trainer

    half = STEPS // 2
    first = out / "first"
    args = training_args(first, method, PER_DEVICE, deepspeed)
    args.max_steps, args.save_steps = half, half
    assert args.world_size == WORLD_SIZE
    base = base_model(model)
    torch.manual_seed(1)  # as train() does
    adapted = adapt(base, adapter_config(method, model))
    Trainer(model=adapted, args=args, train_dataset=dataset()).train()

    args = training_args(out, method, PER_DEVICE, deepspeed)
    adapted = adapt(base_model(model), adapter_config(method, model))
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    trainer = Trainer(model=adapted, args=args, train_dataset=dataset())
    trainer.train(resume_from_checkpoint=str(first / f"checkpoint-{half}"))
    trainer.save_model(str(out / "final"))
    return {"resumed_at": half}


def run_single(out: Path, method: str, model: str) -> dict[str, Any]:
    """The reference: one process, the whole global batch per step, no DeepSpeed."""
    return train(out, method, model, GLOBAL_BATCH)


def refusals(zero: int, out: Path) -> dict[str, str]:
    """The messages of what cannot be right under DeepSpeed (every rank runs each)."""
    import transformers

    from adapt.core.integrations.transformers import Trainer

    found: dict[str, str] = {}
    args = training_args(out / "refused", "adalora", PER_DEVICE, ds_config(zero, None))
    assert args.world_size == WORLD_SIZE
    adapted = adapt(base_model("llama"), adapter_config("adalora", "llama"))

    class Allocate(transformers.TrainerCallback):  # type: ignore[misc]
        """update_and_allocate without AdaLoraCallback's capture."""

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            adapted.update_and_allocate(state.global_step)

    trainer = Trainer(model=adapted, args=args, train_dataset=dataset(), callbacks=[Allocate()])
    try:
        trainer.train()
        found["adalora_without_capture"] = "NOT REFUSED"
    except Exception as exc:
        found["adalora_without_capture"] = f"{type(exc).__name__}: {exc}"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=int, choices=(2, 3), required=True)
    parser.add_argument("--persist", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default=",".join(f"{m}-{b}" for b in MODELS for m in METHODS))
    parser.add_argument("--refusals", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    import deepspeed

    # DeepSpeed's shared-memory all-reduce for CPUs is a C++ op it compiles on first use
    # (minutes); without it DeepSpeed uses torch.distributed's gloo, the same numbers
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # on the CPU the Trainer starts torch.distributed itself, and DeepSpeed's own view of it
    # (which zero.Init reads for the world size) stays empty unless started here first
    deepspeed.init_distributed(dist_backend="gloo")
    for case in args.cases.split(","):
        method, model, *how = case.split("-")
        folder = args.out / case
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        config = ds_config(args.zero, args.persist)
        try:
            if how == ["resume"]:
                result = train_resumed(folder, method, model, config)
            else:
                result = train(folder, method, model, PER_DEVICE, config, plain=how == ["callback"])
        except BaseException:
            (folder / f"rank{rank}.error").write_text(traceback.format_exc())
            raise
        result["seconds"] = time.perf_counter() - start
        (folder / f"rank{rank}.json").write_text(json.dumps(result))
    if args.refusals:
        found = refusals(args.zero, args.out)
        (args.out / f"refusals-rank{rank}.json").write_text(json.dumps(found))


if __name__ == "__main__":
    main()
