"""LoRA layers: ``out = base(x) + (α / r) · B(A(dropout(x)))``.

One :class:`LoraLayer` base holds the per-adapter state (``lora_A``, ``lora_B``,
``lora_embedding_A/B``, dropout, rank, scaling); subclasses only say how A and B are shaped
and applied for their module type (:meth:`LoraLayer.create_adapter`,
:meth:`LoraLayer.lora_output`, :meth:`LoraLayer.delta_weight`). Third-party layers subclass
:class:`LoraLayer` the same way. An adapter may run a LoRA variant (DoRA,
:mod:`adapt.lora.variants`): the layer then hands that adapter's forward and merge to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from adapt.core import (
    ConfigError,
    adapter_dtype_device,
    add_scaled_product,
)
from adapt.core.kernels import scale_smaller
from adapt.core.lowrank_linear import low_rank_linear
from adapt.core.routing import Gathered
from adapt.core.typenames import CONV1D_TRANSFORMERS

from .config import LoraConfig, weight_init
from .gathered import add_gathered_effect, gathered_effect, invalidate, stacks, supported
from .init_state import restore_base
from .layer_variants import VariantHost
from .lora_bias import add_lora_bias, check_bias_merge, lora_bias_of


def _weight(module: nn.Module) -> torch.Tensor:
    """A sub-layer's ``weight`` parameter, typed."""
    return cast(torch.Tensor, module.weight)


def bare_linear(
    in_features: int, out_features: int, *, dtype: torch.dtype, device: torch.device
) -> nn.Linear:
    """An ``nn.Linear`` without bias whose weight is allocated but not initialised (the caller
    initialises it once; ``nn.Linear(...)`` would draw a Kaiming init first, only for it to be
    overwritten — a third of injection time on large models)."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features = in_features
    layer.out_features = out_features
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
    layer.register_parameter("bias", None)
    return layer


class LoraLayer(VariantHost):
    """Base of LoRA layers. Subclasses implement :meth:`create_adapter`,
    :meth:`lora_output` and :meth:`delta_weight` (and :meth:`per_output`,
    :meth:`base_without_bias` where their output or weight is not laid out like a linear's);
    this class handles rank, scaling, dropout, initialisation bookkeeping, variants and
    deletion."""

    method: ClassVar[str] = "lora"
    adapter_layer_names: ClassVar[tuple[str, ...]] = (
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
    )
    other_param_names: ClassVar[tuple[str, ...]] = ("lora_dropout", "lora_init")
    #: whether PiSSA / OLoRA / LoftQ initialise this layer type from its weight (linear-like
    #: layers); other types get the default initialisation, as in PEFT
    initialised_from_weight: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_init = nn.ModuleDict()  # what PiSSA / OLoRA took out of the base (init_state)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def update_layer(
        self,
        adapter_name: str,
        config: LoraConfig,
        r: int | None = None,
        lora_alpha: float | None = None,
        **kwargs: Any,
    ) -> None:
        r = config.r if r is None else r
        alpha = config.lora_alpha if lora_alpha is None else lora_alpha
        if not isinstance(r, int) or r <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got r={r!r}")
        dtype, device = adapter_dtype_device(self)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = config.scaling(r, alpha)
        dropout = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.create_adapter(adapter_name, r, dtype=dtype, device=device)
        if config.lora_bias:
            add_lora_bias(self, adapter_name, config.init_lora_weights)
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self.attach_variant(adapter_name, config)
        invalidate(self)  # mixed batches: the stacked factors

    def merge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        extra = lora_bias_of(self, adapter_name)
        return bias if extra is None else bias + self.scaling[adapter_name] * extra.to(bias.dtype)

    def unmerge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        extra = lora_bias_of(self, adapter_name)
        return bias if extra is None else bias - self.scaling[adapter_name] * extra.to(bias.dtype)

    def changes_bias(self) -> bool:  # only adapters with lora_bias touch the base bias
        return any(lora_bias_of(self, n) is not None for n in self.lora_B)

    def merge_depends_on_weight(self) -> bool:  # a LoRA bias may refuse (no base bias)
        return super().merge_depends_on_weight() or self.changes_bias()

    def merged_bias(self, adapter_names: Sequence[str]) -> torch.Tensor | None:
        check_bias_merge(self, adapter_names)
        return super().merged_bias(adapter_names)

    def on_unload(self) -> None:
        for name in list(self.lora_init):
            if name not in self.merged_adapters:
                restore_base(self, name)

    def create_adapter(
        self, adapter_name: str, r: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        """Create ``lora_A[adapter_name]`` / ``lora_B[adapter_name]`` (or the embedding pair)."""
        raise NotImplementedError

    def reset_lora_parameters(self, adapter_name: str, init: bool | str) -> None:
        """Initialise A and B: B = 0 so the adapter starts as the identity. With ``init``
        False both keep a layer's default initialisation (Kaiming-uniform, a = √5), so the
        adapter is not the identity. Tensors on the meta device (no storage) are left alone."""
        if adapter_name in self.lora_A:
            weight_a = _weight(self.lora_A[adapter_name])
            weight_b = _weight(self.lora_B[adapter_name])
            if weight_a.is_meta:
                return
            if self.initialised_from_weight and weight_init(init) is not None:
                # PiSSA / OLoRA / LoftQ set both from the base weight (LoraMethod.initialise):
                # no random draws here, so pissa_niter_K's draws depend on the seed alone
                with torch.no_grad():
                    weight_a.zero_()
                    weight_b.zero_()
                return
            with torch.no_grad():
                if init is False:
                    nn.init.kaiming_uniform_(weight_a, a=math.sqrt(5))
                    nn.init.kaiming_uniform_(weight_b, a=math.sqrt(5))
                    return
                if init == "gaussian":
                    nn.init.normal_(weight_a, std=1 / self.r[adapter_name])
                else:
                    nn.init.kaiming_uniform_(weight_a, a=math.sqrt(5))
                nn.init.zeros_(weight_b)
        if init is False:
            return
        with torch.no_grad():
            if adapter_name in self.lora_embedding_A:
                nn.init.zeros_(self.lora_embedding_A[adapter_name])
                nn.init.normal_(self.lora_embedding_B[adapter_name])

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.merged_adapters:
            restore_base(self, adapter_name)  # PiSSA / OLoRA: the base weight as it was
        super().delete_adapter(adapter_name)
        self.detach_variant(adapter_name)
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(adapter_name, None)
        invalidate(self)

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.lora_output(self.lora_dropout[adapter_name](x), adapter_name)

    def _ab(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        lora_a = self.lora_A[adapter_name]
        lora_b = self.lora_B[adapter_name]
        x = x.to(_weight(lora_a).dtype)
        out: torch.Tensor = lora_b(lora_a(x))
        return out * self.scaling[adapter_name]


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` and transformers ``Conv1D`` (and subclasses such as quantised
    linears, whose weights a backend reads)."""

    base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear, CONV1D_TRANSFORMERS)
    initialised_from_weight: ClassVar[bool] = True
    delta_weight_forward: ClassVar[bool] = True

    def create_adapter(
        self, adapter_name: str, r: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.lora_A[adapter_name] = bare_linear(self.in_features, r, dtype=dtype, device=device)
        self.lora_B[adapter_name] = bare_linear(r, self.out_features, dtype=dtype, device=device)

    def lora_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self._ab(x, adapter_name)

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.original_weight()
        return F.linear(x, weight.to(x.dtype))

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        variant = self.lora_variant.get(adapter_name)
        if variant is not None:
            return variant.fused_forward(self, x, adapter_name)
        if lora_bias_of(self, adapter_name) is not None:
            return None  # the general path adds s·b_B
        dropout = self.lora_dropout[adapter_name]
        if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
            return None
        if not torch.is_grad_enabled():
            return None  # inference: the in-place sum below is as fast, without a custom node
        base = self.base_layer
        assert isinstance(base, nn.Linear)
        weight_a, weight_b = _weight(self.lora_A[adapter_name]), _weight(self.lora_B[adapter_name])
        return low_rank_linear(x, base, weight_a, weight_b, self.scaling[adapter_name])

    def add_adapter_output(
        self,
        result: torch.Tensor,
        x: torch.Tensor,
        name: str,
        *,
        base_output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (
            not self.fuse_adapter_output
            or name in self.lora_variant
            or lora_bias_of(self, name) is not None
        ):
            return super().add_adapter_output(result, x, name, base_output=base_output)
        # result + s·(x Aᵀ) Bᵀ with the B product, the scale and the sum in one addmm; not in
        # place on the base output when a variant adapter of this layer reads it afterwards
        weight_a = _weight(self.lora_A[name])
        h = F.linear(self.lora_dropout[name](x.to(weight_a.dtype)), weight_a)
        return add_scaled_product(
            result,
            h,
            _weight(self.lora_B[name]),
            self.scaling[name],
            in_place=self.may_add_in_place(result)
            and (result is not base_output or not self.lora_variant),
        )

    def gathered_adapter_effect(
        self, x: Any, gathered: Gathered, base_output: torch.Tensor
    ) -> torch.Tensor | None:
        return gathered_effect(self, x, gathered, base_output)  # mixed batches: one product

    def add_gathered_adapter_effect(
        self, result: torch.Tensor, x: Any, gathered: Gathered
    ) -> torch.Tensor | None:
        return add_gathered_effect(self, result, x, gathered)

    def refresh_gathered(self, adapters: tuple[str, ...]) -> None:
        if supported(self, adapters):
            stacks(self, adapters)

    def _merged_weight_forward(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        out = super()._merged_weight_forward(x, names)
        for name in names:
            extra = lora_bias_of(self, name)
            if extra is not None:
                out = out + self.scaling[name] * extra.to(out.dtype)
        return out

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight_b = _weight(self.lora_B[adapter_name])
        weight_a = _weight(self.lora_A[adapter_name])
        out: torch.Tensor = (weight_b @ weight_a) * self.scaling[adapter_name]
        return out

    def add_delta_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lora_variant:
            return super().add_delta_weight(weight, adapter_name)
        weight_b = _weight(self.lora_B[adapter_name])
        weight_a = _weight(self.lora_A[adapter_name])
        if not weight.dtype == weight_a.dtype == weight_b.dtype:
            return super().add_delta_weight(weight, adapter_name)
        scale: float | torch.Tensor = self.scaling[adapter_name]
        if isinstance(scale, torch.Tensor):  # hot-swap slot: never read on the host
            weight_b, weight_a = scale_smaller(weight_b, weight_a, scale)
            return torch.addmm(weight, weight_b, weight_a)
        return torch.addmm(weight, weight_b, weight_a, alpha=scale)


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: A (r × vocab) is looked up like an embedding table, then B."""

    base_types: ClassVar[tuple[type | str, ...]] = (nn.Embedding,)
    #: the canonical weight is (vocab, dim): output features index its columns
    output_axis: ClassVar[int] = 1

    def create_adapter(
        self, adapter_name: str, r: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        # random (not zero) so that init_lora_weights=False gives a non-identity adapter
        self.lora_embedding_A[adapter_name] = nn.Parameter(
            torch.randn(r, self.in_features, dtype=dtype, device=device)
        )
        self.lora_embedding_B[adapter_name] = nn.Parameter(
            torch.randn(self.out_features, r, dtype=dtype, device=device)
        )

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.lora_output(x, adapter_name)  # PEFT applies no dropout to embeddings

    def dropout_active(self, adapter_name: str) -> bool:
        return False  # token ids are not dropped out

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        assert isinstance(base, nn.Embedding)
        return F.embedding(
            x,
            self.original_weight(),
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def lora_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        base = self.get_base_layer()
        assert isinstance(base, nn.Embedding)
        weight_a = self.lora_embedding_A[adapter_name]
        weight_b = self.lora_embedding_B[adapter_name]
        after_a = F.embedding(
            x,
            weight_a.T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        out: torch.Tensor = (after_a @ weight_b.T) * self.scaling[adapter_name]
        return out

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight_a = self.lora_embedding_A[adapter_name]
        weight_b = self.lora_embedding_B[adapter_name]
        out: torch.Tensor = (weight_b @ weight_a).T * self.scaling[adapter_name]
        return out
