"""transformers' ``Trainer`` for an :class:`~adapt.core.AdaptedModel`.

::

    from adapt.core.integrations.transformers import Trainer

    trainer = Trainer(model=adapt(base, LoraConfig(...)), args=args, train_dataset=data)
    trainer.train()
    trainer.save_model("out")  # adapter_config.json + adapter_model.safetensors

Same arguments as ``transformers.Trainer``. ``save_model`` and each ``checkpoint-N`` hold the
adapters in PEFT's format (no model weights); ``resume_from_checkpoint`` and
``load_best_model_at_end`` read them back. Any other model is handled as transformers does.
"""

from __future__ import annotations

from typing import Any

import transformers

from ._saving import AdapterTrainerMixin

_Trainer: Any = transformers.Trainer  # the same check whether transformers is typed or not


class Trainer(AdapterTrainerMixin, _Trainer):  # type: ignore[misc]
    """``transformers.Trainer`` that saves and resumes adapt adapters in PEFT's format."""


__all__ = ["Trainer"]
