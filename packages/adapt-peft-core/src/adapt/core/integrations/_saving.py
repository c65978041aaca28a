"""What every adapt trainer shares: save and resume adapters in PEFT's format.

transformers' ``Trainer._save`` calls ``save_pretrained`` only for ``PreTrainedModel`` and
PEFT's ``PeftModel`` and otherwise writes the whole ``state_dict()``; ``_load_from_checkpoint``
and ``_load_best_model`` read adapter folders only for ``PeftModel``. The mixin answers those
three for an :class:`~adapt.core.AdaptedModel` and leaves every other model to the Trainer.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..checkpoint import WEIGHTS_NAME, adapter_folder, read_tensors
from ..errors import CheckpointError
from ..model import AdaptedModel
from ..trainer import find_adapted

#: transformers' name for it (transformers.trainer.TRAINING_ARGS_NAME)
TRAINING_ARGS_NAME = "training_args.bin"


def load_adapters_into(adapted: AdaptedModel, folder: str | os.PathLike[str]) -> None:
    """Copy every adapter's tensors saved under ``folder`` back into ``adapted`` (resume)."""
    folders = {n: adapter_folder(folder, n) for n in adapted.peft_config}
    missing = [str(f / WEIGHTS_NAME) for f in folders.values() if not (f / WEIGHTS_NAME).is_file()]
    if missing:
        raise CheckpointError(
            f"cannot resume from {folder}: it has no adapter weights for this model "
            f"(missing {missing}); it was not written by adapt's Trainer integration, or for "
            f"other adapters than {sorted(adapted.peft_config)}"
        )
    loaded = {n: read_tensors(f) for n, f in folders.items()}  # every file read before any copy
    for name, tensors in loaded.items():
        adapted.load_adapter_state_dict(tensors, name)


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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """For an AdaptedModel: every rank saves through ``save_pretrained`` (which gathers
        what DeepSpeed ZeRO-3 or FSDP shard, the adapter only, and writes from the main
        process), whatever engine trains it; transformers' own path would gather the whole
        model under ZeRO-3, or write an empty file when it cannot."""
        if self._adapted() is None:
            super().save_model(output_dir, _internal_call)  # type: ignore[misc,unused-ignore]
            return
        self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)  # type: ignore[attr-defined]

    def _save(
        self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None
    ) -> None:
        adapted = self._adapted()
        if adapted is None:
            super()._save(output_dir, state_dict)  # type: ignore[misc,unused-ignore]
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        adapted.save_pretrained(
            output_dir,
            is_main_process=bool(self.args.should_save),
            state_dict=state_dict or None,  # a gathered one, if the caller has it
        )
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
