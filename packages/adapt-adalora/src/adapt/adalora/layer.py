"""AdaLoRA's SVD-form layer: ``out = base(x) + (α / init_r) · ((dropout(x) (A ⊙ E)ᵀ) Bᵀ)``.

Per adapter: ``lora_A`` (r × in, right singular vectors), ``lora_E`` (r × 1, singular
values), ``lora_B`` (out × r, left singular vectors), with r = ``init_r`` while training and
the number of kept ranks after loading a budgeted adapter. The scale divides by ``init_r``
(PEFT's ``ranknum``) in both cases, so a pruned adapter computes what it computed before.

Written against the weight-backend protocol: the same class serves ``nn.Linear``,
transformers ``Conv1D`` and quantised linears (adapt-bnb).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from adapt.core import AdapterLayer, ConfigError, adapter_dtype_device, add_scaled_product
from adapt.core.kernels import gathered_low_rank, stack_factors
from adapt.core.lowrank_linear import low_rank_linear
from adapt.core.routing import Gathered
from adapt.core.typenames import CONV1D_TRANSFORMERS

from .config import AdaLoraConfig

#: Added to the rank in the scale, as PEFT does (so a rank-0 layer does not divide by zero).
RANK_EPS = 1e-5


def kept_ranks(tensors: dict[str, torch.Tensor], mask: list[bool]) -> dict[str, torch.Tensor]:
    """A layer's ``lora_A``, ``lora_E``, ``lora_B`` (whole tensors, by those names) restricted to
    the ranks ``mask`` keeps, as saved on disk. ``mask`` has one entry per initial rank; tensors
    that already hold only the kept ranks (loaded from a budgeted checkpoint) are returned as is.
    """
    r, kept = int(tensors["lora_E"].shape[0]), sum(mask)
    if r == kept or len(mask) != r:
        return tensors
    index = torch.tensor([i for i, keep in enumerate(mask) if keep], dtype=torch.long)
    index = index.to(tensors["lora_A"].device)
    return {
        "lora_A": tensors["lora_A"].index_select(0, index),
        "lora_E": tensors["lora_E"].index_select(0, index),
        "lora_B": tensors["lora_B"].index_select(1, index),
    }


class AdaLoraLayer(AdapterLayer):
    """Base of AdaLoRA layers; third-party layers subclass it and set ``base_types``."""

    method: ClassVar[str] = "adalora"
    adapter_layer_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_E")
    other_param_names: ClassVar[tuple[str, ...]] = ("lora_dropout",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.ranknum: dict[str, float] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def update_layer(
        self,
        adapter_name: str,
        config: AdaLoraConfig,
        r: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the triplets: ``r`` of them (default ``init_r``; fewer when loading a
        budgeted adapter). E starts at zero, so the adapter starts as the identity."""
        r = config.init_r if r is None else r
        if not isinstance(r, int) or r < 0:
            raise ConfigError(f"AdaLoRA rank must be a non-negative integer, got {r!r}")
        dtype, device = adapter_dtype_device(self)
        self.r[adapter_name] = r
        self.ranknum[adapter_name] = float(config.init_r)
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(r)
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p=p) if p > 0 else nn.Identity()

        init = bool(config.init_lora_weights) and device.type != "meta"
        # without init, standard normal values (a non-identity adapter); with it the tensors
        # are drawn once below, and on the meta device there is nothing to draw
        make = torch.randn if not config.init_lora_weights else torch.empty

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(make(*shape, dtype=dtype, device=device))

        self.lora_A[adapter_name] = param(r, self.in_features)
        self.lora_E[adapter_name] = param(r, 1)
        self.lora_B[adapter_name] = param(self.out_features, r)
        if init:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E[adapter_name])
                nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)

    def scale(self, adapter_name: str) -> float:
        return self.scaling[adapter_name] / (self.ranknum[adapter_name] + RANK_EPS)

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a = self.lora_A[adapter_name]
        e = self.lora_E[adapter_name]
        b = self.lora_B[adapter_name]
        x = self.lora_dropout[adapter_name](x.to(a.dtype))
        out: torch.Tensor = (x @ (a * e).T) @ b.T
        return out * self.scale(adapter_name)

    def add_adapter_output(
        self,
        result: torch.Tensor,
        x: torch.Tensor,
        name: str,
        *,
        base_output: torch.Tensor | None = None,  # not needed: the adapter does not read it
    ) -> torch.Tensor:
        if not self.fuse_adapter_output:
            return super().add_adapter_output(result, x, name, base_output=base_output)
        a = self.lora_A[name]
        x = self.lora_dropout[name](x.to(a.dtype))
        h = x @ (a * self.lora_E[name]).T
        in_place = self.may_add_in_place(result)
        return add_scaled_product(result, h, self.lora_B[name], self.scale(name), in_place=in_place)

    def gathered_adapter_effect(
        self, x: Any, gathered: Gathered, base_output: torch.Tensor
    ) -> torch.Tensor | None:
        """Mixed batches: every row's ``s·B (E ⊙ A) x`` in two batched products."""
        return self._gathered(x, gathered, None)

    def add_gathered_adapter_effect(
        self, result: torch.Tensor, x: Any, gathered: Gathered
    ) -> torch.Tensor | None:
        if not result.is_contiguous() or result.dtype != self.lora_B[gathered.adapters[0]].dtype:
            return None
        return self._gathered(x, gathered, result)

    def _gathered(
        self, x: Any, gathered: Gathered, out: torch.Tensor | None
    ) -> torch.Tensor | None:
        names = gathered.adapters
        if any(self.dropout_active(n) for n in names) or not isinstance(x, torch.Tensor):
            return None
        a, b = stack_factors(
            [self.lora_A[n] * self.lora_E[n] for n in names],
            [self.lora_B[n] * self.scale(n) for n in names],
        )
        return gathered_low_rank(x, a, b, gathered.slots, out=out)

    def dropout_active(self, adapter_name: str) -> bool:
        dropout = self.lora_dropout[adapter_name]
        return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a = self.lora_A[adapter_name]
        e = self.lora_E[adapter_name]
        b = self.lora_B[adapter_name]
        delta: torch.Tensor = (b @ (a * e)) * self.scale(adapter_name)
        return delta

    def add_delta_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a = self.lora_A[adapter_name]
        b = self.lora_B[adapter_name]
        if not weight.dtype == a.dtype == b.dtype:
            return super().add_delta_weight(weight, adapter_name)
        a_e = a * self.lora_E[adapter_name]
        return torch.addmm(weight, b, a_e, alpha=self.scale(adapter_name))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for table in (self.r, self.ranknum, self.lora_alpha, self.scaling):
            table.pop(adapter_name, None)

    # -- budgeting ------------------------------------------------------------------------------
    def apply_mask(self, adapter_name: str, mask: list[bool]) -> None:
        """Zero the singular values of the ranks ``mask`` drops (kept ranks untouched)."""
        e = self.lora_E[adapter_name]
        if len(mask) != e.shape[0]:
            return
        drop = ~torch.tensor(mask, dtype=torch.bool, device=e.device).unsqueeze(-1)
        placements = getattr(e, "placements", None)
        if placements is not None:  # a DTensor (FSDP2): the mask is sharded like E
            from torch.distributed.tensor import distribute_tensor

            # every rank holds the same full mask; each keeps its own shard, no communication
            drop = distribute_tensor(drop, e.device_mesh, placements, src_data_rank=None)
        with torch.no_grad():
            e.masked_fill_(drop, 0.0)


class SVDLinear(AdaLoraLayer):
    """AdaLoRA on ``nn.Linear``, transformers ``Conv1D`` and quantised linears."""

    base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear, CONV1D_TRANSFORMERS)
    delta_weight_forward: ClassVar[bool] = True

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """Training on a plain ``nn.Linear`` base: base and adapter in one autograd node
        (:func:`~adapt.core.lowrank_linear.low_rank_linear` with ``E ⊙ A`` as the
        down factor; autograd carries its gradient on to A and E), the input gradient written
        once; None for inference and active dropout (the general path)."""
        if not torch.is_grad_enabled() or self.dropout_active(adapter_name):
            return None
        base = self.base_layer
        assert isinstance(base, nn.Linear)
        a = self.lora_A[adapter_name] * self.lora_E[adapter_name]
        return low_rank_linear(x, base, a, self.lora_B[adapter_name], self.scale(adapter_name))
