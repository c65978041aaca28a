"""adapt-example-scaled-lora: a LoRA variant for adapt, as an example third-party plugin.

* :class:`ScaledLora` — the variant ``"scaled"`` (entry point ``adapt.lora_variants``:
  ``scaled``): LoRA's contribution times a learned scalar gate per adapter per layer.

Installed, ``LoraConfig(variant="scaled", variant_options={"gate_init": 0.5})`` works on every
LoRA layer type; nothing needs to be imported or registered by hand.
"""

from __future__ import annotations

from .__about__ import __version__
from .variant import DEFAULT_GATE_INIT, ScaledLora

__all__ = ["DEFAULT_GATE_INIT", "ScaledLora", "__version__"]
