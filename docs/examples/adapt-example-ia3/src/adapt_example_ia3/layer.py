"""``IA3Linear``: IA³ on ``nn.Linear`` and transformers ``Conv1D`` (``adapt.layers`` entry
point ``ia3-linear``).

Each adapter holds one vector ``l``, in ``ia3_l`` (checkpoint key ``<module>.ia3_l``):

* output side, ``l`` of shape ``(out, 1)``: ``y = base(x) · l``; merged, ``W ← diag(l) W``
  (rows) and ``b ← b · l``;
* feed-forward, ``l`` of shape ``(1, in)``: ``y = base(x · l)``; merged, ``W ← W diag(l)``
  (columns), bias unchanged.

Several active adapters multiply. The layer declares ``composition = "product"``: core
multiplies the base output by the product of the output-side factors once, and runs the
feed-forward input scaling (:meth:`IA3Linear.adapter_input`) before the single base forward.
The base weight is reached only through the weight backend, so the layer sees the canonical
``(out, in)`` layout whatever the module stores.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from adapt.core import AdapterLayer, AdapterStateError, adapter_dtype_device

from .config import IA3Config

#: Below this, a factor cannot be divided out again: unmerging is refused.
MIN_ABS_FACTOR = 1e-6


class IA3Linear(AdapterLayer):
    """IA³ vectors on a linear layer, one per adapter, on its output or (feed-forward) input."""

    method: ClassVar[str] = "ia3"
    base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear, "transformers.pytorch_utils.Conv1D")
    adapter_layer_names: ClassVar[tuple[str, ...]] = ("ia3_l",)
    # per adapter: whether it scales the input (a plain dict; core deletes its entries)
    other_param_names: ClassVar[tuple[str, ...]] = ("ia3_feedforward",)
    composition: ClassVar[str] = "product"

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.ia3_l = nn.ParameterDict()
        self.ia3_feedforward: dict[str, bool] = {}
        #: the module's path in the model, for messages (set by the method's layer_kwargs)
        self.module_path: str | None = None

    def update_layer(
        self,
        adapter_name: str,
        config: IA3Config,
        *,
        is_feedforward: bool = False,
        module_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Create ``adapter_name``'s vector: ones (the identity) or, with
        ``init_ia3_weights=False``, N(0, 1). Each adapter is feed-forward or not on its own."""
        dtype, device = adapter_dtype_device(self)  # float32 for half-precision bases
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        if config.init_ia3_weights:
            vector = torch.ones(shape, dtype=dtype, device=device)
        else:
            vector = torch.randn(shape, dtype=dtype, device=device)
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        self.ia3_feedforward[adapter_name] = is_feedforward
        if module_path is not None:
            self.module_path = module_path

    # -- forward ----------------------------------------------------------------------------
    def adapter_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``x · l`` for a feed-forward adapter (in ``l``'s dtype, back to ``x``'s), else ``x``."""
        if not self.ia3_feedforward[adapter_name]:
            return x
        vector: torch.Tensor = self.ia3_l[adapter_name]
        return (x.to(vector.dtype) * vector.flatten()).to(x.dtype)

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """The factor the base output is multiplied by (output side), or None (feed-forward)."""
        if self.ia3_feedforward[adapter_name]:
            return None
        factor: torch.Tensor = self.ia3_l[adapter_name].flatten()
        return factor

    # -- merging (core calls these; the tensors are copies, canonical layout, >= float32) ----
    def _vector(self, adapter_name: str, like: torch.Tensor) -> torch.Tensor:
        vector: torch.Tensor = self.ia3_l[adapter_name].detach()
        return vector.to(device=like.device, dtype=like.dtype)

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        # (out, 1) scales rows, (1, in) columns
        weight *= self._vector(adapter_name, weight)
        return weight

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        self._require_invertible(adapter_name)
        weight /= self._vector(adapter_name, weight)
        return weight

    def merge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if not self.ia3_feedforward[adapter_name]:
            bias *= self._vector(adapter_name, bias).flatten()
        return bias

    def unmerge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if not self.ia3_feedforward[adapter_name]:
            self._require_invertible(adapter_name)
            bias /= self._vector(adapter_name, bias).flatten()
        return bias

    def _require_invertible(self, adapter_name: str) -> None:
        # PEFT divides by l + 1e-8 instead, which silently leaves a wrong weight behind
        vector = self.ia3_l[adapter_name].detach()
        small = vector.abs() < MIN_ABS_FACTOR
        if bool(small.any()):
            where = self.module_path or type(self.get_base_layer()).__name__
            raise AdapterStateError(
                f"cannot unmerge IA³ adapter {adapter_name!r} from {where}: "
                f"{int(small.sum())} of its {vector.numel()} factors are zero or nearly "
                f"(|l| < {MIN_ABS_FACTOR:g}), so dividing by them cannot restore the original "
                "weight. The layer was left merged; reload the base model to get it back"
            )
