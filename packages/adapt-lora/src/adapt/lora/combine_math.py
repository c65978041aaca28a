"""The arithmetic of adapter combination, on stacks of task tensors (one per adapter).

The definitions are PEFT's (``peft.utils.merge_utils``), written anew: task arithmetic is the
weighted sum; magnitude pruning keeps the ``int(density · n)`` entries of largest magnitude;
DARE keeps each entry with probability ``density`` and divides the kept ones by ``density``;
TIES elects a sign per entry (the sign of the sum, ``"total"``, or of the count of signs,
``"frequency"``; zero counts as positive), then averages the weighted entries that agree with
it. The random draws are one ``torch.bernoulli`` per tensor, in order, on ``generator`` (the
global RNG when None), so the same seed gives PEFT's masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["RANDOM", "SIGN_ELECTING", "combine_tasks", "lowrank_svd_factors", "svd_factors"]

#: the types that draw random masks (DARE), and those that elect signs (TIES)
RANDOM = frozenset({"dare_linear", "dare_ties"})
SIGN_ELECTING = frozenset({"ties", "dare_ties"})
_PRUNED_BY_MAGNITUDE = frozenset({"ties", "magnitude_prune"})


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density · numel)`` largest-magnitude entries zeroed."""
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)
    keep = int(density * flat.numel())
    mask = torch.zeros_like(flat)
    mask[flat.abs().topk(keep).indices] = 1
    return (flat * mask).reshape(tensor.shape)


def drop_random(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE: each entry kept with probability ``density``, the kept ones divided by it."""
    if density >= 1:
        return tensor
    probability = torch.full_like(tensor, density)
    mask = torch.bernoulli(probability, generator=generator)
    return tensor * mask / density


def elected_sign_mask(stack: torch.Tensor, method: str) -> torch.Tensor:
    """Where each task's sign agrees with the elected sign (stack: tasks on dim 0)."""
    signs = stack.sign()
    votes = stack.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stack.dtype)
    return signs == elected


def combine_tasks(
    kind: str,
    tasks: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    sign_method: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Combine ``tasks`` by ``kind`` (``linear``, ``ties``, ``dare_linear``, ``dare_ties``,
    ``magnitude_prune``) with ``weights``; the tasks' dtype throughout."""
    if kind in _PRUNED_BY_MAGNITUDE:
        tasks = [keep_largest(t, density) for t in tasks]
    elif kind in RANDOM:
        tasks = [drop_random(t, density, generator) for t in tasks]
    stack = torch.stack(list(tasks))
    factor = torch.tensor(list(weights), dtype=stack.dtype, device=stack.device)
    weighted = stack * factor.view((-1,) + (1,) * (stack.dim() - 1))
    if kind not in SIGN_ELECTING:
        return weighted.sum(dim=0)
    agree = elected_sign_mask(stack, sign_method)
    kept = (weighted * agree).sum(dim=0)
    return kept / agree.sum(dim=0).clamp(min=1)


def svd_factors(
    delta: torch.Tensor,
    rank: int,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of rank ``rank`` with ``B @ A`` the best rank-``rank`` approximation of the
    2-D ``delta`` (``B = U·S``, ``A = Vh``); with ``clamp``, both clamped to ±the ``clamp``
    quantile of their joined entries (PEFT's ``svd_clamp``)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    return _clamped(u[:, :rank] * s[:rank], vh[:rank, :], clamp)


def lowrank_svd_factors(
    b_cat: torch.Tensor, a_cat: torch.Tensor, rank: int, clamp: float | None, driver: str | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`svd_factors` of ``ΔW = b_cat @ a_cat`` (ranks ≤ R = the inner size) without
    forming ΔW: reduced QR of ``b_cat`` and ``a_catᵀ``, the SVD of the small core
    ``R_b R_aᵀ`` (R × R), rotated back — the same singular triplets up to round-off (and the
    signs, which no SVD fixes). None when ``rank`` exceeds the rank the route can give (then
    the dense SVD pads with directions of zero singular value)."""
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    if rank > min(r_b.shape[0], r_a.shape[0]):
        return None
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False, driver=driver)
    b = q_b @ (u[:, :rank] * s[:rank])
    a = vh[:rank, :] @ q_a.T
    return _clamped(b, a, clamp)


def _clamped(
    b: torch.Tensor, a: torch.Tensor, clamp: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if clamp is not None:
        high = torch.quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), clamp)
        b = b.clamp(-high, high)
        a = a.clamp(-high, high)
    return b, a
