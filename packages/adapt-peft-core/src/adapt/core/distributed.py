"""What distributed engines do to parameters, and how to see them whole again.

Three engines change the tensors an adapted model holds:

* **FSDP2** (``fully_shard``) turns parameters into DTensor shards; ``full_tensor()`` gathers one
  (a collective).
* **DeepSpeed ZeRO-3** partitions a parameter in place: outside its module's forward it is an
  empty ``(0,)`` tensor, with the full shape in ``ds_shape`` and a ``ds_status``; parameters
  under ``stage3_param_persistence_threshold`` elements stay whole ("persistent").
  ``deepspeed.zero.GatheredParameters`` gathers them (a collective).
* **FSDP1** (``FullyShardedDataParallel``, ``use_orig_params=True``) flattens the parameters of
  each unit into one buffer; outside the forward each original parameter is a 1-D view of this
  rank's piece (often empty), and paths gain ``_fsdp_wrapped_module.``.
  ``FullyShardedDataParallel.summon_full_params`` gathers a unit (a collective).

Nothing here imports DeepSpeed or FSDP unless a model really holds such parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, cast

import torch
from torch import nn

#: Path segments that wrappers insert (FSDP1, activation checkpointing, torch.compile).
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 shard)."""
    return callable(getattr(tensor, "full_tensor", None))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a DTensor is gathered from its shards (a collective), others as is."""
    if is_dtensor(tensor):
        full: torch.Tensor = cast(Any, tensor).full_tensor()
        return full
    return tensor


def is_zero3(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a parameter DeepSpeed ZeRO-3 manages."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_shape")


def is_partitioned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ZeRO-3 parameter whose data is not on this rank right now."""
    status = getattr(tensor, "ds_status", None)
    return is_zero3(tensor) and getattr(status, "name", "") == "NOT_AVAILABLE"


def is_deepspeed(tensor: torch.Tensor) -> bool:
    """Whether a DeepSpeed ZeRO optimizer (stage 1, 2 or 3) owns ``tensor``'s gradient."""
    return is_zero3(tensor) or hasattr(tensor, "_hp_mapping")


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape ``tensor`` has for the model: ZeRO-3's recorded full shape, else its own."""
    if is_zero3(tensor):
        return tuple(int(d) for d in cast(Any, tensor).ds_shape)
    return tuple(int(d) for d in tensor.shape)


def clean_key(key: str) -> str:
    """``key`` without the path segments wrappers insert (``_fsdp_wrapped_module.`` ...)."""
    parts = [p for p in key.split(".") if p not in WRAPPER_SEGMENTS]
    return ".".join(parts)


def fsdp1_units(module: nn.Module) -> list[nn.Module]:
    """The outermost ``FullyShardedDataParallel`` units inside ``module`` (FSDP1)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    units: list[nn.Module] = []
    inside: set[int] = set()
    for _, sub in module.named_modules():
        if id(sub) in inside or not isinstance(sub, FullyShardedDataParallel):
            continue
        units.append(sub)
        inside.update(id(m) for m in sub.modules())
    return units


def engine_of(tensors: Iterable[torch.Tensor], module: nn.Module | None = None) -> str | None:
    """A name for the engine holding these tensors, for messages; None for plain tensors."""
    tensors = list(tensors)
    if any(is_zero3(t) for t in tensors):
        return "DeepSpeed ZeRO-3"
    if any(is_dtensor(t) for t in tensors):
        return "FSDP2 (fully_shard)"
    if any(hasattr(t, "_hp_mapping") for t in tensors):
        return "DeepSpeed ZeRO-1/2"
    if module is not None and fsdp1_units(module):
        return "FSDP1 (FullyShardedDataParallel)"
    return None


def needs_collective(module: nn.Module, tensors: Iterable[torch.Tensor]) -> bool:
    """Whether seeing ``tensors`` whole needs every rank (shards to gather)."""
    return any(is_dtensor(t) or is_partitioned(t) for t in tensors) or bool(fsdp1_units(module))


def _gather_partitions(
    stack: contextlib.ExitStack, tensors: list[torch.Tensor], rank: int | None
) -> None:
    """Gather ZeRO-3 partitions of ``tensors`` for the life of ``stack`` (``rank``: whose
    changes are written back, None for read only)."""
    partitioned = [t for t in tensors if is_partitioned(t)]
    if partitioned:
        import deepspeed

        stack.enter_context(deepspeed.zero.GatheredParameters(partitioned, modifier_rank=rank))


def _summon(unit: nn.Module, *, writeback: bool, with_grads: bool) -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(
        unit, writeback=writeback, with_grads=with_grads
    )


@contextlib.contextmanager
def gathered(module: nn.Module, tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block ``tensors`` (and FSDP1 gradients) are whole on every rank and what the
    block writes into them is kept: ZeRO-3 partitions gathered (rank 0's values written back),
    every FSDP1 unit inside ``module`` summoned with its gradients and written back. A
    collective: every rank must enter it with the same tensors."""
    with contextlib.ExitStack() as stack:
        _gather_partitions(stack, list(tensors), rank=0)
        for unit in fsdp1_units(module):
            stack.enter_context(_summon(unit, writeback=True, with_grads=True))
        yield


def whole_copies(
    module: nn.Module, tensors: dict[str, torch.Tensor], *, copy: bool = True
) -> dict[str, torch.Tensor]:
    """``tensors`` (parameters and buffers of ``module``) whole: ZeRO-3 partitions gathered
    (these tensors only), FSDP1 units inside ``module`` summoned one at a time (each unit's
    tensors copied while it is whole), DTensors gathered. A collective when anything is sharded:
    every rank must call it, with the same tensors. ``copy``: clone what is returned (what a
    gather lends is taken back when it ends); the processes that only help may pass False."""

    def take(tensor: torch.Tensor) -> torch.Tensor:
        whole = full_tensor(tensor).detach()
        return whole.clone() if copy else whole

    out: dict[str, torch.Tensor] = {}
    pending = dict(tensors)
    with contextlib.ExitStack() as stack:
        _gather_partitions(stack, list(tensors.values()), rank=None)
        for unit in fsdp1_units(module):
            owned = {id(p) for p in unit.parameters()}
            mine = [k for k, t in pending.items() if id(t) in owned]
            if not mine:  # the same on every rank: the model's structure is
                continue
            with _summon(unit, writeback=False, with_grads=False):
                out.update({k: take(pending.pop(k)) for k in mine})
        out.update({k: take(t) for k, t in pending.items()})
    return {k: out[k] for k in tensors}


def unreadable_message(key: str, got: tuple[int, ...], want: tuple[int, ...], engine: str) -> str:
    """Why a tensor about to be saved is not the adapter's tensor, and what to do."""
    fixes = {
        "DeepSpeed ZeRO-3": (
            "call save_pretrained on every rank (adapt gathers the partitions), or pass a "
            "gathered state_dict="
        ),
        "FSDP1 (FullyShardedDataParallel)": (
            "call save_pretrained on every rank (adapt gathers the FSDP units inside the "
            "AdaptedModel), wrap the AdaptedModel's layers rather than only a unit around it, "
            "call it inside FullyShardedDataParallel.summon_full_params(<root>), or pass "
            "state_dict= from a FULL_STATE_DICT"
        ),
    }
    fix = fixes.get(
        engine,
        "call save_pretrained on every rank, inside the engine's gather (e.g. "
        "FullyShardedDataParallel.summon_full_params(<root>)), or pass a gathered state_dict=",
    )
    return (
        f"refusing to save {key!r}: it holds a tensor of shape {got} where the adapter has "
        f"{want}; {engine} keeps it sharded on this rank, and writing it would give a broken "
        f"adapter. To fix: {fix}"
    )
