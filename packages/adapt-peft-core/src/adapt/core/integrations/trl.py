"""TRL's ``SFTTrainer`` and ``DPOTrainer`` for an :class:`~adapt.core.AdaptedModel`.

::

    from adapt.core.integrations.trl import SFTTrainer, DPOTrainer

    trainer = SFTTrainer(
        model=adapt(base, LoraConfig(...)),
        args=SFTConfig(...),
        train_dataset=data,
        processing_class=tokenizer,
    )

Same arguments as TRL's. What they do differently for an ``AdaptedModel`` (everything else is
TRL's own code path):

* TRL's fused LM head (``add_fused_lm_head``) goes on the wrapped transformers model, as TRL
  does for a PEFT model; an adapter on ``lm_head`` is refused, because the fused head multiplies
  by ``lm_head.weight`` directly and the adapter would never train (a ``modules_to_save`` copy
  of ``lm_head`` is honoured).
* ``DPOTrainer``'s reference is the policy with its adapters disabled (an adapter named ``ref``,
  if there is one, as TRL does), through :class:`ReferenceModel`: no second model in memory.
* ``save_model`` and the checkpoints hold the adapters in PEFT's format (see
  :class:`~adapt.core.integrations._saving.AdapterTrainerMixin`).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from ..errors import IntegrationError
from ..foreign import is_trl_fused_head
from ..layer import AdapterLayer
from ..model import AdaptedModel
from ..trainer import find_adapted
from ._saving import AdapterTrainerMixin

# typed as Any: the same check whether or not trl (which has no type information) is installed
_trl: Any = importlib.import_module("trl")
_TRLSFTTrainer: Any = _trl.SFTTrainer
_TRLDPOTrainer: Any = _trl.DPOTrainer

REF_ADAPTER = "ref"  # TRL's name for a reference adapter next to the trained one


def _refuse_adapted_head(adapted: AdaptedModel) -> None:
    get_head = getattr(adapted.get_base_model(), "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, AdapterLayer):
        raise IntegrationError(
            "an adapter on lm_head would never train under TRL: its fused LM head multiplies "
            "the hidden states by lm_head.weight directly (the base weight). Remove 'lm_head' "
            "from target_modules, or train a full copy of it with modules_to_save=['lm_head']"
        )


def _fused_head_on_wrapped_model(adapted: AdaptedModel, fused: Any) -> None:
    """Install TRL's fused LM head on the wrapped transformers model, with the arguments TRL
    gave it for the wrapper (read off the closure of the forward it built)."""
    from trl.trainer.utils import add_fused_lm_head

    _refuse_adapted_head(adapted)
    given = inspect.getclosurevars(getattr(fused, "__func__", fused)).nonlocals
    names = [p for p in inspect.signature(add_fused_lm_head).parameters if p != "model"]
    lost = [p for p in names if p not in given]
    if lost:
        raise IntegrationError(
            f"adapt's TRL integration cannot read {lost} off trl {_trl.__version__}'s fused LM "
            "head; this trl is newer than adapt knows (checked with trl 1.16): please report it"
        )
    inner: Any = adapted.get_base_model()
    add_fused_lm_head(inner, **{p: given[p] for p in names})


def adopt(model: Any) -> AdaptedModel | None:
    """Let TRL's fused LM head onto ``model``'s AdaptedModel (if it is one)."""
    adapted = find_adapted(model)
    if adapted is not None:
        _refuse_adapted_head(adapted)
        adapted.adapter_set.fused_head_handler = _fused_head_on_wrapped_model
    return adapted


def _refuse_peft_config(adapted: AdaptedModel | None, kwargs: dict[str, Any]) -> None:
    if adapted is not None and kwargs.get("peft_config") is not None:
        raise IntegrationError(
            "pass either an AdaptedModel or a peft_config, not both: the model is adapted "
            "already (add another adapter with model.add_adapter(name, config))"
        )


class SFTTrainer(AdapterTrainerMixin, _TRLSFTTrainer):  # type: ignore[misc]
    """``trl.SFTTrainer`` that takes an AdaptedModel (see the module doc)."""

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        adapted = adopt(model)
        _refuse_peft_config(adapted, kwargs)
        super().__init__(model, *args, **kwargs)


class ReferenceModel(nn.Module):
    """DPO's reference for an AdaptedModel: the same model with its adapters disabled, or with
    the adapter ``ref`` when there is one. It holds no weights of its own (the policy is not
    registered as a submodule, so ``eval()``, ``to()`` and dropout changes made to the
    reference do not reach the policy); ``state_dict`` is the policy's, so TRL's cache of
    precomputed reference log-probs is keyed by the real weights."""

    def __init__(self, adapted: AdaptedModel) -> None:
        super().__init__()
        object.__setattr__(self, "_policy", adapted)

    @property
    def policy(self) -> AdaptedModel:
        policy: AdaptedModel = object.__getattribute__(self, "_policy")
        return policy

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.policy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and is_trl_fused_head(value):
            return  # the policy's wrapped model carries the fused head already
        super().__setattr__(name, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        policy = self.policy
        with torch.no_grad():
            if REF_ADAPTER in policy.peft_config:
                ids = kwargs.get("input_ids", args[0] if args else None)
                if ids is None:
                    raise IntegrationError("the reference forward needs input_ids")
                kwargs["adapter_names"] = [REF_ADAPTER] * int(ids.shape[0])
                return policy(*args, **kwargs)
            with policy.disable_adapter():
                return policy(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.policy.state_dict(*args, **kwargs)


class DPOTrainer(AdapterTrainerMixin, _TRLDPOTrainer):  # type: ignore[misc]
    """``trl.DPOTrainer`` that takes an AdaptedModel; its reference is the policy with the
    adapters disabled (:class:`ReferenceModel`), never a second copy of the model."""

    def __init__(self, model: Any, ref_model: Any = None, *args: Any, **kwargs: Any) -> None:
        adapted = adopt(model)
        _refuse_peft_config(adapted, kwargs)
        if adapted is not None and ref_model is None:
            config = kwargs.get("args", args[0] if args else None)
            if getattr(config, "sync_ref_model", False):
                raise IntegrationError(
                    "sync_ref_model=True needs a reference model with weights of its own; with "
                    "an AdaptedModel the reference is the base model (adapters disabled), as for "
                    "PEFT in TRL. Set sync_ref_model=False"
                )
            ref_model = ReferenceModel(adapted)
        super().__init__(model, ref_model, *args, **kwargs)


__all__ = ["DPOTrainer", "ReferenceModel", "SFTTrainer"]
