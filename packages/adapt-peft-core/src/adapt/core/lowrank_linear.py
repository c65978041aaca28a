"""A low-rank update on a frozen dense ``nn.Linear`` in one autograd node: ``x Wᵀ + b +
s·(x Aᵀ) Bᵀ`` (LoRA's fast training path; AdaLoRA's with ``A = E ⊙ A``).

The scale ``s`` is a Python float, or a 0-d tensor (a layer prepared for compiled hot-swapping,
whose scaling is filled in place): a float goes into the GEMMs as their ``alpha``; a tensor,
which a GEMM's ``alpha`` cannot take without ``.item()`` (a device sync, and a graph break under
``torch.compile``), multiplies the smaller operand instead (:func:`scaled_addmm_`). The scale
is never trained: its gradient is None. ``A`` and ``B`` may be computed tensors (their
gradients flow on through autograd).
"""

from __future__ import annotations

from typing import Any

import torch

from .amp import autocast_dtype, cast_floating
from .kernels import factor_grad, matmul_factor, rank_major_is_faster, scale_smaller

#: A low-rank scale: a Python number, or a 0-d tensor read only on the device.
Scale = float | torch.Tensor


def scaled_addmm_(
    out: torch.Tensor, p: torch.Tensor, q: torch.Tensor, scale: Scale
) -> torch.Tensor:
    """``out += scale · (p @ q)`` in place: one ``addmm_`` with ``alpha=scale`` for a float;
    for a 0-d tensor the smaller of ``p`` and ``q`` is scaled first."""
    if isinstance(scale, torch.Tensor):
        p, q = scale_smaller(p, q, scale)
        return out.addmm_(p, q)
    return out.addmm_(p, q, alpha=scale)


class LowRankLinearFunction(torch.autograd.Function):
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
        scale: Scale,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        r = weight_a.shape[0]
        if rank_major_is_faster(r, x2.shape[1], x2, "input"):
            h = (weight_a @ x2.t()).t()  # a transposed view of the (r, rows) product
        else:
            h = x2 @ weight_a.t()
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        scaled_addmm_(out, h, weight_b.t(), scale)
        # A serves only the input gradient: not kept where x needs none (a first layer's
        # input; AdaLoRA's E ⊙ A is a fresh r × in tensor)
        kept_a = weight_a if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(x2, weight, kept_a, weight_b, h)
        ctx.scale = scale
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, weight_a, weight_b, h = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grads = low_rank_linear_grads(ctx, g2, g2, x2, weight, weight_a, weight_b, h)
        return (*grads, None)


def low_rank_linear_grads(
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
    The input gradient is one buffer, ``g W + s·(g B) A``; ``s`` (``ctx.scale``) may be a 0-d
    tensor (see the module doc)."""
    scale: Scale = ctx.scale
    needs = ctx.needs_input_grad
    g_b = matmul_factor(g, weight_b)  # (rows, r)
    grad_x = grad_bias = grad_a = grad_b = None
    if needs[0]:
        grad_x = scaled_addmm_(g @ weight, g_b, weight_a, scale).view(ctx.x_shape)
    if ctx.has_bias and needs[2]:
        grad_bias = g_bias.sum(0)
    if needs[3]:
        grad_a = torch.mm(g_b.t(), x2).mul_(scale)
    if needs[4]:
        grad_b = factor_grad(g, h).mul_(scale)
    return grad_x, None, grad_bias, grad_a, grad_b


def low_rank_linear(
    x: torch.Tensor,
    base: torch.nn.Linear,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    scale: Scale,
) -> torch.Tensor | None:
    """``base(x) + s·(x Aᵀ) Bᵀ`` through :class:`LowRankLinearFunction`. Under autocast every
    floating operand is cast to autocast's dtype first (autocast does not reach into a custom
    Function: this is the cast it would make for ``F.linear``); otherwise None unless ``x``, A
    and B share a dtype (the general path)."""
    device_type = x.device.type
    amp = autocast_dtype(device_type)
    if amp is not None:
        # every operand cast: autocast's casts inside the Function are then no-ops (and the
        # in-place product is not one autocast touches), so it need not be switched off
        args = [cast_floating(t, amp) for t in (x, base.weight, base.bias, weight_a, weight_b)]
        out: torch.Tensor = LowRankLinearFunction.apply(*args, scale)  # type: ignore[no-untyped-call]
        return out
    if not x.dtype == weight_a.dtype == weight_b.dtype:
        return None
    out = LowRankLinearFunction.apply(  # type: ignore[no-untyped-call]
        x, base.weight, base.bias, weight_a, weight_b, scale
    )
    return out


def scaling_stamp(value: Scale) -> Any:
    """A scale as part of a cache key: a float as it is; a 0-d tensor (a hot-swap slot, filled
    in place, the same object before and after) by identity and version."""
    if isinstance(value, torch.Tensor):
        return id(value), value._version
    return value
