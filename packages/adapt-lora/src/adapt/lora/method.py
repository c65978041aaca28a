"""The LoRA method object, published under the ``adapt.methods`` entry point ``lora``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from adapt.core import AdapterConfig, CombineOptions, Method, TargetError, get_registry
from adapt.core.errors import warn_user
from adapt.core.protocols import ModelView
from adapt.core.targeting import QUERY_VALUE_TARGETS

from .combine import combine, combine_files
from .config import LoraConfig, weight_init
from .conversion import convert_for_initial
from .hotswap import checkpoint_tensors
from .layer_conv import LoraConv, grouped_conv_message
from .parameters import LoraParameter
from .tokens import TrainableTokensLayer, token_targets
from .variants import get_variant, variant_name
from .weight_init import initialise


class LoraMethod(Method[LoraConfig]):
    name: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"
    package: ClassVar[str] = "adapt-lora"
    config_class: ClassVar[type[AdapterConfig]] = LoraConfig
    default_target_modules: ClassVar[Mapping[str, Sequence[str]]] = QUERY_VALUE_TARGETS
    summary_keys: ClassVar[tuple[str, ...]] = ("r", "lora_alpha", "use_rslora", "use_dora")
    tensor_prefixes: ClassVar[tuple[str, ...]] = ("lora_",)
    parameter_layer: ClassVar[type[Any] | None] = LoraParameter
    _token_cache: tuple[LoraConfig, dict[str, tuple[list[int], str | None]]] | None = None

    def rank_of(self, tensors: Mapping[str, tuple[int, ...]]) -> int | None:
        """The rows of ``lora_A`` (``lora_embedding_A`` for an embedding)."""
        rank = None
        for name, shape in tensors.items():
            if name.split(".")[0] in ("lora_A", "lora_embedding_A") and shape:
                rank = shape[0]
        return rank

    def prepare(
        self,
        model: ModelView,
        config: LoraConfig,
        adapter_name: str,
        targets: dict[str, nn.Module],
    ) -> None:
        # the variant must be installed and its options right before any layer is created
        name = variant_name(config)
        if name is not None:
            get_variant(name).check_options(dict(config.variant_options))
        # refuse grouped convolutions up front, by path, before any layer is created
        for path, module in targets.items():
            if (
                isinstance(module, nn.modules.conv._ConvNd)
                and module.groups != 1
                and get_registry().resolve_layer(self.name, module) is LoraConv
            ):
                raise TargetError(grouped_conv_message(path, module))

    def extra_layers(
        self, model: ModelView, config: LoraConfig, adapter_name: str
    ) -> dict[str, type[Any]]:
        if config.trainable_token_indices is None:
            return {}
        return dict.fromkeys(self._tokens(model, config), TrainableTokensLayer)

    def _tokens(
        self, model: ModelView, config: LoraConfig
    ) -> dict[str, tuple[list[int], str | None]]:
        cached = self._token_cache
        if cached is None or cached[0] is not config:
            cached = (config, token_targets(model.model, config.trainable_token_indices))
            self._token_cache = cached
        return cached[1]

    def initialise(
        self,
        model: ModelView,
        config: LoraConfig,
        adapter_name: str,
        layers: Mapping[str, Any],
    ) -> None:
        if config.trainable_token_indices is not None:
            for path, (_, tied_to) in self._tokens(model, config).items():
                if tied_to is not None:
                    layers[path].tie_to(layers[tied_to], adapter_name)
        initialise(config, adapter_name, layers)

    def layers_may_be_absent(self, config: LoraConfig) -> bool:
        return config.init_lora_weights == "eva"  # EVA gives some layers rank 0

    def before_load(self, model: ModelView, config: LoraConfig, adapter_name: str) -> None:
        found = weight_init(config.init_lora_weights)
        if found is not None and found[0] == "pissa" and found[1] is not None:
            warn_user(
                f"adapter {adapter_name!r} was created with init_lora_weights="
                f"{config.init_lora_weights!r}: loading it re-ran the randomised SVD on this base, "
                "and its random draws differ from the ones the adapter was trained with unless "
                "the global seed was the same, so the residual base may not be the trained one "
                "(as in PEFT); save a plain LoRA with save_pretrained(..., "
                "path_initial_model_for_weight_conversion=...) or use init_lora_weights='pissa'"
            )

    def convert_for_initial(
        self,
        config: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        initial_config: dict[str, Any],
        initial: dict[str, torch.Tensor],
        source: str,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return convert_for_initial(config, tensors, initial_config, initial, source)

    def combine_adapters(
        self,
        model: ModelView,
        sources: Sequence[str],
        weights: Sequence[float],
        options: CombineOptions,
    ) -> tuple[AdapterConfig, Callable[[], dict[str, torch.Tensor]]]:
        configs = [self.config_of(model, name) for name in sources]
        return combine(model, configs, sources, weights, options)

    def checkpoint_state(
        self, model: ModelView, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Hot-swapped or padded adapters are written at their true ranks (see
        :mod:`.hotswap`); everything else as it is."""
        return checkpoint_tensors(model, adapter_name, tensors)

    def combine_checkpoints(
        self,
        configs: Sequence[AdapterConfig],
        tensors: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        options: CombineOptions,
    ) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
        lora = [c for c in configs if isinstance(c, LoraConfig)]
        assert len(lora) == len(configs)
        return combine_files(lora, tensors, weights, options)

    def layer_kwargs(
        self, model: ModelView, config: LoraConfig, adapter_name: str, path: str
    ) -> dict[str, Any]:
        if config.trainable_token_indices is not None:
            tokens = self._tokens(model, config).get(path)
            if tokens is not None:
                return {"token_indices": tokens[0], "tied": tokens[1] is not None}
        r, alpha = config.rank_and_alpha(path)
        return {"r": r, "lora_alpha": alpha}


METHOD = LoraMethod()
