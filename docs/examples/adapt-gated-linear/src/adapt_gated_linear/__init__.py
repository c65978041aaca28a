"""adapt-gated-linear: an example third-party plugin for adapt.

* :class:`GatedLinear` — a module type adapt does not know: ``(x Wᵀ + b) · σ(gate)``;
* :class:`GatedLinearBackend` — how adapt reads and writes its weight (``adapt.backends``);
* :class:`GatedLoraLinear` — LoRA for it (``adapt.layers``).

Installed, it makes ``adapt(model, LoraConfig(target_modules=[...]))`` work on models built
from ``GatedLinear`` layers; nothing needs to be imported or registered by hand.
"""

from __future__ import annotations

from .__about__ import __version__
from .backend import GatedLinearBackend
from .layer import GatedLoraLinear
from .modules import GatedLinear

__all__ = ["GatedLinear", "GatedLinearBackend", "GatedLoraLinear", "__version__"]
