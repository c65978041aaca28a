"""transformers ``Trainer`` support (transformers stays optional: imported when called).

``Trainer`` knows two kinds of model it can save with ``save_pretrained``: transformers'
``PreTrainedModel`` and PEFT's ``PeftModel``. For any other model, an :class:`AdaptedModel`
included, its checkpoints hold the whole model's ``state_dict()`` (``model.safetensors``: enough
to resume training, but not an adapter folder). :func:`AdapterCheckpointCallback` also writes
the adapter, in PEFT's format, into every ``checkpoint-N`` folder, so any checkpoint loads with
``AdaptedModel.from_pretrained(base, "out/checkpoint-N")`` or PEFT.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import AdaptedModel


def find_adapted(model: Any) -> AdaptedModel | None:
    """The :class:`AdaptedModel` that ``model`` is or wraps (DDP / accelerate ``.module``,
    ``torch.compile``'s ``._orig_mod``), or None."""
    from .model import AdaptedModel

    for _ in range(5):
        if isinstance(model, AdaptedModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            return None
    return None


def unwrap_adapted(model: Any, *, purpose: str = "this") -> AdaptedModel:
    """:func:`find_adapted`, or a ``TypeError`` that says what was passed."""
    adapted = find_adapted(model)
    if adapted is None:
        raise TypeError(
            f"{purpose} needs the AdaptedModel that adapt() returned (or a "
            f"DistributedDataParallel around it), got {type(model).__name__}"
        )
    return adapted


def AdapterCheckpointCallback() -> Any:
    """A transformers ``TrainerCallback`` that saves the adapters into each checkpoint folder::

        trainer = Trainer(model=model, args=args, train_dataset=data,
                          callbacks=[AdapterCheckpointCallback()])

    Every rank calls ``save_pretrained`` (FSDP2 gathers shards collectively); the main process
    writes. For the final adapter call ``model.save_pretrained(dir)``: ``trainer.save_model``
    writes the whole state dict, as for any model that is not a transformers or PEFT model.
    """
    try:
        from transformers import TrainerCallback
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    except ImportError as exc:  # pragma: no cover - transformers is optional
        raise ImportError(
            "AdapterCheckpointCallback is for transformers' Trainer: `pip install transformers`"
        ) from exc

    class _AdapterCheckpointCallback(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = unwrap_adapted(kwargs.get("model"), purpose="AdapterCheckpointCallback")
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            model.save_pretrained(folder, is_main_process=bool(state.is_world_process_zero))

    _AdapterCheckpointCallback.__name__ = "AdapterCheckpointCallback"
    _AdapterCheckpointCallback.__qualname__ = "AdapterCheckpointCallback"
    return _AdapterCheckpointCallback()
