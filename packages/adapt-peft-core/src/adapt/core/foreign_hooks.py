"""How the adapted model meets other libraries' habits (the base of ``AdaptedModel``).

* TRL assigns its fused LM head to ``model.forward``: adapt's TRL integration puts it on the
  wrapped transformers model instead; without the integration it is refused with the fix.
* transformers' plain ``Trainer`` saves a whole ``state_dict``: the first such save warns that
  it is not an adapter folder and names the integration that writes one.
* transformers' ``gradient_checkpointing_enable`` with input grads on, so a frozen embedding
  still lets gradients reach the adapters.

The model's flags live in its adapter set (``self._adapters``, set by ``AdaptedModel``).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from .errors import IntegrationError, warn_user
from .foreign import (
    PLAIN_TRAINER_SAVE_MESSAGE,
    PLAIN_TRL_MESSAGE,
    called_by_plain_trainer_save,
    is_trl_fused_head,
)


class ForeignHooks(nn.Module):
    """TRL's fused head, the plain Trainer's save, transformers' gradient checkpointing."""

    _adapters: Any
    model: Any

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and is_trl_fused_head(value):
            handler = self._adapters.fused_head_handler
            if handler is None:
                raise IntegrationError(PLAIN_TRL_MESSAGE)
            handler(self, value)
            return
        super().__setattr__(name, value)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        if not self._adapters.warned_plain_save and called_by_plain_trainer_save(sys._getframe(1)):
            self._adapters.warned_plain_save = True
            warn_user(PLAIN_TRAINER_SAVE_MESSAGE)
        return super().state_dict(*args, **kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """The wrapped transformers model's gradient checkpointing (transformers' signature),
        with input grads on so a frozen embedding still lets gradients reach the adapters
        (once: re-enabling, as TRL does around reference passes, adds no hook)."""
        self.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs
        )
        enable = getattr(self.model, "enable_input_require_grads", None)
        if callable(enable) and not self._adapters.input_grads_on:
            enable()
            self._adapters.input_grads_on = True
