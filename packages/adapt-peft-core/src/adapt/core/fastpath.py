"""When an adapter layer may take a faster route than the definition's order: adding into the
base output in place, computing base and adapter together, or merging ΔW on the fly.

Each predicate is conservative: any forward hook (the module's or a global one), a trainable
or non-plain weight, or a dtype mismatch keeps the general path, which is exact.
"""

from __future__ import annotations

import torch
from torch import nn


def global_forward_hooks() -> bool:
    """Whether any module-global forward hook is registered (it could keep base outputs)."""
    hooks = getattr(nn.modules.module, "_global_forward_hooks", None)
    return bool(hooks)


def may_add_in_place(base: nn.Module, result: torch.Tensor) -> bool:
    """Whether ``result``, the output of ``base``, may be updated in place: a plain
    ``nn.Linear`` (its backward does not need its output), not a view, and no hook could
    hold a reference to it."""
    return (
        type(base) is nn.Linear
        and result._base is None
        and not (result.is_leaf and result.requires_grad)
        and not base._forward_hooks
        and not global_forward_hooks()
    )


def plain_linear(base: nn.Module, x: torch.Tensor, autocast: bool = False) -> bool:
    """Whether ``base(x)`` is exactly ``F.linear(x, weight, bias)``: a plain, frozen
    ``nn.Linear`` without hooks, its weight in ``x``'s dtype — or in any floating dtype when
    ``autocast`` is on for ``x``'s device (F.linear then casts both)."""
    return (
        type(base) is nn.Linear
        and not base._forward_hooks
        and not base._forward_pre_hooks
        and not global_forward_hooks()
        and x.dim() >= 2
        and (x.dtype == base.weight.dtype or (autocast and x.is_floating_point()))
        and not base.weight.requires_grad
    )


def merged_forward_pays(
    layer: nn.Module, base: nn.Module, x: torch.Tensor, n_in: int, n_out: int
) -> bool:
    """Whether a no-grad forward of ``layer`` (``n_in`` → ``n_out`` features)
    should run as ``x (W + ΔW)ᵀ``: a plain ``nn.Linear`` base without hooks in ``x``'s dtype,
    no active dropout, and a batch large enough that building ΔW (out·in·r) costs less than
    the adapter's own products (rows·r·(in+out)); token-by-token generation keeps the
    unmerged path."""
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return False
    if x.dim() < 2 or x.dtype != base.weight.dtype or global_forward_hooks():
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if rows * (n_in + n_out) < 2 * n_in * n_out:
        return False
    return not any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in layer.modules())
