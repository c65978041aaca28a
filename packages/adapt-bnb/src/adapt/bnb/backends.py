"""Weight backends for bitsandbytes ``Linear8bitLt`` and ``Linear4bit``.

A backend gives every adapter method the dense weight of a quantised layer in the canonical
``(out_features, in_features)`` layout, and writes a merged dense weight back by quantising
it again, reporting the error that requantisation introduced. Method layers (LoRA, VeRA,
AdaLoRA, third-party ones) never see the packed storage, so none of them knows bitsandbytes.

bitsandbytes is imported only when a backend is used, never when this module is imported:
the registry matches the base types below by their dotted names.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, cast

import torch
from torch import nn

from adapt.core import AdapterStateError, MergeReport, TargetError
from adapt.core.typenames import describe

LINEAR_8BIT = "bitsandbytes.nn.modules.Linear8bitLt"
LINEAR_4BIT = "bitsandbytes.nn.modules.Linear4bit"


def _report(written: torch.Tensor, wanted: torch.Tensor) -> MergeReport:
    """How far the stored (dequantised) weight is from the one that was asked for."""
    diff = (written.float() - wanted.float()).abs()
    norm = wanted.float().norm().item()
    rel = diff.norm().item() / norm if norm > 0 else 0.0
    return MergeReport(max_abs_error=float(diff.max().item()), rel_error=rel, lossy=True)


def _features(base: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` as the layer declares them (not the packed storage)."""
    layer: Any = base
    return int(layer.in_features), int(layer.out_features)


def _check_shape(base: nn.Module, weight: torch.Tensor) -> None:
    n_in, n_out = _features(base)
    want = (n_out, n_in)
    if tuple(weight.shape) != want:
        raise TargetError(
            f"cannot write a weight of shape {tuple(weight.shape)} into {describe(base)}, whose "
            f"dense weight is {want} (out_features, in_features)"
        )


class Int8Backend:
    """``bnb.nn.Linear8bitLt``: int8 codes with one absmax scale per output row (LLM.int8()).

    Reading gives ``CB * SCB / 127`` in float32; writing quantises row-wise again (through
    float16, as bitsandbytes does when it quantises a layer). With ``has_fp16_weights=True``
    the layer holds a plain float weight, which is read and written as is.
    """

    base_types: ClassVar[tuple[type | str, ...]] = (LINEAR_8BIT,)
    lossy: ClassVar[bool] = True
    #: Relative (Frobenius) error a write may introduce: row-wise absmax int8 measured at most
    #: 0.0044 on random weights (tests/test_backend_kit.py), declared with room to spare.
    max_rel_error: ClassVar[float] = 0.01
    #: LoftQ's ``loftq_bits=8`` (adapt.core.quantisers): row-wise absmax int8, as PEFT's LoftQ.
    loftq_bits: ClassVar[int] = 8

    def shape(self, base: nn.Module) -> tuple[int, int]:
        return _features(base)

    @staticmethod
    def roundtrip(weight: torch.Tensor) -> torch.Tensor:
        """``weight`` quantised as a new 8-bit layer stores it (row-wise absmax of its float16
        copy) and dequantised, in float32."""
        import bitsandbytes.functional as bnbf

        codes, scales, _ = bnbf.int8_vectorwise_quant(
            weight.detach().to(dtype=torch.float16).contiguous()
        )
        return cast(torch.Tensor, bnbf.int8_vectorwise_dequant(codes, scales)).float()

    @staticmethod
    def _codes(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        weight = cast(torch.Tensor, base.weight)
        state = getattr(base, "state", None)
        codes = getattr(weight, "CB", None)
        if codes is None and state is not None:
            codes = getattr(state, "CB", None)
        if codes is None:
            codes = weight.data
        scales = getattr(weight, "SCB", None)
        if scales is None and state is not None:
            scales = getattr(state, "SCB", None)
        if scales is None or codes.dtype != torch.int8:
            raise AdapterStateError(
                f"{describe(base)} holds no quantised weight yet (weight dtype {weight.dtype}, no "
                "row scales): bitsandbytes quantises an 8-bit layer when it is moved to a "
                "device, e.g. layer.to('cpu') or loading with BitsAndBytesConfig(load_in_8bit=True)"
            )
        return codes, scales

    def get_weight(self, base: nn.Module) -> torch.Tensor:
        weight = cast(torch.Tensor, base.weight)
        if weight.is_floating_point():  # has_fp16_weights=True: a float weight
            return weight
        import bitsandbytes.functional as bnbf

        codes, scales = self._codes(base)
        return cast(torch.Tensor, bnbf.int8_vectorwise_dequant(codes, scales))

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
        _check_shape(base, weight)
        param = cast(torch.Tensor, base.weight)
        if param.is_floating_point():
            with torch.no_grad():
                param.copy_(weight.to(param.dtype))
            return MergeReport()
        import bitsandbytes.functional as bnbf

        codes, scales, _ = bnbf.int8_vectorwise_quant(
            weight.detach().to(device=param.device, dtype=torch.float16).contiguous()
        )
        param.data = codes
        # The layer moves CB/SCB from the parameter into its matmul state on the next forward.
        param.CB = codes  # type: ignore[attr-defined]
        param.SCB = scales  # type: ignore[attr-defined]
        state = getattr(base, "state", None)
        if state is not None:
            state.CB = None
            state.SCB = None
        return _report(bnbf.int8_vectorwise_dequant(codes, scales), weight)

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        weight = cast(torch.Tensor, base.weight)
        # LLM.int8() multiplies in float16; adapters get float32 (adapter_dtype_device).
        return weight.dtype if weight.is_floating_point() else torch.float16


# --------------------------------------------------------------------------------- 4-bit


def _unpack_cpu_layout(packed: torch.Tensor, state: Any, block_n: int = 32) -> torch.Tensor:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight, returning the standard storage.

    On the first eval-mode forward on a CPU with AVX512-BF16, ``Linear4bit`` rewrites its
    weight into a kernel-friendly layout ``[out, in / 2]`` (``quant_state.packing_format_for_cpu``):
    the 4-bit codes of each group of ``block_n`` output rows are interleaved so that byte ``j``
    of a 32-byte run holds code ``j`` (low nibble) and code ``j + 32`` (high nibble) of a run
    of 64 codes ordered (row-in-block, column pair). Standard storage is the row-major code
    sequence, two codes per byte, first code in the high nibble.
    """
    n_out, half_in = packed.shape
    if n_out % block_n:
        raise AdapterStateError(
            f"cannot read a CPU-packed 4-bit weight of shape {tuple(packed.shape)}: "
            f"{n_out} output rows are not a multiple of {block_n}"
        )
    runs = packed.reshape(-1, 32)
    codes = torch.cat([runs & 0xF, runs >> 4], dim=-1)  # (-1, 64): (row-in-block, pair)
    codes = codes.reshape(n_out // block_n, half_in, block_n, 2).transpose(1, 2)
    codes = codes.reshape(-1)  # row-major (out, in)
    standard = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)
    standard = standard.reshape(state.original_qshape)
    storage = getattr(state, "original_storage_type", None)
    return standard.view(storage) if storage else standard


class FourBitBackend:
    """``bnb.nn.Linear4bit`` (nf4 or fp4, with or without double quantisation).

    Reading dequantises the codes with their block absmax (and undoes the CPU kernel's weight
    repacking when a forward in eval mode has applied it); writing quantises the new weight
    with the layer's own settings (quant type, block size, double quantisation, storage type,
    dtype), in the standard layout, which bitsandbytes repacks again on its next CPU forward.
    """

    base_types: ClassVar[tuple[type | str, ...]] = (LINEAR_4BIT,)
    lossy: ClassVar[bool] = True
    #: Relative (Frobenius) error a write may introduce: blockwise NF4 measured at most 0.099,
    #: FP4 0.118 on uniform random weights (tests/test_backend_kit.py), declared with room.
    max_rel_error: ClassVar[float] = 0.25
    #: LoftQ's ``loftq_bits=4`` (adapt.core.quantisers): nf4, block size 64, no double
    #: quantisation — the settings of PEFT's LoftQ.
    loftq_bits: ClassVar[int] = 4

    def shape(self, base: nn.Module) -> tuple[int, int]:
        return _features(base)

    @staticmethod
    def roundtrip(weight: torch.Tensor) -> torch.Tensor:
        """``weight`` quantised to nf4 (blocks of 64, float32 absmax) and dequantised."""
        import bitsandbytes.functional as bnbf

        codes, state = bnbf.quantize_4bit(
            weight.detach().float().contiguous(),
            blocksize=64,
            compress_statistics=False,
            quant_type="nf4",
        )
        return bnbf.dequantize_4bit(codes, state).float()

    @staticmethod
    def logical_numel(param: torch.Tensor) -> int:
        """The number of weights a packed 4-bit parameter holds: its quantisation state's
        shape (two 4-bit codes per stored byte), or its own size before quantisation."""
        state = getattr(param, "quant_state", None)
        if state is None:
            return param.numel()
        return math.prod(int(d) for d in state.shape)

    @staticmethod
    def _state(base: nn.Module) -> Any:
        weight = base.weight
        state = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
        return state

    def _standard(self, base: nn.Module) -> tuple[torch.Tensor, Any]:
        """The weight's codes and quantisation state in bitsandbytes' standard layout."""
        import bitsandbytes.functional as bnbf

        weight = cast(torch.Tensor, base.weight)
        state = self._state(base)
        if not getattr(state, "packing_format_for_cpu", False):
            return weight.data, state
        codes = _unpack_cpu_layout(weight.data, state)
        # The CPU layout keeps one absmax per block, transposed, in bfloat16 (that is what the
        # kernel multiplies by, so it is the weight the layer computes with).
        absmax = state.absmax.T.reshape(-1).float()
        standard = bnbf.QuantState(  # type: ignore[no-untyped-call]
            absmax=absmax,
            shape=state.shape,
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=state.original_dtype,
        )
        return codes, standard

    def get_weight(self, base: nn.Module) -> torch.Tensor:
        weight = cast(torch.Tensor, base.weight)
        state = self._state(base)
        if state is None:
            if weight.is_floating_point():  # not quantised yet (before .to(device))
                return weight
            raise AdapterStateError(f"{describe(base)} has a 4-bit weight but no quant_state")
        import bitsandbytes.functional as bnbf

        codes, standard = self._standard(base)
        dense = bnbf.dequantize_4bit(codes, standard)
        return dense.float()

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
        _check_shape(base, weight)
        param = cast(torch.Tensor, base.weight)
        state = self._state(base)
        if state is None:
            with torch.no_grad():
                param.copy_(weight.to(param.dtype))
            return MergeReport()
        import bitsandbytes.functional as bnbf

        packed_for_cpu = bool(getattr(state, "packing_format_for_cpu", False))
        dtype = state.original_dtype if packed_for_cpu else state.dtype
        nested = bool(state.original_nested if packed_for_cpu else state.nested)
        storage = getattr(param, "quant_storage", torch.uint8)
        codes, new_state = bnbf.quantize_4bit(
            weight.detach().to(device=param.device, dtype=dtype).contiguous(),
            blocksize=state.blocksize,
            compress_statistics=nested,
            quant_type=state.quant_type,
            quant_storage=storage,
        )
        param.data = codes
        param.quant_state = new_state  # type: ignore[attr-defined]
        if getattr(base, "quant_state", None) is not None:
            setattr(base, "quant_state", new_state)  # noqa: B010 (not a tensor or module)
        written = bnbf.dequantize_4bit(codes, copy.copy(new_state))
        return _report(written, weight)

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        dtype = getattr(base, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
        state = self._state(base)
        if state is not None:
            found = getattr(state, "original_dtype", None) or state.dtype
            return cast(torch.dtype, found)
        return cast(torch.Tensor, base.weight).dtype
