"""adapt-example-ia3: the IA³ method for adapt, as an example third-party plugin.

* :class:`IA3Config` — IA³'s settings, in PEFT's keys (``peft_type`` ``"IA3"``);
* :class:`IA3Linear` — the layer, on ``nn.Linear`` and transformers ``Conv1D``
  (``adapt.layers``: ``ia3-linear``);
* :class:`IA3Method` / :data:`METHOD` — the method object (``adapt.methods``: ``ia3``).

Installed, it makes ``adapt(model, IA3Config(...))`` work and reads and writes PEFT's IA³
checkpoints; nothing needs to be imported or registered by hand.
"""

from __future__ import annotations

from .__about__ import __version__
from .config import IA3Config
from .layer import IA3Linear
from .method import METHOD, IA3Method

__all__ = ["METHOD", "IA3Config", "IA3Linear", "IA3Method", "__version__"]
