"""adapt-adalora: AdaLoRA, SVD-form adapters whose ranks are pruned to a budget in training.

``AdaLoraConfig(init_r=12, target_r=8, total_step=...)``; call
``model.update_and_allocate(step)`` after each optimizer step.
"""

from .__about__ import __version__
from .allocator import RankAllocator, budget_at, schedule
from .config import AdaLoraConfig
from .layer import AdaLoraLayer, SVDLinear
from .method import METHOD, AdaLoraMethod, orthogonal_regulariser
from .training import AdaLoraCallback, allocate_on_step, capture_deepspeed_gradients

__all__ = [
    "METHOD",
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AdaLoraLayer",
    "AdaLoraMethod",
    "RankAllocator",
    "SVDLinear",
    "__version__",
    "allocate_on_step",
    "budget_at",
    "capture_deepspeed_gradients",
    "orthogonal_regulariser",
    "schedule",
]
