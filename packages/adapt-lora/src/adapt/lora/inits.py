"""The factor math of the initialisations that start from the base weight ``W`` (canonical
``(out, in)`` layout, float32): PiSSA, OLoRA and LoftQ, in PEFT's definitions.

* PiSSA (Meng et al., 2024): the top-r singular triplets ``W ≈ U S Vᵀ``; with ``s`` the LoRA
  scaling, ``A = √(S/s) Vᵀ``, ``B = U √(S/s)``, so ``s·BA`` is W's best rank-r part and the base
  keeps the residual ``W − s·BA``. The exact route takes the eigenvectors of the smaller Gram
  matrix (``W Wᵀ`` or ``Wᵀ W``) instead of a full SVD — the same triplets at a fraction of the
  work — and falls back to the SVD when the spectrum is too flat for the Gram's precision.
  ``niter=K`` is PEFT's randomised route (``torch.svd_lowrank``, K subspace iterations; it draws
  from the global RNG as PEFT does).
* OLoRA (Büyükakyüz, 2024): ``W = QR``; ``B = Q[:, :r]``, ``A = R[:r]``, base ``W − s·BA``.
* LoftQ (Li et al., 2023): alternate ``Q = quant(W − BA)`` and ``BA = best rank-r part of
  W − Q``; the base becomes ``Q`` (dequantised). adapt scales the factors so that ``s·BA`` is
  that best part — PEFT stores the unscaled factors, which is the same only when s = 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["full_float32", "loftq_factors", "olora_factors", "pissa_factors", "top_singular"]

#: below this ratio of the r-th to the first singular value the Gram route loses digits
#: (its precision is ε·σ₁² on σ²): use the SVD
_GRAM_FLOOR = 5e-2


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """float32 products in full precision (no TF32 on CUDA, no bf16 passes on the CPU) while
    the Gram matrix is formed: its eigenvectors need every bit."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def top_singular(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U (m, r), S (r,), Vh (r, n))``: the ``r`` largest singular triplets of ``weight``."""
    with full_float32():
        return _top_singular(weight, r)


def _top_singular(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = weight.shape
    if m <= n:
        values, vectors = torch.linalg.eigh(weight @ weight.T)
        u = vectors[:, -r:].flip(1)
        s = values[-r:].flip(0).clamp_min(0).sqrt()
        if s[-1] > _GRAM_FLOOR * s[0]:
            return u, s, (u.T @ weight) / s[:, None]
    else:
        values, vectors = torch.linalg.eigh(weight.T @ weight)
        v = vectors[:, -r:].flip(1)
        s = values[-r:].flip(0).clamp_min(0).sqrt()
        if s[-1] > _GRAM_FLOOR * s[0]:
            return (weight @ v) / s, s, v.T
    full_u, full_s, full_vh = torch.linalg.svd(weight, full_matrices=False)
    return full_u[:, :r], full_s[:r], full_vh[:r]


def pissa_factors(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r))`` of PiSSA: ``scaling · B A`` is ``weight``'s top-r part."""
    if niter is None:
        u, s, vh = top_singular(weight, r)
    else:
        u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
        vh = v.T
    root = (s / scaling).sqrt()
    return (root[:, None] * vh).contiguous(), (u * root).contiguous()


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B) = (R[:r], Q[:, :r])`` of ``weight = QR`` (PEFT's OLoRA: not rescaled)."""
    q, rr = torch.linalg.qr(weight)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def loftq_factors(
    weight: torch.Tensor,
    r: int,
    scaling: float,
    iterations: int,
    roundtrip: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, Q)``: LoftQ's alternation (``roundtrip`` quantises and dequantises); ``Q`` is
    the dequantised base weight and ``Q + scaling · B A`` approximates ``weight``."""
    target = weight
    low_rank = torch.zeros_like(weight)
    dequantised = weight
    left = right = weight[:, :0]
    for step in range(iterations):
        dequantised = roundtrip(target - low_rank if step else target)
        u, s, vh = top_singular(weight - dequantised, r)
        root = s.sqrt()
        left, right = u * root, root[:, None] * vh
        if step + 1 < iterations:
            low_rank = left @ right
    factor = scaling**-0.5
    return (right * factor).contiguous(), (left * factor).contiguous(), dequantised
