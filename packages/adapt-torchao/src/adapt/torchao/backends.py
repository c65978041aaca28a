"""Weight backends for torchao's weight-only quantised ``nn.Linear`` layers.

torchao's ``quantize_`` keeps every ``nn.Linear`` and swaps its weight for a quantised tensor
subclass. A backend here claims a Linear only when its weight is one it can read and write
back (``supports``), so a plain Linear stays with core's dense backend:

* :class:`Int8WeightOnlyBackend`: ``Int8WeightOnlyConfig`` (``Int8Tensor``: int8 codes, one
  symmetric scale per row, per group or per tensor);
* :class:`IntxWeightOnlyBackend`: ``IntxWeightOnlyConfig`` with 4 to 8 bits
  (``IntxUnpackedToInt8Tensor``: codes in int8 storage, per-row or per-group scales and zero
  points).

Reading dequantises to float32 in the canonical ``(out_features, in_features)`` layout; writing
quantises the new weight the way the module was quantised (same granularity, mapping, bit
width, dtype) and copies the result into the module's own weight tensor, so the module stays
an ``nn.Linear`` holding the same tensor type, on the same device, in the same dtype.

Weights whose linear quantises activations too (``Int8DynamicActivationInt8WeightConfig``,
``Int8DynamicActivationIntxWeightConfig``) are refused: torchao's linear then passes no
gradient to its input, so adapters below such a layer would train on wrong gradients.

torchao is imported only when a weight is written, never when this module is imported: the
weights are matched by their dotted type names.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from adapt.core import AdapterStateError, MergeReport, TargetError
from adapt.core.typenames import describe, type_names

INT8_TENSOR = "torchao.quantization.quantize_.workflows.int8.int8_tensor.Int8Tensor"
INTX_TENSOR = (
    "torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor."
    "IntxUnpackedToInt8Tensor"
)

#: bit widths the intx backend serves: its declared error bound is int4's
INTX_BITS = (4, 5, 6, 7, 8)

_GRADIENT_NOTE = (
    "torchao's linear quantises the activations too and passes no gradient to its input, so "
    "adapters below this layer would train on wrong gradients; quantise with a weight-only "
    "config to train adapters on it"
)


def _weight(base: nn.Module) -> Any:
    """The module's weight (Any: torchao's tensor subclasses carry untyped attributes)."""
    return getattr(base, "weight", None)


def _is_type(weight: Any, type_name: str) -> bool:
    return isinstance(weight, torch.Tensor) and type_name in type_names(type(weight))


def _report(written: torch.Tensor, wanted: torch.Tensor) -> MergeReport:
    """How far the stored (dequantised) weight is from the one that was asked for."""
    diff = (written.double() - wanted.double()).abs()
    norm = wanted.double().norm().item()
    rel = diff.norm().item() / norm if norm > 0 else float(diff.norm().item() > 0)
    return MergeReport(max_abs_error=float(diff.max().item()), rel_error=rel, lossy=True)


def _check_shape(base: nn.Module, weight: torch.Tensor) -> None:
    linear: Any = base
    want = (int(linear.out_features), int(linear.in_features))
    if tuple(weight.shape) != want:
        raise TargetError(
            f"cannot write a weight of shape {tuple(weight.shape)} into {describe(base)}, whose "
            f"weight is {want} (out_features, in_features)"
        )
    if not torch.isfinite(weight).all():
        raise AdapterStateError(
            f"cannot quantise a weight holding NaN or Inf into {describe(base)}; the layer was "
            "left unchanged"
        )


def _store(base: nn.Module, new: Any) -> None:
    """Copy a freshly quantised tensor into the module's own weight tensor (same object, so
    ties, hooks and optimiser references stay valid)."""
    old = _weight(base)
    try:
        with torch.no_grad():
            old.copy_(new)
    except (ValueError, AssertionError, RuntimeError) as exc:
        raise AdapterStateError(
            f"torchao could not store the requantised weight of {describe(base)} in place: "
            f"{exc}; the layer was left unchanged"
        ) from exc


class _TorchaoBackend:
    """What both backends share: ``nn.Linear`` with a torchao weight, claimed by weight type."""

    base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear,)
    #: above other plugins serving plain ``nn.Linear`` (claimed only through ``supports``)
    priority: ClassVar[int] = 1
    lossy: ClassVar[bool] = True
    tensor_type: ClassVar[str]

    def refusal(self, base: nn.Module) -> str | None:
        """Why this backend does not serve ``base`` (for messages), or None if it does."""
        weight = _weight(base)
        if not _is_type(weight, self.tensor_type):
            return f"its weight is a {describe(type(weight))}, not a {self.tensor_type}"
        if weight.dim() != 2:
            return f"its weight has {weight.dim()} dimensions, not 2"
        return None

    def supports(self, base: nn.Module) -> bool:
        return isinstance(base, nn.Linear) and self.refusal(base) is None

    def shape(self, base: nn.Module) -> tuple[int, int]:
        linear: Any = base
        return int(linear.in_features), int(linear.out_features)

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        # the dtype torchao dequantises to (the model's dtype when it was quantised)
        dtype: torch.dtype = _weight(base).dtype
        return dtype if dtype.is_floating_point else torch.float32

    def _dequantise(self, weight: Any) -> torch.Tensor:
        raise NotImplementedError

    def _quantise(self, base: nn.Module, weight: torch.Tensor) -> Any:
        """``weight`` quantised the way the module's weight is (a new tensor of its type)."""
        raise NotImplementedError

    def get_weight(self, base: nn.Module) -> torch.Tensor:
        return self._dequantise(_weight(base))

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
        _check_shape(base, weight)
        old = _weight(base)
        hp = weight.detach().to(device=old.device, dtype=old.dtype).contiguous()
        _store(base, self._quantise(base, hp))
        return _report(self.get_weight(base), weight.detach())


class Int8WeightOnlyBackend(_TorchaoBackend):
    """``Int8WeightOnlyConfig``: an ``Int8Tensor`` weight, int8 codes with symmetric scales.

    Reading gives ``codes · scale`` in float32. Writing quantises again with torchao's own
    ``Int8Tensor.from_hp`` at the weight's granularity (per row, per group or per tensor, read
    from its block size), mapping (symmetric; asymmetric when the weight has non-zero zero
    points) and range, from the new weight rounded to the weight's dtype, as quantising the
    model did.
    """

    tensor_type: ClassVar[str] = INT8_TENSOR
    #: measured worst 0.0069 (random normal and tiny-Llama weights, LoRA merges, per-row int8)
    max_rel_error: ClassVar[float] = 0.015

    def refusal(self, base: nn.Module) -> str | None:
        reason = super().refusal(base)
        if reason is not None:
            return reason
        weight = _weight(base)
        if weight.act_quant_kwargs is not None:
            return f"it quantises activations too ({weight.act_quant_kwargs}): " + _GRADIENT_NOTE
        if weight.act_pre_scale is not None:
            return (
                "it scales activations before the matmul (act_pre_scale, e.g. AWQ or "
                "SmoothQuant), which this backend does not read or write back"
            )
        return None

    def _dequantise(self, weight: Any) -> torch.Tensor:
        dense: torch.Tensor = weight.dequantize(torch.float32)
        return dense

    @staticmethod
    def granularity(weight: Any) -> Any:
        """The torchao granularity the weight was quantised with, from its block size."""
        from torchao.quantization import PerGroup, PerRow, PerTensor

        rows, cols = (int(n) for n in weight.shape)
        block_rows, block_cols = (int(n) for n in weight.block_size)
        if block_rows == 1 and block_cols == cols:
            return PerRow()
        if (block_rows, block_cols) == (rows, cols):
            return PerTensor()
        if block_rows == 1:
            return PerGroup(block_cols)
        raise AdapterStateError(
            f"cannot requantise an Int8Tensor of shape {(rows, cols)} with block size "
            f"{list(weight.block_size)}: not per row, per group or per tensor"
        )

    def _quantise(self, base: nn.Module, weight: torch.Tensor) -> Any:
        from torchao.quantization import Int8Tensor
        from torchao.quantization.quant_primitives import MappingType

        old = _weight(base)
        zero = old.zero_point
        asymmetric = zero is not None and bool(zero.any())
        return Int8Tensor.from_hp(
            weight,
            granularity=self.granularity(old),
            mapping_type=MappingType.ASYMMETRIC if asymmetric else MappingType.SYMMETRIC,
            reduce_range=bool(old.reduce_range),
        )


class IntxWeightOnlyBackend(_TorchaoBackend):
    """``IntxWeightOnlyConfig`` with ``weight_dtype`` torch.int4 … torch.int8: an
    ``IntxUnpackedToInt8Tensor`` weight (codes in int8 storage, a scale and a zero point per
    row or per group).

    Reading gives torchao's dequantised weight in float32. Writing quantises again through
    ``quantize_`` with an ``IntxWeightOnlyConfig`` rebuilt from the weight: its bit width,
    block size (per row or per group), scale dtype, and mapping (asymmetric when the weight has
    non-zero zero points, symmetric otherwise). The weight does not record the choice of
    quantisation parameters: ``SYMMETRIC_NO_CLIPPING_ERR`` and HQQ weights are written back as
    plain symmetric (affine) ones.
    """

    tensor_type: ClassVar[str] = INTX_TENSOR
    #: measured worst 0.105 (random normal and tiny-Llama weights, LoRA merges, int4 per row)
    max_rel_error: ClassVar[float] = 0.2

    def refusal(self, base: nn.Module) -> str | None:
        reason = super().refusal(base)
        if reason is not None:
            return reason
        weight = _weight(base)
        if weight.activation_quantization is not None:
            return (
                f"it quantises activations too ({weight.activation_quantization}): "
                + _GRADIENT_NOTE
            )
        bits = self.bits(weight)
        if bits not in INTX_BITS:
            return (
                f"it holds {bits}-bit codes; this backend serves {INTX_BITS[0]} to "
                f"{INTX_BITS[-1]} bits (its declared error bound, max_rel_error="
                f"{self.max_rel_error}, is int4's)"
            )
        return None

    @staticmethod
    def bits(weight: Any) -> int:
        """The bit width of the weight's codes (``target_dtype`` torch.int4 → 4)."""
        name = str(weight.target_dtype).rsplit(".", 1)[-1]
        return int(name.removeprefix("int")) if name.startswith("int") else 0

    def _dequantise(self, weight: Any) -> torch.Tensor:
        dense: torch.Tensor = weight.dequantize()
        return dense.float()

    @staticmethod
    def config(weight: Any) -> Any:
        """The ``IntxWeightOnlyConfig`` that quantises a weight the way ``weight`` was."""
        from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup
        from torchao.quantization.quant_primitives import MappingType

        block_rows, block_cols = (int(n) for n in weight.block_size)
        if block_rows != 1:
            raise AdapterStateError(
                f"cannot requantise an IntxUnpackedToInt8Tensor with block size "
                f"{list(weight.block_size)}: not per row or per group"
            )
        per_row = block_cols == int(weight.shape[1])
        asymmetric = bool(weight.zero_point.any())
        return IntxWeightOnlyConfig(
            weight_dtype=weight.target_dtype,
            granularity=PerAxis(0) if per_row else PerGroup(block_cols),
            mapping_type=MappingType.ASYMMETRIC if asymmetric else MappingType.SYMMETRIC,
            scale_dtype=weight.scale.dtype,
        )

    def _quantise(self, base: nn.Module, weight: torch.Tensor) -> Any:
        from torchao.quantization import quantize_

        scratch = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        scratch.weight = nn.Parameter(weight, requires_grad=False)
        quantize_(scratch, self.config(_weight(base)))
        return scratch.weight
