"""LoRA on a frozen dense ``nn.Linear`` in one autograd node (the fast training path): core's
:mod:`adapt.core.lowrank_linear`, under LoRA's names."""

from __future__ import annotations

from adapt.core.lowrank_linear import LowRankLinearFunction, Scale, low_rank_linear_grads
from adapt.core.lowrank_linear import scaled_addmm_ as scaled_addmm_

__all__ = ["LoraLinearFunction", "Scale", "lora_linear_grads", "scaled_addmm_"]

LoraLinearFunction = LowRankLinearFunction
lora_linear_grads = low_rank_linear_grads
