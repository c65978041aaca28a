"""What every adapt trainer shares: save and resume adapters in PEFT's format.

transformers' ``Trainer._save`` calls ``save_pretrained`` only for ``PreTrainedModel`` and
PEFT's ``PeftModel`` and otherwise writes the whole ``state_dict()``; ``_load_from_checkpoint``
and ``_load_best_model`` read adapter folders only for ``PeftModel``. The mixin answers those
three for an :class:`~adapt.core.AdaptedModel` and leaves every other model to the Trainer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import read_tensors
from ..errors import CheckpointError
from ..model import AdaptedModel

#: transformers' names (transformers.utils.TRAINING_ARGS_NAME and the adapter files)
TRAINING_ARGS_NAME = "training_args.bin"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def find_adapted(model: Any) -> AdaptedModel | None:
    """The AdaptedModel in ``model`` (itself, or inside DDP / accelerate / compile wrappers)."""
    for _ in range(5):
        if isinstance(model, AdaptedModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            return None
    return None


def adapter_folder(root: str | os.PathLike[str], name: str) -> Path:
    """Where ``save_pretrained(root)`` puts adapter ``name``: the root for 'default'."""
    return Path(root) if name == "default" else Path(root) / name


def load_adapters_into(adapted: AdaptedModel, folder: str | os.PathLike[str]) -> None:
    """Copy every adapter's tensors saved under ``folder`` back into ``adapted`` (resume)."""
    missing = [
        str(adapter_folder(folder, n) / ADAPTER_FILES[1])
        for n in adapted.peft_config
        if not (adapter_folder(folder, n) / ADAPTER_FILES[1]).is_file()
    ]
    if missing:
        raise CheckpointError(
            f"cannot resume from {folder}: it has no adapter weights for this model "
            f"(missing {missing}); it was not written by adapt's Trainer integration, or for "
            f"other adapters than {sorted(adapted.peft_config)}"
        )
    loaded = {n: read_tensors(adapter_folder(folder, n)) for n in adapted.peft_config}
    for name, tensors in loaded.items():
        adapted.load_adapter_state_dict(_with_prefix(tensors), name)


def _with_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k if k.startswith("base_model.") else f"base_model.model.{k}": v for k, v in tensors.items()
    }


class AdapterTrainerMixin:
    """Mix into a transformers ``Trainer`` (or a subclass, e.g. TRL's) *before* it::

        class MyTrainer(AdapterTrainerMixin, transformers.Trainer): ...

    ``save_model`` and every ``checkpoint-N`` then hold the adapters in PEFT's format (the
    adapter files, tokenizer, training args; no model weights), and ``resume_from_checkpoint``
    and ``load_best_model_at_end`` read them back.
    """

    model: Any
    args: Any
    accelerator: Any
    processing_class: Any
    data_collator: Any
    state: Any

    def _adapted(self) -> AdaptedModel | None:
        return find_adapted(self.model)

    def _save(
        self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None
    ) -> None:
        adapted = self._adapted()
        if adapted is None:
            super()._save(output_dir, state_dict)  # type: ignore[misc,unused-ignore]
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        adapted.save_pretrained(output_dir, is_main_process=bool(self.args.should_save))
        if not self.args.should_save:
            return
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        # as transformers' Trainer does (it never loads this file back; neither do we)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        adapted = find_adapted(model if model is not None else self.model)
        if adapted is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc,unused-ignore]
            return
        load_adapters_into(adapted, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        adapted = self._adapted()
        if adapted is None:
            super()._load_best_model()  # type: ignore[misc,unused-ignore]
            return
        best = self.state.best_model_checkpoint
        load_adapters_into(adapted, best)
