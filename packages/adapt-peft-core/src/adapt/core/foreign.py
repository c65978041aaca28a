"""What other libraries do to a model that an :class:`~adapt.core.AdaptedModel` must answer.

Tier 0: no adapt imports. The knowledge of a foreign library's habits lives here, so that the
model class only asks ``is_trl_fused_head(value)`` and the integrations
(:mod:`adapt.core.integrations`) say what to do instead.

TRL's ``SFTTrainer`` and ``DPOTrainer`` replace the model's ``forward`` with a *fused LM head*
(``trl.trainer.utils.add_fused_lm_head``): a function that runs ``self.base_model`` as the
transformers backbone and multiplies its hidden states by ``self.get_output_embeddings().weight``.
On an ``AdaptedModel``, ``base_model`` is adapt's host module (PEFT's key layout, which users rely
on), so that forward cannot work on the wrapper; it works on the wrapped transformers model,
which is where TRL puts it for a PEFT model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INTEGRATION_HINT = (
    "use adapt's integration, which knows AdaptedModel: "
    "`from adapt.core.integrations.trl import SFTTrainer, DPOTrainer` "
    "(same arguments as TRL's; see docs/guides/training-stacks.md)"
)

PLAIN_TRL_MESSAGE = (
    "TRL's trainer is patching this AdaptedModel's forward with its fused LM head, which "
    "needs the transformers model inside (model.base_model.model) and would fail or save the "
    "whole model; TRL only knows PEFT's PeftModel. Instead " + INTEGRATION_HINT
)


def _code_of(value: Any) -> Any:
    func = getattr(value, "__func__", value)
    return getattr(func, "__code__", None)


def is_trl_fused_head(value: Any) -> bool:
    """Whether ``value`` is the forward that ``trl``'s ``add_fused_lm_head`` installs.

    TRL wraps it with ``functools.wraps(type(model).forward)``, so its name and module are the
    model's; its code object still says where it was written.
    """
    code = _code_of(value)
    if code is None or code.co_name != "_fused_forward":
        return False
    return "trl" in Path(code.co_filename).parts


PLAIN_TRAINER_SAVE_MESSAGE = (
    "transformers' Trainer is saving this AdaptedModel as a whole state_dict "
    "(model.safetensors, every base weight included), not as an adapter folder: it saves "
    "adapters only for PEFT's PeftModel. To write adapter_config.json + "
    "adapter_model.safetensors (PEFT's format) in save_model and every checkpoint, use "
    "`from adapt.core.integrations.transformers import Trainer` (same arguments; TRL: "
    "adapt.core.integrations.trl); see docs/guides/training-stacks.md"
)


def called_by_plain_trainer_save(frame: Any) -> bool:
    """Whether ``frame`` is transformers' ``Trainer._save`` writing a model's whole state dict
    (adapt's integrations never get there for an AdaptedModel)."""
    return (
        frame is not None
        and frame.f_code.co_name == "_save"
        and str(frame.f_globals.get("__name__", "")) == "transformers.trainer"
    )
