"""adapt.core: adapter-layer base, plugin registry, injection, merge protocol, weight backends
and PEFT-compatible checkpoint I/O.

Methods (``adapt-lora``, ``adapt-vera``, ``adapt-adalora``) and base-layer support
(``adapt-bnb``) are separate packages found through entry points; this package imports none
of them, nor transformers or bitsandbytes.
"""

from __future__ import annotations

from .__about__ import __version__
from ._namespace import check_namespace
from .backends import DenseBackend, WeightBackend
from .basis import SharedBasis
from .combine_files import combine_saved_adapters
from .config import ANY_VALUE, AdapterConfig
from .errors import (
    AdaptError,
    AdapterStateError,
    CheckpointError,
    ConfigError,
    MissingMethodError,
    PluginError,
    TargetError,
)
from .layer import (
    AdapterLayer,
    adapter_dtype_device,
    add_scaled_product,
    factor_grad,
    matmul_factor,
    transposed_factor_is_faster,
)
from .merge import MergeReport
from .method import CombineOptions, Method
from .model import AdaptedModel, ModulesToSave, adapt, load_config
from .registry import get_registry, register_backend, register_layer, register_method
from .routing import BASE

__all__ = [
    "ANY_VALUE",
    "BASE",
    "AdaptError",
    "AdaptedModel",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterStateError",
    "CheckpointError",
    "CombineOptions",
    "ConfigError",
    "DenseBackend",
    "MergeReport",
    "Method",
    "MissingMethodError",
    "ModulesToSave",
    "PluginError",
    "SharedBasis",
    "TargetError",
    "WeightBackend",
    "__version__",
    "adapt",
    "adapter_dtype_device",
    "add_scaled_product",
    "combine_saved_adapters",
    "factor_grad",
    "get_registry",
    "load_config",
    "matmul_factor",
    "register_backend",
    "register_layer",
    "register_method",
    "transposed_factor_is_faster",
]

# Another project's regular `adapt` package in our folder: warn once, with the fix.
check_namespace()
