"""DoRA on a plain ``nn.Linear`` base in one pass: ``out = c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b``.

That is the definition rearranged (``base + (c − 1)·xWᵀ + c·s·BAx`` with ``base = xWᵀ + b``):
one GEMM with ``W`` and the two thin LoRA products, then one elementwise pass, instead of the
base output, a second copy of it scaled, and the LoRA output scaled again. The backward saves
one activation-sized tensor (``y = x Wᵀ + s·h Bᵀ``, for the magnitude's gradient) and writes
the input gradient once. ``c`` stays in float32: under autocast ``y ⊙ c`` is computed at
float32 and rounded once into ``y``'s dtype (``c`` itself is never rounded to half precision,
where a scale near 1 would lose its digits). The LoRA scale ``s`` may be a 0-d tensor (a layer
prepared for compiled hot-swapping), as in :mod:`adapt.lora.lora_kernels`.
"""

from __future__ import annotations

from typing import Any

import torch

from .lora_kernels import Scale, lora_linear_grads, scaled_addmm_


def _scaled(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``c ⊙ y`` in ``y``'s dtype, computed at ``c``'s precision (out of place)."""
    out = torch.empty_like(y)
    return torch.mul(y, c, out=out)


def _unscaled(
    x2: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: Scale
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, y)``: ``h = x Aᵀ`` and ``y = x Wᵀ + s·h Bᵀ`` (one output buffer)."""
    h = x2 @ a.t()
    y = x2 @ weight.t()
    scaled_addmm_(y, h, b.t(), scale)
    return h, y


def dora_linear_no_grad(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    scale: Scale,
) -> torch.Tensor:
    """The forward without autograd state, in place on one output buffer."""
    _, y = _unscaled(x.reshape(-1, x.shape[-1]), weight, a, b, scale)
    y.mul_(c)
    if bias is not None:
        y.add_(bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class DoraLinearFunction(torch.autograd.Function):
    """The fused DoRA linear with its backward (gradients to x, b, A, B and ``c``)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        c: torch.Tensor,
        scale: Scale,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h, y = _unscaled(x2, weight, a, b, scale)
        out = _scaled(y, c)
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(x2, weight, a, b, h, y, c)
        ctx.scale = scale
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, a, b, h, y, c = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gc = _scaled(g2, c)  # the gradient at y = x Wᵀ + s·h Bᵀ
        grads = lora_linear_grads(ctx, gc, g2, x2, weight, a, b, h)
        grad_c = None
        if ctx.needs_input_grad[5]:
            acc = torch.promote_types(g2.dtype, torch.float32)
            grad_c = (g2 * y).sum(0, dtype=acc).to(c.dtype)
        return (*grads, grad_c, None)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    scale: Scale,
) -> torch.Tensor:
    """``c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b``: the autograd node when gradients are on, else the
    in-place forward."""
    if torch.is_grad_enabled():
        out: torch.Tensor = DoraLinearFunction.apply(x, weight, bias, a, b, c, scale)  # type: ignore[no-untyped-call]
        return out
    return dora_linear_no_grad(x, weight, bias, a, b, c, scale)
