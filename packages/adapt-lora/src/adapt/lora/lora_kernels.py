"""LoRA on a frozen dense ``nn.Linear`` in one autograd node (the fast training path)."""

from __future__ import annotations

from typing import Any

import torch

from adapt.core import factor_grad, matmul_factor


class LoraLinearFunction(torch.autograd.Function):
    """``x Wᵀ + b + s·(x Aᵀ) Bᵀ`` for a frozen dense ``W``, with a backward that writes the
    input gradient once: ``g W + s·(g B) A`` (one buffer, the adapter's part added in place)
    instead of two activation-sized gradients that autograd then sums."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_a: torch.Tensor,
        weight_b: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ weight_a.t()
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        out.addmm_(h, weight_b.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, weight_a, weight_b, h)
        ctx.scale = scale
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, weight_a, weight_b, h = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grads = lora_linear_grads(ctx, g2, g2, x2, weight, weight_a, weight_b, h)
        return (*grads, None)


def lora_linear_grads(
    ctx: Any,
    g: torch.Tensor,
    g_bias: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    h: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``y = x Wᵀ + s·h Bᵀ`` (``h = x Aᵀ``) for ``g = ∂L/∂y`` (rows × out):
    ``(x, W: None, bias, A, B)``, each only where ``ctx.needs_input_grad`` asks; the bias gets
    ``g_bias`` summed (its gradient may differ from ``g``: DoRA scales ``y``, not the bias).
    The input gradient is one buffer, ``g W + s·(g B) A``."""
    scale: float = ctx.scale
    needs = ctx.needs_input_grad
    g_b = matmul_factor(g, weight_b)  # (rows, r)
    grad_x = grad_bias = grad_a = grad_b = None
    if needs[0]:
        grad_x = (g @ weight).addmm_(g_b, weight_a, alpha=scale).view(ctx.x_shape)
    if ctx.has_bias and needs[2]:
        grad_bias = g_bias.sum(0)
    if needs[3]:
        grad_a = torch.mm(g_b.t(), x2).mul_(scale)
    if needs[4]:
        grad_b = factor_grad(g, h).mul_(scale)
    return grad_x, None, grad_bias, grad_a, grad_b
