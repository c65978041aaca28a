"""Weight backends for torchao's weight-only quantised ``nn.Linear`` layers.

torchao's ``quantize_`` keeps every ``nn.Linear`` and swaps its weight for a quantised tensor
subclass. A backend here claims a Linear only when its weight is one it can read and write
back (``supports``), so a plain Linear stays with core's dense backend:

* :class:`Int8WeightOnlyBackend`: ``Int8WeightOnlyConfig`` (``Int8Tensor``: int8 codes, one
  symmetric scale per row, per group or per tensor);
* :class:`IntxWeightOnlyBackend`: ``IntxWeightOnlyConfig`` with 4 to 8 bits
  (``IntxUnpackedToInt8Tensor``: codes in int8 storage, per-row or per-group scales and zero
  points).

Reading dequantises to float32 in the canonical ``(out_features, in_features)`` layout. Writing
quantises the new weight the way the module was quantised (same granularity, mapping, bit
width, dtype) and copies the result into the module's own weight tensor, so the module stays
an ``nn.Linear`` holding the same tensor type, on the same device, in the same dtype.

Each block (row, group, or the whole tensor) keeps its current scale and zero point when they
reproduce the new weight at least as closely as the ones torchao would choose afresh: torchao's
symmetric scale maps the largest value past the top code (``amax / 127.5`` for int8, ``/ 7.5``
for int4), so quantising an already quantised weight again with fresh scales rescales it by up
to 1/255 (int8) or 1/15 (int4) on every write. Kept scales make writing back the weight that was
read exact, and a merge never less accurate than ``quantize_`` of the merged weight.

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

#: the weight types, by the dotted names torchao gives them (it sets their ``__module__`` to
#: ``torchao.quantization``, where they are exported)
INT8_TENSOR = "torchao.quantization.Int8Tensor"
INTX_TENSOR = "torchao.quantization.IntxUnpackedToInt8Tensor"

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


def _ao() -> Any:
    """``torchao.quantization``, imported on first use (torchao ships no type information)."""
    import torchao.quantization as ao  # type: ignore[import-untyped,unused-ignore]

    return ao


def _is_type(weight: Any, type_name: str) -> bool:
    return isinstance(weight, torch.Tensor) and type_name in type_names(type(weight))


def _report(written: torch.Tensor, wanted: torch.Tensor) -> MergeReport:
    """How far the stored (dequantised) weight is from the one that was asked for."""
    diff = (written.double() - wanted.double()).abs()
    norm = wanted.double().norm().item()
    rel = diff.norm().item() / norm if norm > 0 else float(diff.norm().item() > 0)
    return MergeReport(max_abs_error=float(diff.max().item()), rel_error=rel, lossy=True)


def _check_writable(base: nn.Module, weight: torch.Tensor) -> None:
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


def _block_errors(dense: torch.Tensor, hp: torch.Tensor, block_size: Any) -> torch.Tensor:
    """Squared error of ``dense`` against ``hp`` summed over each quantisation block, in the
    shape torchao gives a 2-d weight's scales: ``(rows / block rows, columns / block columns)``."""
    rows, cols = hp.shape
    block_rows, block_cols = (int(n) for n in block_size)
    err = (dense.double() - hp.double()).pow(2)
    return err.reshape(rows // block_rows, block_rows, cols // block_cols, block_cols).sum((1, 3))


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
        """Whether ``base`` is an ``nn.Linear`` whose weight this backend reads and writes."""
        return isinstance(base, nn.Linear) and self.refusal(base) is None

    def shape(self, base: nn.Module) -> tuple[int, int]:
        linear: Any = base
        return int(linear.in_features), int(linear.out_features)

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        # the dtype torchao dequantises to (the model's dtype when it was quantised)
        dtype: torch.dtype = _weight(base).dtype
        return dtype if dtype.is_floating_point else torch.float32

    def get_weight(self, base: nn.Module) -> torch.Tensor:
        return self._dequantise(_weight(base))

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
        _check_writable(base, weight)
        old = _weight(base)
        hp = weight.detach().to(device=old.device, dtype=old.dtype).contiguous()
        _store(base, self._quantise(old, hp))
        return _report(self.get_weight(base), weight.detach())

    def _quantise(self, old: Any, hp: torch.Tensor) -> Any:
        """``hp`` quantised like ``old``: per block, with ``old``'s scale and zero point or
        fresh ones from torchao, whichever reproduces ``hp`` more closely."""
        fresh = self._fresh(old, hp)
        old_zero = _zero_point(old)
        kept = self._with_params(old, hp, old.scale, old_zero)
        keep = _block_errors(self._dequantise(kept), hp, old.block_size) <= _block_errors(
            self._dequantise(fresh), hp, old.block_size
        )
        if bool(keep.all()):
            return kept
        if not bool(keep.any()):
            return fresh
        scale = torch.where(keep, old.scale, fresh.scale)
        zero = torch.where(keep, old_zero, _zero_point(fresh))
        return self._with_params(old, hp, scale, zero)

    # -- what each backend implements ---------------------------------------------------------
    def _dequantise(self, weight: Any) -> torch.Tensor:
        """The dense float32 weight a quantised tensor stands for."""
        raise NotImplementedError

    def _fresh(self, old: Any, hp: torch.Tensor) -> Any:
        """``hp`` quantised as torchao quantises a weight like ``old``, with fresh scales."""
        raise NotImplementedError

    def _with_params(self, old: Any, hp: torch.Tensor, scale: Any, zero: Any) -> Any:
        """``hp`` quantised like ``old`` with the given scales and zero points."""
        raise NotImplementedError


def _zero_point(weight: Any) -> torch.Tensor:
    zero = weight.zero_point
    return zero if zero is not None else torch.zeros_like(weight.scale, dtype=torch.int8)


class Int8WeightOnlyBackend(_TorchaoBackend):
    """``Int8WeightOnlyConfig``: an ``Int8Tensor`` weight, int8 codes with symmetric scales.

    Reading gives ``codes · scale`` in float32. Writing quantises with torchao's own
    ``Int8Tensor.from_hp`` at the weight's granularity (per row, per group or per tensor, read
    from its block size), mapping (symmetric; asymmetric when the weight has non-zero zero
    points) and range, from the new weight rounded to the weight's dtype, as quantising the
    model did; each block keeps its scale when that is at least as accurate (module docstring).
    """

    tensor_type: ClassVar[str] = INT8_TENSOR
    #: worst measured 0.011 (per tensor; per row 0.0079, per group 0.0058) on random-normal
    #: and tiny-Llama weights, quantised and merged; heavy-tailed rows (Student-t, 3 degrees of
    #: freedom) reach 0.028 per row, and per tensor far more: the MergeReport says
    max_rel_error: ClassVar[float] = 0.03

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
        ao = _ao()
        rows, cols = (int(n) for n in weight.shape)
        block_rows, block_cols = (int(n) for n in weight.block_size)
        if block_rows == 1 and block_cols == cols:
            return ao.PerRow()
        if (block_rows, block_cols) == (rows, cols):
            return ao.PerTensor()
        if block_rows == 1:
            return ao.PerGroup(block_cols)
        raise AdapterStateError(
            f"cannot requantise an Int8Tensor of shape {(rows, cols)} with block size "
            f"{list(weight.block_size)}: not per row, per group or per tensor"
        )

    def _from_hp(self, old: Any, hp: torch.Tensor, **params: Any) -> Any:
        ao = _ao()
        asymmetric = bool(_zero_point(old).any())
        return ao.Int8Tensor.from_hp(
            hp,
            granularity=self.granularity(old),
            mapping_type=ao.MappingType.ASYMMETRIC if asymmetric else ao.MappingType.SYMMETRIC,
            reduce_range=bool(old.reduce_range),
            **params,
        )

    def _fresh(self, old: Any, hp: torch.Tensor) -> Any:
        return self._from_hp(old, hp)

    def _with_params(self, old: Any, hp: torch.Tensor, scale: Any, zero: Any) -> Any:
        return self._from_hp(old, hp, scale=scale, zero_point=zero)


class IntxWeightOnlyBackend(_TorchaoBackend):
    """``IntxWeightOnlyConfig`` with ``weight_dtype`` torch.int4 … torch.int8: an
    ``IntxUnpackedToInt8Tensor`` weight (codes in int8 storage, a scale and a zero point per
    row or per group).

    Reading gives torchao's dequantised weight in float32. Writing quantises through
    ``quantize_`` with an ``IntxWeightOnlyConfig`` rebuilt from the weight: its bit width,
    block size (per row or per group), scale dtype, and mapping (asymmetric when the weight has
    non-zero zero points, symmetric otherwise); each block keeps its scale and zero point when
    that is at least as accurate (module docstring). The weight does not record how its
    quantisation parameters were chosen: ``SYMMETRIC_NO_CLIPPING_ERR`` and HQQ weights get
    plain symmetric (affine) fresh scales.
    """

    tensor_type: ClassVar[str] = INTX_TENSOR
    #: worst measured 0.134 (int4 per row; per group, asymmetric 0.083) on random-normal and
    #: tiny-Llama weights, quantised and merged; 5 to 8 bits stay below int4's error
    max_rel_error: ClassVar[float] = 0.3

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
        ao = _ao()
        block_rows, block_cols = (int(n) for n in weight.block_size)
        if block_rows != 1:
            raise AdapterStateError(
                f"cannot requantise an IntxUnpackedToInt8Tensor with block size "
                f"{list(weight.block_size)}: not per row or per group"
            )
        per_row = block_cols == int(weight.shape[1])
        asymmetric = bool(weight.zero_point.any())
        return ao.IntxWeightOnlyConfig(
            weight_dtype=weight.target_dtype,
            granularity=ao.PerAxis(0) if per_row else ao.PerGroup(block_cols),
            mapping_type=ao.MappingType.ASYMMETRIC if asymmetric else ao.MappingType.SYMMETRIC,
            scale_dtype=weight.scale.dtype,
        )

    def _fresh(self, old: Any, hp: torch.Tensor) -> Any:
        scratch = nn.Linear(hp.shape[1], hp.shape[0], bias=False, device="meta")
        scratch.weight = nn.Parameter(hp, requires_grad=False)
        _ao().quantize_(scratch, self.config(old))
        return scratch.weight

    def _with_params(self, old: Any, hp: torch.Tensor, scale: Any, zero: Any) -> Any:
        return _ao().IntxUnpackedToInt8Tensor.from_hp(
            hp,
            old.block_size,
            old.target_dtype,
            intx_choose_qparams_algorithm=None,
            custom_scale=scale,
            custom_zero_point=zero,
        )
