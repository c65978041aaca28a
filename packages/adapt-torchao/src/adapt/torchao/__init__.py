"""adapt-torchao: torchao weight-only quantised base layers for every adapt method.

Installing this package registers two weight backends under the ``adapt.backends`` entry
point, for ``nn.Linear`` layers that torchao's ``quantize_`` gave a quantised weight:
``torchao-int8`` (``Int8WeightOnlyConfig``) and ``torchao-intx`` (``IntxWeightOnlyConfig``,
4 to 8 bits). LoRA, VeRA, AdaLoRA and third-party layers then train on and merge into such
models without knowing torchao. torchao itself is imported only when a weight is written.
"""

from .__about__ import __version__
from .backends import Int8WeightOnlyBackend, IntxWeightOnlyBackend

__all__ = ["Int8WeightOnlyBackend", "IntxWeightOnlyBackend", "__version__"]
