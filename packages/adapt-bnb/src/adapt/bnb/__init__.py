"""adapt-bnb: bitsandbytes 8-bit and 4-bit base layers for every adapt method.

Installing this package registers weight backends for ``bnb.nn.Linear8bitLt`` and
``bnb.nn.Linear4bit`` under the ``adapt.backends`` entry point; LoRA, VeRA, AdaLoRA and
third-party layers then work on quantised models, merge included, without knowing
bitsandbytes. bitsandbytes itself is imported only when a quantised layer is adapted.
"""

from .__about__ import __version__
from .backends import FourBitBackend, Int8Backend
from .training import enable_input_grads, prepare_for_kbit_training

__all__ = [
    "FourBitBackend",
    "Int8Backend",
    "__version__",
    "enable_input_grads",
    "prepare_for_kbit_training",
]
