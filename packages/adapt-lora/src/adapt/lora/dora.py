"""DoRA (Liu et al., 2024): weight-decomposed LoRA, as the LoRA variant ``"dora"``.

Each output feature's weight row is rescaled to a trained magnitude ``m``
(``lora_magnitude_vector``, initialised to the row norms of ``W + s·BA``)::

    W' = c ⊙ (W + s·BA),  c = m / ‖W + s·BA‖_row   (the norm detached, paper §4.3)
    out = base(x) + (c − 1) ⊙ (x Wᵀ) + c ⊙ s·B(A(x))

as PEFT computes it, dropout included (with dropout active, ``x Wᵀ`` is recomputed on the
dropped-out input). Several DoRA adapters active on one layer each scale relative to the
original ``W`` and their contributions add up; merging them gives exactly that
(``W' = W + Σᵢ (cᵢ − 1) W + cᵢ ΔWᵢ``), in one call or one after another.

Differences from PEFT, all deliberate: the row norm of a linear layer comes from ``‖W‖²``
``W·Aᵀ`` and the r×r Gram ``A·Aᵀ`` — no out×in product per step (no-grad forwards cache the
norms while the tensors are unchanged); norms below :data:`NORM_EPS` are clamped (PEFT gives NaN on a zero row, peft #2049); and
mixed batches work (PEFT refuses them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from adapt.core import AdapterStateError, adapter_dtype_device
from adapt.core.amp import autocast_dtype, autocast_off, cast_floating
from adapt.core.lowrank_linear import scaling_stamp
from adapt.core.typenames import describe

from .dora_kernels import dora_linear
from .variants import LoraVariant

if TYPE_CHECKING:
    from .config import LoraConfig
    from .layer import LoraLayer

#: Row norms below this are clamped to it: a zero (or underflowing) row gives a finite scale.
NORM_EPS = 1e-6
#: Rows whose squared norm is below this fraction of its parts are recomputed directly.
_CANCELLATION = 1e-4


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _weight(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def _base_weight(layer: LoraLayer, default: torch.Tensor) -> torch.Tensor:
    """The base module's weight parameter (what identifies the weight's values), if any."""
    return cast(torch.Tensor, getattr(layer.get_base_layer(), "weight", default))


def _cached(
    layer: LoraLayer,
    slot: tuple[str, str],
    key: Callable[[], Any],
    compute: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """``compute()`` (without autograd), kept in ``layer.variant_state[slot]`` while ``key()``
    and the merged adapters stay the same. Only no-grad forwards use the cache: a training step
    changes A and B anyway, and under FSDP the factors regathered for the next step may reuse the
    same storage and version (a stale value); nor a compiled graph (it would guard on versions)."""
    if _compiling() or torch.is_grad_enabled():
        with torch.no_grad():
            return compute()
    stamp = (key(), tuple(layer.merged_adapters))
    cached = layer.variant_state.get(slot)
    if cached is not None and cached[0] == stamp:
        return cast(torch.Tensor, cached[1])
    value = compute()
    layer.variant_state[slot] = (stamp, value)
    return value


def _stamp(*tensors: torch.Tensor) -> tuple[Any, ...]:
    """What identifies the values of ``tensors`` now: in-place changes bump ``_version``, and
    ``.data`` replaced (``module.to(...)``) moves the storage."""
    return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


class DoraVariant(LoraVariant):
    """DoRA for every LoRA layer type: Linear and ``Conv1D`` (also on quantised bases),
    Embedding, Conv1d/2d/3d."""

    name: ClassVar[str] = "dora"
    tensor_names: ClassVar[tuple[str, ...]] = ("lora_magnitude_vector",)
    config_flag: ClassVar[str | None] = "use_dora"

    # -- tensors -----------------------------------------------------------------------------
    @staticmethod
    def magnitudes(layer: LoraLayer) -> nn.ParameterDict:
        """The layer's ``lora_magnitude_vector`` container (one entry per DoRA adapter)."""
        return layer.variant_tensors("lora_magnitude_vector")

    def magnitude(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        return cast(torch.Tensor, self.magnitudes(layer)[adapter_name])

    def magnitude_shape(self, layer: LoraLayer) -> tuple[int, ...]:
        """PEFT's shape: (out,) for linear layers and embeddings, (1, out, 1, …) for convs."""
        from .layer_conv import LoraConv

        if isinstance(layer, LoraConv):
            base = layer.get_base_layer()
            assert isinstance(base, nn.modules.conv._ConvNd)
            return (1, layer.out_features, *([1] * len(base.kernel_size)))
        return (layer.out_features,)

    def init(self, layer: LoraLayer, adapter_name: str, config: LoraConfig) -> None:
        dtype, _device = adapter_dtype_device(layer)
        shape = self.magnitude_shape(layer)
        if any(t.is_meta for t in self._factors(layer, adapter_name)):
            m = torch.empty(shape, dtype=dtype, device="meta")
        else:
            with torch.no_grad():
                # a copy: the norm is cached, and a magnitude sharing its storage would carry
                # every in-place change of m (an optimizer step, a load) into the cached norm
                m = self.weight_norm(layer, adapter_name).view(shape).to(dtype, copy=True)
        self.magnitudes(layer)[adapter_name] = nn.Parameter(m)

    def delete(self, layer: LoraLayer, adapter_name: str) -> None:
        for key in [k for k in layer.variant_state if k[0] == adapter_name]:
            del layer.variant_state[key]

    @staticmethod
    def _factors(layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if adapter_name in layer.lora_A:
            return _weight(layer.lora_A[adapter_name]), _weight(layer.lora_B[adapter_name])
        return layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]

    # -- the norm ----------------------------------------------------------------------------
    def weight_norm(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """``‖W + s·BA‖`` per output feature (float32 or wider, detached); in no-grad forwards
        cached while the weight and factors are unchanged."""
        a, b = self._factors(layer, adapter_name)
        return _cached(
            layer,
            (adapter_name, "norm"),
            lambda: (
                _stamp(a, b, _base_weight(layer, a)),
                scaling_stamp(layer.scaling[adapter_name]),
            ),
            lambda: self._compute_norm(layer, adapter_name),
        )

    def _compute_norm(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        from .layer import LoraLinear

        weight = layer.original_weight()
        if isinstance(layer, LoraLinear) and adapter_name in layer.lora_A:
            return self._linear_norm(layer, adapter_name, weight)
        delta = layer.delta_weight(adapter_name)
        full = weight.to(torch.promote_types(delta.dtype, torch.float32)) + delta
        norm: torch.Tensor = full.movedim(layer.output_axis, 0).flatten(1).norm(dim=1)
        return norm

    def _row_sq_norms(self, layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
        """``‖W‖²`` per row; in no-grad forwards cached per weight (see :func:`_cached`)."""
        return _cached(
            layer,
            ("", "row_sq_norms"),
            lambda: _stamp(_base_weight(layer, weight)),
            lambda: weight.to(torch.promote_types(weight.dtype, torch.float32)).pow(2).sum(1),
        )

    def _linear_norm(
        self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor
    ) -> torch.Tensor:
        # ‖W + sBA‖² = ‖W‖² + 2s·⟨W Aᵀ, B⟩_row + s²·⟨B (A Aᵀ), B⟩_row: out·in·r work, no out×in
        a, b = self._factors(layer, adapter_name)
        s = layer.scaling[adapter_name]
        wf = weight if weight.dtype == a.dtype else weight.to(a.dtype)
        w_sq = self._row_sq_norms(layer, weight).to(a.dtype)
        wa = wf @ a.t()  # (out, r)
        gram = a @ a.t()  # (r, r)
        cross = (wa * b).sum(1)
        own = ((b @ gram) * b).sum(1)
        sq = w_sq + (2 * s) * cross + (s * s) * own
        if not _compiling():
            # where the parts cancel (W ≈ −sBA), the formula loses digits: compute those rows
            bad = sq < _CANCELLATION * (w_sq + (s * s) * own)
            if bool(bad.any()):
                rows = bad.nonzero().flatten()
                sq[rows] = (wf[rows] + s * (b[rows] @ a)).pow(2).sum(1)
        return sq.clamp_min(0).sqrt()

    def scale(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """``c = m / ‖W + s·BA‖`` per output feature (gradient to ``m`` only)."""
        norm = self.weight_norm(layer, adapter_name).clamp_min(NORM_EPS)
        m = self.magnitude(layer, adapter_name).flatten()
        return m / norm.to(m.dtype)

    # -- forward -----------------------------------------------------------------------------
    def adapter_effect(
        self, layer: LoraLayer, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor
    ) -> torch.Tensor:
        # embeddings take no dropout (their input is token ids), as in plain LoRA and PEFT
        dropped = layer.dropout_active(adapter_name)
        if dropped:
            x = layer.lora_dropout[adapter_name](x)
        lora = layer.lora_output(x, adapter_name)
        if dropped or layer.merged_adapters:
            # the base's map on the dropped-out input, or with merged adapters taken out
            base = layer.base_without_bias(x)
        else:
            base = base_output
            bias = layer.bias
            if bias is not None:
                base = base - layer.per_output(bias, base).to(base.dtype)
        c = layer.per_output(self.scale(layer, adapter_name), lora)
        return (c - 1) * base + c * lora

    def fused_forward(
        self, layer: LoraLayer, x: torch.Tensor, adapter_name: str
    ) -> torch.Tensor | None:
        if layer.dropout_active(adapter_name) or layer.merged_adapters:
            return None
        base = layer.base_layer
        assert isinstance(base, nn.Linear)
        a, b = self._factors(layer, adapter_name)
        s = layer.scaling[adapter_name]
        c = self.scale(layer, adapter_name)
        device_type = x.device.type
        amp = autocast_dtype(device_type)
        if amp is not None:
            xc, wc, ac, bc = (
                cast(torch.Tensor, cast_floating(t, amp)) for t in (x, base.weight, a, b)
            )
            bias = cast_floating(base.bias, amp)
            with autocast_off(device_type):
                return dora_linear(xc, wc, bias, ac, bc, c, s)
        if not x.dtype == a.dtype == b.dtype == base.weight.dtype:
            return None
        return dora_linear(x, base.weight, base.bias, a, b, c, s)

    # -- merging -----------------------------------------------------------------------------
    def _merge_term(
        self, layer: LoraLayer, weight: torch.Tensor, adapter_name: str, c: torch.Tensor
    ) -> torch.Tensor:
        original = layer.original_weight().to(weight.dtype)
        delta = layer.delta_weight(adapter_name).detach().to(weight.dtype)
        cw = layer.per_weight(c.to(weight.dtype), weight)
        return (cw - 1) * original + cw * delta

    def merge_weight(
        self, layer: LoraLayer, weight: torch.Tensor, adapter_name: str
    ) -> torch.Tensor:
        c = self.scale(layer, adapter_name).detach()
        # kept for unmerging and for recovering the original weight while merged (PEFT caches
        # the norm for the same reason); only read for adapters in merged_adapters
        layer.variant_state[(adapter_name, "merged_scale")] = c.clone()
        weight += self._merge_term(layer, weight, adapter_name, c)
        return weight

    def _merged_scale(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        c = layer.variant_state.get((adapter_name, "merged_scale"))
        if c is None:
            raise AdapterStateError(
                f"{describe(layer.get_base_layer())}: DoRA adapter {adapter_name!r} is marked "
                "merged but its merge scale is unknown, so it cannot be unmerged exactly "
                "(reload the base model)"
            )
        return cast(torch.Tensor, c)

    def unmerge_weight(
        self, layer: LoraLayer, weight: torch.Tensor, adapter_name: str
    ) -> torch.Tensor:
        c = self._merged_scale(layer, adapter_name)
        weight -= self._merge_term(layer, weight, adapter_name, c)
        return weight

    def merged_form(
        self, layer: LoraLayer, adapter_name: str
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        c = self._merged_scale(layer, adapter_name)
        delta = layer.delta_weight(adapter_name).detach()
        return c, layer.per_weight(c.to(delta.dtype), delta) * delta
