"""The part of :class:`~adapt.lora.LoraLayer` that runs LoRA variants (:mod:`adapt.lora.variants`).

An adapter with a variant keeps its LoRA factors on the layer; this mixin routes that adapter's
forward and merge to the variant and gives variants the layer-type-neutral building blocks
they compute with: the output broadcast (:meth:`VariantHost.per_output`), the weight broadcast
(:meth:`VariantHost.per_weight`), the original weight while adapters are merged
(:meth:`VariantHost.original_weight`) and the base map without bias
(:meth:`VariantHost.base_without_bias`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from adapt.core import AdapterLayer, AdapterStateError, TargetError
from adapt.core.merge import accumulation_dtype
from adapt.core.typenames import describe

from .variants import LoraVariant, get_variant, variant_name

if TYPE_CHECKING:
    from .config import LoraConfig
    from .layer import LoraLayer

#: A merged row scale below this cannot be divided out to recover the original weight.
_MIN_ROW_SCALE = 1e-6


class VariantHost(AdapterLayer):
    """Variant routing for LoRA layers (a base class of :class:`~adapt.lora.LoraLayer`)."""

    #: The axis of the canonical weight that indexes output features (an embedding's weight
    #: is (vocab, dim): axis 1).
    output_axis: ClassVar[int] = 0

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        #: The variant each adapter runs (adapters without one are plain LoRA).
        self.lora_variant: dict[str, LoraVariant] = {}
        #: Free-form state variants keep on the layer (not saved), keyed as they choose; by
        #: convention ``(adapter_name, what)``.
        self.variant_state: dict[Any, Any] = {}
        self.lora_dropout: nn.ModuleDict

    @property
    def _lora(self) -> LoraLayer:
        return cast("LoraLayer", self)  # every VariantHost is a LoraLayer

    # -- attaching ---------------------------------------------------------------------------
    def attach_variant(self, adapter_name: str, config: LoraConfig) -> None:
        """Give ``adapter_name`` the variant ``config`` asks for (none: plain LoRA)."""
        self.detach_variant(adapter_name)
        name = variant_name(config)
        if name is None:
            return
        variant = get_variant(name)
        reason = variant.supports(self._lora)
        if reason is not None:
            raise TargetError(
                f"{describe(self.get_base_layer())}: {reason}. Remove it from target_modules, "
                f"or train it without the {name!r} variant"
            )
        for attr in variant.tensor_names:
            if not hasattr(self, attr):
                setattr(self, attr, nn.ParameterDict())
        names = tuple(dict.fromkeys((*self.adapter_layer_names, *variant.tensor_names)))
        # this layer's own list (an instance attribute over the class's)
        object.__setattr__(self, "adapter_layer_names", names)
        self.lora_variant[adapter_name] = variant
        variant.init(self._lora, adapter_name, config)

    def detach_variant(self, adapter_name: str) -> None:
        variant = self.lora_variant.pop(adapter_name, None)
        if variant is None:
            return
        variant.delete(self._lora, adapter_name)
        for attr in variant.tensor_names:
            container = getattr(self, attr, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]

    # -- building blocks for variants --------------------------------------------------------
    def lora_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``s · B(A(x))`` for input ``x`` as given (dropout, if any, already applied)."""
        raise NotImplementedError

    def variant_tensors(self, name: str) -> nn.ParameterDict:
        """The container of a variant's tensor ``name`` (one of its ``tensor_names``), keyed by
        adapter name: ``layer.variant_tensors("lora_magnitude_vector")["default"]``."""
        container = getattr(self, name, None)
        if not isinstance(container, nn.ParameterDict):
            raise AttributeError(f"{type(self).__name__} has no variant tensors named {name!r}")
        return container

    def dropout_active(self, adapter_name: str) -> bool:
        """Whether the adapter's dropout changes its input now (training, p > 0)."""
        dropout = self.lora_dropout[adapter_name]
        return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0

    def per_output(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values`` (one per output feature) shaped to broadcast against the output ``like``
        (default: features on the last dimension)."""
        return values

    def per_weight(self, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``values`` (one per output feature) shaped to broadcast against the canonical
        ``weight`` (along :attr:`output_axis`)."""
        shape = [1] * weight.dim()
        shape[self.output_axis] = -1
        return values.view(shape)

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's map on ``x`` without its bias, with the original weight
        (:meth:`original_weight`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement base_without_bias")

    def original_weight(self) -> torch.Tensor:
        """The base weight (canonical layout) with every merged adapter taken out: the weight
        itself when nothing is merged, else a ≥float32 copy recovered from the merged one."""
        weight = self.backend.get_weight(self.base_layer)
        if not self.merged_adapters:
            return weight
        work = weight.detach().to(accumulation_dtype(weight.dtype), copy=True)
        scale: torch.Tensor | None = None
        for name in self.merged_adapters:
            variant = self.lora_variant.get(name)
            row_scale, delta = (
                variant.merged_form(self._lora, name)
                if variant
                else (None, self.delta_weight(name))
            )
            work -= delta.detach().to(work.dtype)
            if row_scale is not None:
                step = row_scale.detach().to(work.dtype) - 1
                scale = step + 1 if scale is None else scale + step
        if scale is not None:
            if bool((scale.abs() < _MIN_ROW_SCALE).any()):
                raise AdapterStateError(
                    f"{describe(self.get_base_layer())}: the merged adapters {self.merged_adapters} "
                    "scale some weight rows to (almost) zero, so the original weight cannot be "
                    "recovered from the merged one; unmerge is impossible (reload the base model)"
                )
            work /= self.per_weight(scale, work)
        return work

    # -- routing -----------------------------------------------------------------------------
    def adapter_effect(
        self, x: Any, adapter_name: str, base_output: torch.Tensor
    ) -> torch.Tensor | None:
        variant = self.lora_variant.get(adapter_name)
        if variant is None:
            return super().adapter_effect(x, adapter_name, base_output)
        return variant.adapter_effect(self._lora, x, adapter_name, base_output)

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        variant = self.lora_variant.get(adapter_name)
        if variant is None:
            return super().merge_weight(weight, adapter_name)
        return variant.merge_weight(self._lora, weight, adapter_name)

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        variant = self.lora_variant.get(adapter_name)
        if variant is None:
            return super().unmerge_weight(weight, adapter_name)
        return variant.unmerge_weight(self._lora, weight, adapter_name)

    def merge_depends_on_weight(self) -> bool:
        return bool(self.lora_variant) or self._changes_bias()

    def unmerge_depends_on_weight(self) -> bool:
        return bool(self.lora_variant) or self._changes_bias()

    def _merged_forward_pays(self, x: torch.Tensor) -> bool:
        # the no-grad "x (W + ΔW)ᵀ" path knows plain LoRA only
        if any(name in self.lora_variant for name in self.active_adapters):
            return False
        return super()._merged_forward_pays(x)
