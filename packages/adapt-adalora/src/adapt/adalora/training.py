"""Rank allocation that cannot be forgotten: a transformers ``TrainerCallback`` and an opt-in
hook on a plain optimizer, both calling ``update_and_allocate`` with the right step count.

transformers stays optional: :func:`AdaLoraCallback` imports it when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from adapt.core.distributed import is_deepspeed
from adapt.core.trainer import unwrap_adapted

from .engines import DeepSpeedCapture, capture, install_capture

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from adapt.core import AdaptedModel


def _adapted(model: Any) -> AdaptedModel:
    return unwrap_adapted(model, purpose="AdaLoRA rank allocation")


def allocate_on_step(
    model: AdaptedModel, optimizer: torch.optim.Optimizer, *, start_step: int = 0
) -> RemovableHandle:
    """Run ``model.update_and_allocate(step)`` after every ``optimizer.step()`` (opt-in).

    Steps count from ``start_step``: the first optimizer step is step ``start_step``, as in
    the usual loop ``for step in range(total_step): ...; optimizer.step();
    model.update_and_allocate(step); optimizer.zero_grad()``. Returns the hook's handle;
    ``handle.remove()`` stops it.
    """
    counter = {"step": start_step}

    def hook(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        model.update_and_allocate(counter["step"])
        counter["step"] += 1

    return optimizer.register_step_post_hook(hook)


def capture_deepspeed_gradients(model: Any, engine: Any) -> DeepSpeedCapture:
    """Let ``update_and_allocate`` see the gradients under DeepSpeed (ZeRO stage 1, 2 or 3).

    DeepSpeed keeps gradients in its own buffers and clears them inside ``engine.step()``; this
    reads the adapter's gradients whole just before each optimizer step (a collective: call it
    on every rank, once, after ``deepspeed.initialize``)::

        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        capture_deepspeed_gradients(model, engine)
        for step in range(total_step):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            model.update_and_allocate(step)

    ``AdaLoraCallback`` does this for the Trainer. ``handle.remove()`` stops it.
    """
    from .method import METHOD

    adapted = _adapted(model)
    allocator = METHOD.allocator(adapted, METHOD._trainable(adapted))
    return install_capture(adapted, engine, allocator.tensors)


def AdaLoraCallback() -> Any:
    """A transformers ``TrainerCallback`` that runs AdaLoRA's rank allocation on every optimizer
    step of a ``Trainer`` (after ``optimizer.step()``, before the gradients are zeroed)::

        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdaLoraCallback()])

    Set ``AdaLoraConfig.total_step`` to the number of optimizer steps the Trainer will make
    (``max_steps``, or epochs × batches ÷ gradient accumulation).
    """
    try:
        from transformers import TrainerCallback
    except ImportError as exc:  # pragma: no cover - transformers is optional
        raise ImportError(
            "AdaLoraCallback is for transformers' Trainer: `pip install transformers`. Without "
            "a Trainer, use adapt.adalora.allocate_on_step(model, optimizer)"
        ) from exc

    class _AdaLoraCallback(TrainerCallback):  # type: ignore[misc]
        #: whether the first step looked for DeepSpeed (the engine exists once training started)
        checked_engine = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.checked_engine = False  # a new train() call may bring a new engine

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # DeepSpeed clears the gradients inside its engine step, before on_optimizer_step:
            # capture them there. Decided once, at the first step, not rescanned every step.
            model = kwargs.get("model")
            if self.checked_engine or model is None:
                return
            self.checked_engine = True
            adapted = _adapted(model)
            if capture(adapted) is None and any(
                is_deepspeed(p) for p in adapted.parameters() if p.requires_grad
            ):
                capture_deepspeed_gradients(adapted, kwargs.get("optimizer"))

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs.get("model")
            if model is None:
                raise RuntimeError("the Trainer passed no model to AdaLoraCallback")
            # global_step counts finished steps: this one is step `global_step` (from 0)
            _adapted(model).update_and_allocate(state.global_step)

    _AdaLoraCallback.__name__ = _AdaLoraCallback.__qualname__ = "AdaLoraCallback"
    return _AdaLoraCallback()
