"""Preparing a quantised model for adapter training (QLoRA-style)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

QUANTISED_PARAMS = ("Int8Params", "Params4bit")


def _is_quantised(param: torch.Tensor) -> bool:
    return type(param).__name__ in QUANTISED_PARAMS or not param.is_floating_point()


def prepare_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Get a model loaded in 8 or 4 bits ready to train adapters on it; returns ``model``.

    What it does, as PEFT's function of the same name does:

    * freezes every base parameter (adapters added afterwards are the only trainable ones);
    * casts every parameter that is not quantised and is float16/bfloat16 (layer norms, the
      embeddings, the output head) to float32, so the norms and the loss are computed in full
      precision and the 4-bit layers receive float32 activations;
    * with ``use_gradient_checkpointing``, turns on the model's gradient checkpointing
      (``gradient_checkpointing_kwargs`` are passed through, e.g. ``{"use_reentrant": False}``)
      and makes the input embeddings' output require grad, so gradients reach the adapters
      through checkpointed blocks even though the embeddings are frozen.

    Call it on the base model before ``adapt(model, config)``.
    """
    for param in model.parameters():
        param.requires_grad_(False)

    for module in model.modules():
        for param in module.parameters(recurse=False):
            if _is_quantised(param) or param.dtype not in (torch.float16, torch.bfloat16):
                continue
            param.data = param.data.float()
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.dtype in (torch.float16, torch.bfloat16):
                setattr(module, name, buf.float())

    if use_gradient_checkpointing:
        enable_input_grads(model)
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is not None:
            if gradient_checkpointing_kwargs is None:
                enable()
            else:
                enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    return model


def enable_input_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad (needed by gradient checkpointing with
    a frozen embedding layer)."""
    builtin = getattr(model, "enable_input_require_grads", None)
    if builtin is not None:
        builtin()
        return
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if get_embeddings is not None else None
    if embeddings is None:
        return

    def make_output_require_grad(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    embeddings.register_forward_hook(make_output_require_grad)
