"""VeRA's training step with less arithmetic: the forward through ``W + ΔW``.

The definition, ``y = x Wᵀ + λ_b ⊙ (B_s (λ_d ⊙ A_s x))``, costs per layer two thin products
forward (``h = x A_sᵀ``, then ``B_s``) and two backward (``g B_s`` for λ_d and for the input
gradient, then ``A_s``), each ``rows · r · features``. With ``ΔW = (λ_b ⊙ B_s)(λ_d ⊙ A_s)``
formed once per step (``r · in · out``) the same step is

* forward ``y = x (W + ΔW)ᵀ``: the base layer's own product, on the merged weight;
* input gradient ``g (W + ΔW)``: the base layer's own backward product, on the same weight;
* both λ gradients from one ``P = gᵀ h`` (``out × r``; ``h = x A_sᵀ`` is the basis
  projection, shared by the layers that read one input): ``∂λ_b = (P ⊙ B_s) λ_d`` and
  ``∂λ_d = λ_bᵀ (P ⊙ B_s)``.

Exact in exact arithmetic; float32 only (in half precision ``W + ΔW`` would round a small ΔW
away, so autocast keeps the definition's order). Whether it pays depends on the rows and the
layer's shape (:func:`merged_training_pays`): the merged weight costs ``r · in · out`` and saves
``rows · r · (out + in_shared)``.

Under bf16 autocast :class:`VeraScaledBasisFunction` keeps the adapter a separate product but
folds both λ into the ``out × r`` slice: one GEMM added onto the base output forward, ``g B''``
and ``P = gᵀ h`` backward, and none of the definition's activation-sized float32 scale and
cast passes (a bf16 GEMM of rank 256 costs less than those on CPUs with bf16 matrix units).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from adapt.core.basis import ProjectionReaders

__all__ = [
    "VeraLinearFunction",
    "VeraMergedFunction",
    "VeraScaledBasisFunction",
    "merged_training_pays",
]

#: the fraction of ``h = x A_sᵀ``'s cost a layer counts as its own: q/k/v share one input
#: (1/3 each), gate/up (1/2), o/down have their own (1); the middle is used
SHARED_INPUT_FRACTION = 0.5
#: how much the saving must beat forming ``W + ΔW`` by: 1 (single-layer steps measured on
#: CPU, float32, r 256, 1024 rows: the merged step's extra cost 0.25–0.5 × the definition's
#: for 512 → 512, 512 → 1376, 1376 → 512 and 1024 → 2752; 0.8–0.9 × at the break-even point
#: of the rule, 256 rows of 512 → 512)
MARGIN = 1.0


def merged_training_pays(rows: int, n_in: int, n_out: int) -> bool:
    """Whether a training step of a VeRA layer (``n_in`` → ``n_out``, ``rows`` input rows)
    is cheaper through ``W + ΔW`` (see the module doc): it saves ``rows · r · (out + f·in)``
    multiply-adds and spends ``r · in · out`` (``r`` cancels)."""
    saved = rows * (n_out + SHARED_INPUT_FRACTION * n_in)
    return saved > MARGIN * n_in * n_out


def first_order_only(node: str) -> None:
    """Refuse a backward that builds a graph (``create_graph=True``): the nodes' backwards
    reuse products kept without one, so a second derivative through them would be wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"VeRA's training node {node} has no second derivative (backward with "
            "create_graph=True); for higher-order gradients set `fuse_adapter_output = False` "
            "on every adapt.vera.VeraLayer of the model (the general path, slower)"
        )


def lambda_grads(
    g2: torch.Tensor,
    h: torch.Tensor,
    b: torch.Tensor,
    lambda_b: torch.Tensor,
    lambda_d: torch.Tensor,
    needs: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both λ gradients from one ``P = gᵀ h`` (``g2`` is ``rows × out``, ``h`` ``… × r``):
    ``∂λ_b = (P ⊙ B_s) λ_d`` and ``∂λ_d = λ_bᵀ (P ⊙ B_s)``, in ``B_s``'s dtype (float32) whatever
    ``g`` and ``h`` hold; ``needs`` says which of the two are wanted."""
    if not (needs[0] or needs[1]):
        return None, None
    p = torch.mm(g2.t(), h.reshape(-1, h.shape[-1])).to(b.dtype).mul_(b)  # P ⊙ B_s, (out, r)
    return (p @ lambda_d if needs[0] else None), (lambda_b @ p if needs[1] else None)


class VeraMergedFunction(torch.autograd.Function):
    """``x (W + (λ_b ⊙ B_s)(λ_d ⊙ A_s))ᵀ + bias`` for a frozen dense ``W`` (``out × in``) and
    frozen basis slices ``A_s`` (``r × in``), ``B_s`` (``out × r``), with ``h = x A_sᵀ`` given
    (computed once for the layers sharing ``x``; no gradient flows through it here): gradients
    for ``x``, the bias, λ_b and λ_d as in the module doc."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lambda_b: torch.Tensor,
        lambda_d: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        h: torch.Tensor,
    ) -> torch.Tensor:
        merged = torch.addmm(weight, lambda_b[:, None] * b, lambda_d[:, None] * a)
        # W + ΔW serves only the input gradient: not kept where x needs none (out × in)
        ctx.save_for_backward(merged if ctx.needs_input_grad[0] else None, h, b, lambda_b, lambda_d)
        ctx.has_bias = bias is not None
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        first_order_only("VeraMergedFunction")
        merged, h, b, lambda_b, lambda_d = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_bias = None
        if needs[0]:
            grad_x = (g2 @ merged).view(*grad.shape[:-1], merged.shape[1])
        if ctx.has_bias and needs[2]:
            grad_bias = g2.sum(0)
        grad_lb, grad_ld = lambda_grads(g2, h, b, lambda_b, lambda_d, (needs[3], needs[4]))
        return grad_x, None, grad_bias, grad_lb, grad_ld, None, None, None


class VeraLinearFunction(torch.autograd.Function):
    """``x Wᵀ + bias + λ_b ⊙ (B_s (λ_d ⊙ h))``: a float32 (or float64) training step in the
    definition's order, for layers where :func:`merged_training_pays` says no. ``h`` must be
    exactly ``x A_sᵀ`` for this ``x`` and the frozen ``a = A_s`` (the backward may compute
    ``h``'s share of ``∂x`` from ``A_s`` itself). The forward is the general path's, operation
    for operation; it keeps what the general path keeps (``B_s(λ_d ⊙ h)`` only for ``∂λ_b``,
    ``h`` only for ``∂λ_d``). The backward:

    * ``q = g (λ_b ⊙ B_s)`` (λ_b folded into the ``out × r`` slice: one ``rows × out``
      temporary fewer than the general path), ``∂λ_d = Σ q ⊙ h``, ``∂h = λ_d ⊙ q``,
      ``∂λ_b = Σ g ⊙ B_s(λ_d ⊙ h)``;
    * ``∂x = g W``, and where ``h`` has one reader (:class:`~adapt.core.basis.ProjectionReaders`;
      ``readers`` None: one) ``∂h A_s`` is added into it in place and ``h`` gets no gradient.
      With several readers ``∂h`` goes to ``h`` and autograd sums the readers' before its one
      product with ``A_s``. Without this, the input's gradient from the base and the one
      through ``h`` would be two input-sized tensors added by autograd. Both are exact for
      any count; the count only picks the cheaper one.

    First-order only (:func:`first_order_only`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lambda_b: torch.Tensor,
        lambda_d: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        h: torch.Tensor,
        readers: ProjectionReaders | None,
    ) -> torch.Tensor:
        projected = F.linear(lambda_d * h, b)
        y = F.linear(x, weight, bias).addcmul_(lambda_b, projected)
        needs = ctx.needs_input_grad
        ctx.save_for_backward(
            weight, a, b, h if needs[4] else None, projected if needs[3] else None, lambda_b,
            lambda_d,
        )  # fmt: skip
        ctx.has_bias = bias is not None
        ctx.h_shape = h.shape
        ctx.readers = readers
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        first_order_only("VeraLinearFunction")
        weight, a, b, h, projected, lambda_b, lambda_d = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_bias = grad_lb = grad_ld = grad_h = None
        if needs[3]:
            grad_lb = (g2 * projected.reshape(g2.shape)).sum(0)
        if needs[0] or needs[4] or needs[7]:
            q = g2 @ (lambda_b[:, None] * b)  # (rows, r)
            if needs[4]:
                grad_ld = (q * h.reshape(q.shape)).sum(0)
            grad_h2 = q.mul_(lambda_d)
            sole = ctx.readers is None or ctx.readers.count == 1
            fold = needs[0] and needs[7] and sole
            if needs[0]:
                grad_x2 = g2 @ weight
                if fold:
                    grad_x2.addmm_(grad_h2, a)
                grad_x = grad_x2.view(*grad.shape[:-1], weight.shape[1])
            if needs[7] and not fold:
                grad_h = grad_h2.view(ctx.h_shape)
        if ctx.has_bias and needs[2]:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, grad_lb, grad_ld, None, None, grad_h, None


class VeraScaledBasisFunction(torch.autograd.Function):
    """``result + h (λ_b ⊙ B_s ⊙ λ_dᵀ)ᵀ`` in ``h``'s dtype (bfloat16 under autocast): the λ
    fold into the ``out × r`` slice, so the adapter is one GEMM added onto the base output and
    no activation-sized element-wise pass runs (the definition scales and casts ``rows × out``
    float32 tensors forward and backward).

    ``h = x A_sᵀ`` (shared by the layers reading ``x``) and ``result`` come in ``h``'s dtype,
    ``b = B_s`` and the λ in float32. Backward: ``∂result = g``, ``∂h = g B''`` with
    ``B'' = λ_b ⊙ B_s ⊙ λ_dᵀ``, and both λ gradients from ``P = gᵀ h`` (``out × r``):
    ``∂λ_b = (P ⊙ B_s) λ_d``, ``∂λ_d = λ_bᵀ (P ⊙ B_s)`` (float32). With ``in_place``
    ``result`` (a fresh base output, :meth:`~adapt.core.AdapterLayer.may_add_in_place`) is
    updated and returned.
    """

    @staticmethod
    def forward(
        ctx: Any,
        result: torch.Tensor,
        h: torch.Tensor,
        lambda_b: torch.Tensor,
        lambda_d: torch.Tensor,
        b: torch.Tensor,
        in_place: bool,
    ) -> torch.Tensor:
        scaled = (lambda_b[:, None] * b).mul_(lambda_d).to(h.dtype)
        ctx.save_for_backward(h, scaled if ctx.needs_input_grad[1] else None, b, lambda_b, lambda_d)
        h2 = h.reshape(-1, h.shape[-1])
        if in_place:
            ctx.mark_dirty(result)
            result.view(-1, result.shape[-1]).addmm_(h2, scaled.t())
            return result
        return torch.addmm(result.reshape(-1, result.shape[-1]), h2, scaled.t()).view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        first_order_only("VeraScaledBasisFunction")
        h, scaled, b, lambda_b, lambda_d = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1]).to(h.dtype)
        grad_h = None
        if needs[1]:
            grad_h = (g2 @ scaled).view(h.shape)
        grad_lb, grad_ld = lambda_grads(g2, h, b, lambda_b, lambda_d, (needs[2], needs[3]))
        return grad if needs[0] else None, grad_h, grad_lb, grad_ld, None, None
