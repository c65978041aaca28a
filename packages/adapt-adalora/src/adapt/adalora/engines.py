"""Rank allocation under distributed engines: where the gradients are, and how a mask sticks.

AdaLoRA scores ``|p ⊙ ∇p|`` after the optimizer step and zeroes singular values. A single
process, DDP and FSDP2 keep the gradient in ``p.grad`` until ``zero_grad()``. The others do not:

* **DeepSpeed ZeRO-1/2/3** reduce gradients into their own partitioned buffers (``p.grad`` is
  None) and clear them inside ``engine.step()``, before the Trainer's callbacks run.
  :class:`DeepSpeedCapture` therefore reads them whole (``deepspeed.utils.safe_get_full_grad``,
  a collective) just before the ZeRO optimizer steps, scaled as the step scales them (loss
  scale, gradient clipping), so they are the gradients a single process would score. ZeRO also
  keeps an fp32 master copy of every parameter: a mask must go there too
  (``safe_set_full_fp32_param``) or the next step brings the pruned values back.
* **FSDP1** (``use_orig_params=True``) keeps each parameter and gradient as a flat shard; the
  allocation runs inside ``summon_full_params(with_grads=True, writeback=True)``.

Where none of this can see the gradients, allocation refuses (it never prunes on an importance
that is zero only because no gradient was read).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from adapt.core import AdapterStateError
from adapt.core.distributed import gathered, is_deepspeed, is_partitioned, is_zero3

_CAPTURE_KEY = "adalora.deepspeed_capture"


def zero_optimizer(obj: Any) -> Any:
    """The DeepSpeed ZeRO optimizer behind ``obj``: a ``DeepSpeedEngine``, accelerate's
    optimizer wrapper, the Trainer's optimizer, or the ZeRO optimizer itself; else None."""
    try:
        from deepspeed.runtime.base_optimizer import ZeROOptimizer
    except ImportError as exc:
        raise ImportError(
            "capturing gradients for AdaLoRA under DeepSpeed needs deepspeed: "
            "`pip install deepspeed`"
        ) from exc

    for _ in range(4):
        if isinstance(obj, ZeROOptimizer):
            return obj
        obj = getattr(obj, "optimizer", None)
        if obj is None:
            return None
    return None


class DeepSpeedCapture:
    """Reads the adapter's gradients whole just before each ZeRO optimizer step.

    Installed by wrapping that one optimizer object's ``step`` (an attribute of the instance:
    DeepSpeed's classes are untouched; :meth:`remove` restores it)."""

    def __init__(self, optimizer: Any, tensors: Callable[[], list[torch.Tensor]]) -> None:
        self.optimizer = optimizer
        self.tensors = tensors
        self.grads: dict[int, torch.Tensor] = {}
        self.steps = 0
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            self._read()
            out = original(*args, **kwargs)
            self._scale()
            return out

        optimizer.step = step
        self._original = original
        self._installed = True

    def _read(self) -> None:
        from deepspeed.utils import safe_get_full_grad

        self.grads = {}
        for p in self.tensors():  # the same tensors in the same order on every rank
            grad = safe_get_full_grad(p)
            if grad is not None:
                self.grads[id(p)] = grad.detach().float().clone()

    def _scale(self) -> None:
        """As the step scaled them: divided by the loss scale, clipped to ``clip_grad``."""
        opt = self.optimizer
        scale = float(getattr(opt, "loss_scale", 1.0) or 1.0)
        clip = float(getattr(opt, "clip_grad", 0.0) or 0.0)
        norm = getattr(opt, "_global_grad_norm", None)
        if clip > 0 and norm is not None:
            norm = float(norm)
            if math.isfinite(norm):
                scale *= max(1.0, (norm + 1e-6) / clip)
        if scale != 1.0:
            for grad in self.grads.values():
                grad.div_(scale)
        self.steps += 1

    def grad(self, p: torch.Tensor) -> torch.Tensor | None:
        return self.grads.get(id(p))

    def remove(self) -> None:
        if self._installed:  # the wrapper is an attribute of the instance: deleting it restores
            del self.optimizer.step
            self._installed = False


def _slot(model: Any) -> dict[str, DeepSpeedCapture]:
    """Where the model's adapter set keeps this method's DeepSpeed capture."""
    slot: dict[str, DeepSpeedCapture] = model.adapter_set.state(_CAPTURE_KEY, dict)
    return slot


def capture(model: nn.Module) -> DeepSpeedCapture | None:
    found: DeepSpeedCapture | None = _slot(model).get("capture")
    return found


def install_capture(
    model: nn.Module, optimizer: Any, tensors: Callable[[], list[torch.Tensor]]
) -> DeepSpeedCapture:
    """Capture the gradients of ``tensors()`` before each step of ``optimizer``'s ZeRO
    optimizer (replacing an earlier capture)."""
    zero = zero_optimizer(optimizer)
    if zero is None:
        raise TypeError(
            "expected a DeepSpeed engine or its optimizer (what deepspeed.initialize returns, "
            f"or the Trainer's optimizer under DeepSpeed), got {type(optimizer).__name__}"
        )
    old = capture(model)
    if old is not None:
        old.remove()
    found = DeepSpeedCapture(zero, tensors)
    _slot(model)["capture"] = found
    return found


NO_CAPTURE = (
    "AdaLoRA under DeepSpeed: the gradients live in DeepSpeed's buffers and engine.step() "
    "clears them, so update_and_allocate cannot score the ranks (it would prune them all). "
    "With the Trainer add AdaLoraCallback(), which captures them; in your own loop call "
    "adapt.adalora.capture_deepspeed_gradients(model, engine) once after deepspeed.initialize"
)


def gradient_reader(model: Any, tensors: list[torch.Tensor]) -> Callable[[torch.Tensor], Any]:
    """How to read the gradient of each of ``tensors`` for scoring (None: no gradient)."""
    if any(is_deepspeed(t) for t in tensors):
        found = capture(model)
        if found is None:
            raise AdapterStateError(NO_CAPTURE)
        if found.steps == 0 or not found.grads:
            raise AdapterStateError(
                "AdaLoRA under DeepSpeed: no gradient was captured before this "
                "update_and_allocate call; call it after engine.step() (the Trainer's "
                "AdaLoraCallback does), on every rank"
            )
        return found.grad
    return lambda p: p.grad


def whole(model: Any, tensors: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager[None]:
    """Within the block the adapter's parameters (and FSDP1 gradients) are whole on every rank,
    and what the block writes into them is kept (core's :func:`adapt.core.distributed.gathered`;
    a collective)."""
    return gathered(model, tensors)


def sync_master(p: torch.Tensor) -> None:
    """After ``p`` was changed in place: write it into DeepSpeed's fp32 master copy, so the
    optimizer continues from the changed values (a no-op outside DeepSpeed)."""
    if not is_deepspeed(p):
        return
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(p, p.detach().float())


def refuse_unreadable_regulariser(tensors: Iterable[torch.Tensor]) -> None:
    """The orthogonal regulariser reads every A and B after the forward: refuse where an
    engine has taken them apart there (a ZeRO-3 partition, an FSDP1 flat shard)."""
    for t in tensors:
        if is_zero3(t) and is_partitioned(t):
            raise AdapterStateError(
                "AdaLoRA's orthogonal regulariser reads every A and B matrix after the forward, "
                "and DeepSpeed ZeRO-3 has partitioned them (empty on this rank). Keep the "
                "adapter parameters whole: set stage3_param_persistence_threshold in the "
                "DeepSpeed config above the largest adapter tensor's size, or set "
                "orth_reg_weight=0"
            )
        if t.dim() != 2 and not hasattr(t, "placements"):
            raise AdapterStateError(
                "AdaLoRA's orthogonal regulariser reads every A and B matrix after the forward, "
                f"and an engine holds them as flat shards there (a {tuple(t.shape)} tensor where "
                "a matrix belongs): FSDP1 (FullyShardedDataParallel) reshards each unit after "
                "its forward. Use FSDP2 (torch.distributed.fsdp.fully_shard), whose shards the "
                "regulariser gathers, or set orth_reg_weight=0"
            )
