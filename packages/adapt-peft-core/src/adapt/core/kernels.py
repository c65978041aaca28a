"""Thin-factor GEMM helpers for adapter layers: products with a rank-r factor in the layout
that runs fastest, and the fused ``result + scale · h Wᵀ`` every method's forward can use.

Tier 0: torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def transposed_factor_is_faster(weight: torch.Tensor) -> bool:
    """Whether products with a thin ``(n, r)`` factor run faster through its transpose.

    On the CPU, MKL's float32 GEMM is 2–4× slower for ``g @ B`` and ``gᵀ h`` when the inner or
    outer dimension is a small rank (2 ≤ r ≤ 8: LoRA's usual ranks) than for the same products
    written with the thin operand transposed (measured on 1 and 2 threads, 256–4096 rows; from
    r = 16 on the plain layout is as fast or faster). The rule is static, so every process and
    every step computes in the same order.
    """
    return (
        weight.dim() == 2
        and 2 <= weight.shape[1] <= 8
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
    )


def rank_major_is_faster(r: int, width: int, tensor: torch.Tensor, product: str) -> bool:
    """Whether a product of a rank-``r`` factor with a ``(rows, width)`` activation of
    ``tensor``'s dtype and device runs faster rank-major, computing the ``(r, rows)`` or
    ``(r, width)`` transpose of the result: ``product`` ``"input"`` is ``x Aᵀ`` (as ``A xᵀ``),
    ``"output"`` is ``g B`` (as ``Bᵀ gᵀ``), ``"factor"`` is a factor's gradient ``gᵀ h`` (as
    ``hᵀ g``).

    Measured on the CPU in interleaved pairs (1 and 2 threads, 1024 and 4096 rows, widths 512,
    1376, 2048): only factor gradients gain rank-major, 2–3× in float32 for 2 ≤ r ≤ 8 and
    1.2–2.4× in bfloat16 for r ≤ 32. ``x Aᵀ`` and ``g B`` run faster in the plain layout: in
    bfloat16 1.5–1.9× (r 8 and 16; e.g. 1024 × 512, r 8: 40 vs 77 µs), in float32 up to 1.5×
    and never slower (r 8; e.g. ``g B`` at 1024 × 2048: 891 vs 1168 µs). Other dtypes and
    devices keep the plain layout. The rule is static, so every process and
    every step computes in the same order. ``width`` is kept for rules that depend on it."""
    if tensor.device.type != "cpu" or r < 2:
        return False
    if product != "factor":
        return False
    if tensor.dtype == torch.float32:
        return r <= 8
    return tensor.dtype == torch.bfloat16 and r <= 32


def matmul_factor(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``g @ weight`` for a 2-D ``g`` ``(rows, n)`` and a thin factor ``weight`` ``(n, r)``
    (the input-side gradient of a product with ``weightᵀ``), in the faster layout
    (:func:`rank_major_is_faster`: then a transposed view of the ``(r, rows)`` product)."""
    if rank_major_is_faster(weight.shape[1], g.shape[-1], g, "output"):
        return (weight.t() @ g.t()).t()
    return g @ weight


def factor_grad(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``gᵀ h`` ``(n, r)`` for 2-D ``g`` ``(rows, n)`` and ``h`` ``(rows, r)`` (the gradient of a
    thin factor ``(n, r)`` applied as ``h @ weightᵀ``), in the faster layout; may be a
    transposed view."""
    if rank_major_is_faster(h.shape[-1], g.shape[-1], h, "factor"):
        return (h.t() @ g).t()
    return g.t() @ h


def scale_smaller(
    p: torch.Tensor, q: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, q)`` with the one of fewer elements multiplied by the 0-d tensor ``scale``, so
    that ``p @ q`` (in any layout) becomes ``scale · (p @ q)``.

    GEMMs take their ``alpha`` as a Python number only; a scale held as a tensor (hot-swap
    slots, filled in place) would need ``.item()``, a device sync and, under
    ``torch.compile``, a graph break. Scaling the smaller operand instead costs one small
    elementwise pass (a thin factor, or the rank-sized activations when there are fewer rows)
    and keeps the operand's dtype (a 0-d tensor does not promote)."""
    if p.numel() <= q.numel():
        return p * scale, q
    return p, q * scale


def add_scaled_product(
    result: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    *,
    in_place: bool = False,
) -> torch.Tensor:
    """``result + scale · (h @ weightᵀ)`` in ``result``'s dtype.

    ``h`` is ``(..., k)``, ``weight`` ``(out, k)`` and ``result`` ``(..., out)``. When the dtypes
    agree this is one ``addmm`` (product, scale and sum in a single kernel, and no
    activation-sized temporaries); otherwise the product is computed in ``h``'s dtype and cast.
    With ``in_place`` (see :meth:`AdapterLayer.may_add_in_place`) a 2-D or 3-D ``result`` is
    updated and returned, saving the allocation of a new output. A ``scale`` given as a 0-d
    tensor is never read on the host: the smaller of ``h`` and ``weight`` is multiplied by it
    (:func:`scale_smaller`) and the GEMM runs with ``alpha=1``.
    """
    if isinstance(scale, torch.Tensor):
        h, weight = scale_smaller(h, weight, scale)
        scale = 1.0
    out_features = weight.shape[0]
    fusable = (
        result.dtype == h.dtype == weight.dtype
        and result.dim() >= 2
        and result.shape[-1] == out_features
        and result.shape[:-1] == h.shape[:-1]
        and result.device == h.device
    )
    if not fusable:
        product = F.linear(h, weight)
        if scale != 1.0:
            product = product * scale
        return result + product.to(result.dtype)
    # the backward computes g @ mat2ᵀ; with mat2 = weightᵀ laid out contiguously, that is the
    # fast layout for thin factors (see transposed_factor_is_faster)
    mat2 = weight.t()
    if torch.is_grad_enabled() and transposed_factor_is_faster(weight):
        mat2 = mat2.contiguous()
    if in_place and result.dim() == 3:
        batch = result.shape[0]
        return result.baddbmm_(h, mat2.expand(batch, -1, -1), alpha=scale)
    if in_place and result.dim() == 2:
        return result.addmm_(h, mat2, alpha=scale)
    rows = math.prod(result.shape[:-1])
    summed = torch.addmm(
        result.reshape(rows, out_features),
        h.reshape(rows, h.shape[-1]),
        mat2,
        alpha=scale,
    )
    return summed.view(result.shape)


#: :func:`gathered_low_rank` multiplies every row by every adapter's factors (a dense product
#: with the other adapters' terms masked to zero) when adapters × tokens per row is at most
#: this; above it, it gathers each row's factors. Measured on the CPU (1 thread, rank 16, the
#: seven projections of a Llama layer, h512): 32 rows × 1 token (a decoding step) with 2 / 8
#: adapters 0.26 / 0.67 ms against 1.04 / 1.19 ms gathered, 32 adapters 2.43 against 1.66 ms;
#: 32 × 4 tokens with 2 / 8 adapters 0.61 / 2.02 against 1.30 / 1.49 ms.
DENSE_MIX_LIMIT = 16


def stack_factors(
    a: list[torch.Tensor], b: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors of several adapters stacked for :func:`gathered_low_rank`: ``A``s
    (rᵢ × in) as ``(N, r, in)`` and the transposed ``B``s (out × rᵢ) as ``(N, r, out)``
    (contiguous: the layout a batched product reads fastest, and ``(N·r, out)`` as a view),
    ranks zero-padded to the largest ``r`` (the padding contributes exact zeros);
    differentiable."""
    rank = max(t.shape[0] for t in a)
    a_pad = [F.pad(t, (0, 0, 0, rank - t.shape[0])) if t.shape[0] < rank else t for t in a]
    b_pad = [F.pad(t, (0, rank - t.shape[1])) if t.shape[1] < rank else t for t in b]
    return torch.stack(a_pad), torch.stack([t.t() for t in b_pad])


def gathered_low_rank(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x[i] A[slots[i]]ᵀ) B[slots[i]]ᵀ`` for every row ``i`` of ``x`` (rows on dim 0, any
    token dims, features last): each row's adapter's low-rank product, all rows in two
    products whatever the number of adapters (``a``, ``b`` from :func:`stack_factors`).
    Few tokens per row (decoding, see :data:`DENSE_MIX_LIMIT`): one product with all adapters'
    stacked factors, the other adapters' terms masked to zero; otherwise batched products
    with each row's factors gathered. With ``out`` (contiguous, ``x``'s rows and tokens,
    ``b``'s dtype) the product is added into it in place and ``out`` returned: no
    product-sized buffer, no extra pass."""
    rows, n_adapters, rank = x.shape[0], a.shape[0], a.shape[1]
    flat = x.to(a.dtype).reshape(rows, -1, x.shape[-1])
    tokens = flat.shape[1]
    if n_adapters * tokens <= DENSE_MIX_LIMIT:
        h = F.linear(flat, a.reshape(n_adapters * rank, -1)).view(rows, tokens, n_adapters, rank)
        every = torch.arange(n_adapters, device=slots.device)
        mask = (slots.view(rows, 1) == every).to(h.dtype).view(rows, 1, n_adapters, 1)
        masked = (h * mask).view(rows * tokens, n_adapters * rank)
        b_all = b.reshape(n_adapters * rank, -1)
        if out is not None:
            out.view(rows * tokens, -1).addmm_(masked, b_all)
            return out
        return torch.mm(masked, b_all).view(*x.shape[:-1], b.shape[-1])
    h = torch.bmm(flat, a.index_select(0, slots).transpose(1, 2))
    b_rows = b.index_select(0, slots)
    if out is not None:
        out.view(rows, -1, out.shape[-1]).baddbmm_(h, b_rows)
        return out
    y = torch.bmm(h, b_rows)
    return y.reshape(*x.shape[:-1], y.shape[-1])
