"""The VeRA method object (``adapt.methods`` entry point ``vera``): owns the shared basis."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from adapt.core import (
    AdapterConfig,
    AdapterLayer,
    CheckpointError,
    ConfigError,
    Method,
    SharedBasis,
    get_registry,
)
from adapt.core.errors import warn_user
from adapt.core.method import CombineOptions
from adapt.core.protocols import ModelView
from adapt.core.targeting import QUERY_VALUE_TARGETS

from . import combine
from .config import VeraConfig

BASIS_NAME = "vera_basis"


def _dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, AdapterLayer):
        return module.in_features, module.out_features
    backend = get_registry().resolve_backend(module)
    if backend is None:  # the layer lookup reports this case with a better message
        return 0, 0
    return backend.shape(module)


def _device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


class VeraMethod(Method[VeraConfig]):
    name: ClassVar[str] = "vera"
    peft_type: ClassVar[str] = "VERA"
    package: ClassVar[str] = "adapt-vera"
    config_class: ClassVar[type[AdapterConfig]] = VeraConfig
    # as LoRA, but phi keeps to its attention (PEFT's VeRA default)
    default_target_modules: ClassVar[Mapping[str, Sequence[str]]] = {
        **QUERY_VALUE_TARGETS,
        "phi": ("q_proj", "v_proj"),
    }
    summary_keys: ClassVar[tuple[str, ...]] = ("r", "projection_prng_key", "save_projection")
    tensor_prefixes: ClassVar[tuple[str, ...]] = ("vera_",)

    def rank_of(self, tensors: Mapping[str, tuple[int, ...]]) -> int | None:
        """The length of ``vera_lambda_d`` (the basis has ``r`` rows, shared)."""
        shape = tensors.get("vera_lambda_d")
        return shape[0] if shape else None

    @staticmethod
    def basis(model: ModelView) -> SharedBasis | None:
        basis = model.adapter_set.shared(BASIS_NAME)
        return basis if isinstance(basis, SharedBasis) else None

    def prepare(
        self,
        model: ModelView,
        config: VeraConfig,
        adapter_name: str,
        targets: dict[str, nn.Module],
    ) -> None:
        for other, other_cfg in model.peft_config.items():
            key = getattr(other_cfg, "projection_prng_key", None)
            if key != config.projection_prng_key:
                raise ConfigError(
                    f"VeRA adapters on one model share one basis, so they need the same "
                    f"projection_prng_key: adapter {other!r} uses {key}, {adapter_name!r} uses "
                    f"{config.projection_prng_key}. Set projection_prng_key={key}"
                )
        dims = [_dims(m) for m in targets.values()]
        max_in = max(d[0] for d in dims)
        max_out = max(d[1] for d in dims)
        basis = self.basis(model)
        if basis is None:
            shape = (config.r, max_in, max_out)
            if config.basis_shape is not None:
                r_decl, in_decl, out_decl = config.basis_shape
                declared = (r_decl, in_decl, out_decl)
                if any(d < n for d, n in zip(declared, shape, strict=True)):
                    raise ConfigError(
                        f"VeraConfig.basis_shape {declared} is smaller than adapter "
                        f"{adapter_name!r} needs: (r, max_in, max_out) = {shape}; enlarge it"
                    )
                shape = declared
            basis = SharedBasis(*shape, config.projection_prng_key)
            basis.to(_device(next(iter(targets.values()))))
            model.adapter_set.set_shared(BASIS_NAME, basis)
        else:
            basis.require(config.r, max_in, max_out, what=f"VeRA adapter {adapter_name!r}")

    def layer_kwargs(
        self, model: ModelView, config: VeraConfig, adapter_name: str, path: str
    ) -> dict[str, Any]:
        return {"basis": self.basis(model)}

    def on_delete(self, model: ModelView, adapter_name: str) -> None:
        if not any(n != adapter_name for n in model.peft_config):
            model.adapter_set.drop_shared(BASIS_NAME)

    def natural_shape(self, model: ModelView, adapter_name: str) -> tuple[int, int, int]:
        """The basis PEFT would build for this adapter alone: (r, max in, max out) of its layers."""
        config = self.config_of(model, adapter_name)
        layers = [lay for _, lay in model.adapter_layers() if adapter_name in lay.adapter_names]
        return (
            config.r,
            max(lay.in_features for lay in layers),
            max(lay.out_features for lay in layers),
        )

    def extra_state(self, model: ModelView, adapter_name: str) -> dict[str, torch.Tensor]:
        config = self.config_of(model, adapter_name)
        basis = self.basis(model)
        assert basis is not None
        r, max_in, max_out = self.natural_shape(model, adapter_name)
        if config.save_projection:
            a, b = basis.slices(max_in, max_out, r)
            return {"vera_A": a, "vera_B": b}
        if basis.shape != (r, max_in, max_out):
            declared = config.basis_shape is not None and tuple(config.basis_shape) == basis.shape
            where = "PEFT" if declared else "adapt or PEFT"
            warn_user(
                f"VeRA adapter {adapter_name!r} is saved without its projection "
                f"(save_projection=False), but it uses a slice of a basis of shape {basis.shape} "
                f"rather than the basis {(r, max_in, max_out)} PEFT regenerates from its key; "
                f"loading it in {where} will give different outputs. Save with "
                "save_projection=True to share it"
            )
        return {}

    def load_extra_state(
        self, model: ModelView, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> list[str]:
        config = self.config_of(model, adapter_name)
        basis = self.basis(model)
        assert basis is not None
        r, max_in, max_out = self.natural_shape(model, adapter_name)
        has_a, has_b = "vera_A" in tensors, "vera_B" in tensors
        if has_a != has_b:
            raise CheckpointError(
                "the checkpoint holds only one of base_model.vera_A / base_model.vera_B; a saved "
                "projection needs both"
            )
        if not has_a:
            if config.save_projection:
                raise CheckpointError(
                    "the adapter's config says save_projection=true but the checkpoint holds no "
                    "base_model.vera_A / base_model.vera_B; the file is incomplete"
                )
            declared = config.basis_shape is not None and tuple(config.basis_shape) == basis.shape
            if basis.shape != (r, max_in, max_out) and not declared:
                raise CheckpointError(
                    f"this VeRA adapter was saved without its projection and needs the basis "
                    f"regenerated at (r, in, out) = {(r, max_in, max_out)}, but the model's shared "
                    f"basis is {basis.shape}; load it as the first adapter of a fresh model"
                )
            return []
        a, b = tensors["vera_A"], tensors["vera_B"]
        if tuple(a.shape) != (r, max_in) or tuple(b.shape) != (max_out, r):
            raise CheckpointError(
                f"saved projection has vera_A {tuple(a.shape)} and vera_B {tuple(b.shape)}, but "
                f"this adapter's layers need ({r}, {max_in}) and ({max_out}, {r}); the checkpoint "
                "was saved for another model or config"
            )
        if not (a.is_floating_point() and b.is_floating_point()) or not (
            torch.isfinite(a).all() and torch.isfinite(b).all()
        ):
            raise CheckpointError(
                "saved projection vera_A / vera_B must be finite floating-point tensors"
            )
        if len(model.peft_config) == 1 and basis.shape == (r, max_in, max_out):
            with torch.no_grad():
                basis.A.copy_(a.to(basis.A.dtype))
                basis.B.copy_(b.to(basis.B.dtype))
        else:
            cur_a, cur_b = basis.slices(max_in, max_out, r)
            if not (
                torch.equal(cur_a.cpu(), a.to(cur_a.dtype))
                and torch.equal(cur_b.cpu(), b.to(cur_b.dtype))
            ):
                raise CheckpointError(
                    "the saved projection differs from this model's shared VeRA basis (another "
                    "projection_prng_key or basis size); load the adapter into a fresh model"
                )
        return ["vera_A", "vera_B"]

    def combine_adapters(
        self,
        model: ModelView,
        sources: Sequence[str],
        weights: Sequence[float],
        options: CombineOptions,
    ) -> tuple[AdapterConfig, Callable[[], dict[str, torch.Tensor]]]:
        """The exact weighted sum of VeRA adapters (``combination_type="linear"``): see
        :mod:`adapt.vera.combine`."""
        configs = [self.config_of(model, name) for name in sources]
        return combine.combine_adapters(model, configs, sources, weights, options)

    def combine_checkpoints(
        self,
        configs: Sequence[AdapterConfig],
        tensors: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        options: CombineOptions,
    ) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
        """``adapt combine`` of saved VeRA adapters: see :mod:`adapt.vera.combine`."""
        checked = []
        for config in configs:
            if not isinstance(config, VeraConfig):
                raise ConfigError(
                    f"combine: the VeRA method combines VeraConfig adapters, got a "
                    f"{type(config).__name__}"
                )
            checked.append(config)
        return combine.combine_checkpoints(checked, tensors, weights, options)


METHOD = VeraMethod()
