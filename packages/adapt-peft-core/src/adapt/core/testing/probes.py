"""Probes for tests of fast paths: how often a path ran, what autograd kept for the backward,
and one training step's loss and gradients, so a test can compare a fast path with the plain
one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "CallCount",
    "SavedTensors",
    "counting_apply",
    "counting_torch_calls",
    "loss_and_grads",
    "recording_saved",
]


class CallCount:
    """How many times a counted callable ran (:func:`counting_apply`,
    :func:`counting_torch_calls`)."""

    def __init__(self) -> None:
        self.calls = 0

    def __repr__(self) -> str:
        return f"CallCount(calls={self.calls})"


@contextmanager
def counting_apply(function: type[torch.autograd.Function]) -> Iterator[CallCount]:
    """Count the calls of ``function.apply`` (an autograd ``Function``: a layer's fast path)
    inside the block; the original ``apply`` is back afterwards, also on error::

        with counting_apply(LowRankLinearFunction) as count:
            model(ids)
        assert count.calls == 7
    """
    count = CallCount()
    original = vars(function).get("apply")  # the class's own, not an inherited one
    inherited = function.apply

    def counted(*args: Any, **kwargs: Any) -> Any:
        count.calls += 1
        return inherited(*args, **kwargs)  # type: ignore[no-untyped-call]

    function.apply = counted  # type: ignore[method-assign]
    try:
        yield count
    finally:
        if original is None:
            del function.apply
        else:
            function.apply = original  # type: ignore[method-assign]


class _CountingMode(TorchFunctionMode):
    def __init__(self, functions: tuple[Any, ...], count: CallCount) -> None:
        super().__init__()
        self.functions, self.count = functions, count

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count.calls += func in self.functions
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_torch_calls(*functions: Any) -> Iterator[CallCount]:
    """Count the calls of any of ``functions`` (torch functions or tensor methods, e.g.
    ``torch.bmm``, ``torch.Tensor.baddbmm_``) inside the block, to check which path a kernel
    took::

        with counting_torch_calls(torch.bmm, torch.Tensor.baddbmm_) as count:
            gathered_low_rank(x, a, b, slots)
        assert count.calls == 0
    """
    count = CallCount()
    with _CountingMode(functions, count):
        yield count


class SavedTensors:
    """The tensors autograd kept for the backward inside a :func:`recording_saved` block."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []

    def keeps(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` itself (not a copy or a view of it) was kept."""
        return any(t is tensor for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct storages kept (a view and its base count once)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self}
        return sum(storages.values())

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


@contextmanager
def recording_saved() -> Iterator[SavedTensors]:
    """Record every tensor autograd saves for the backward in the block (built-in nodes and
    custom ``Function``'s ``save_for_backward`` alike), to check what a fast path keeps::

        with recording_saved() as saved:
            out = layer(x)
        assert not saved.keeps(product)
    """
    saved = SavedTensors()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.tensors.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def loss_and_grads(
    model: nn.Module, ids: torch.Tensor, autocast: torch.dtype | None = None
) -> tuple[float, dict[str, torch.Tensor]]:
    """One causal-LM step (``labels=ids``) on the CPU, under autocast to ``autocast`` if given:
    the loss and a copy of every parameter gradient by name (gradients are zeroed first)."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads
