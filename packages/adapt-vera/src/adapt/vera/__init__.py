"""adapt.vera: VeRA adapters (Kopiczko et al., ICLR 2024) for adapt.

``adapt(model, VeraConfig(r=256, target_modules=[...]))`` shares one frozen random basis,
sized to the largest targeted layer and sliced per layer, and trains λ_b and λ_d only.
"""

from __future__ import annotations

from .__about__ import __version__
from .config import VeraConfig
from .layer import VeraLayer, VeraLinear
from .method import METHOD, VeraMethod

__all__ = ["METHOD", "VeraConfig", "VeraLayer", "VeraLinear", "VeraMethod", "__version__"]
