"""The method object a method package publishes under the ``adapt.methods`` entry point.

``Method`` is generic over its config class: ``class VeraMethod(Method[VeraConfig])`` gets its
hooks called with a ``VeraConfig`` (core checks the type once, in :meth:`Method.config_of`),
and with the model as a :class:`~adapt.core.protocols.ModelView`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar, cast

import torch
from torch import nn

from .config import AdapterConfig
from .errors import AdapterStateError, ConfigError
from .protocols import ModelView

ConfigT = TypeVar("ConfigT", bound=AdapterConfig)


@dataclasses.dataclass(frozen=True)
class CombineOptions:
    """The options of ``add_weighted_adapter`` beyond the adapters and their weights, checked
    for their types and ranges here; which ``combination_type`` values exist, and which options
    each uses, is the method's business (:meth:`Method.combine_adapters`)."""

    combination_type: str = "svd"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    density: float | None = None
    majority_sign_method: str = "total"
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        where = "add_weighted_adapter"
        if not isinstance(self.combination_type, str):
            raise ConfigError(f"{where}: combination_type must be a string, e.g. 'svd'")
        rank = self.svd_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"{where}: svd_rank must be a positive integer or None, got {rank!r}")
        for field in ("svd_clamp", "density"):
            value = getattr(self, field)
            if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and 0 <= value <= 1
            ):  # fmt: skip
                raise ConfigError(
                    f"{where}: {field} must be a number in [0, 1] or None, got {value!r}"
                )
        if not isinstance(self.svd_full_matrices, bool):
            raise ConfigError(f"{where}: svd_full_matrices must be true or false")
        if self.svd_driver is not None and not isinstance(self.svd_driver, str):
            raise ConfigError(f"{where}: svd_driver must be None or a torch.linalg.svd driver name")
        if self.majority_sign_method not in ("total", "frequency"):
            raise ConfigError(
                f"{where}: majority_sign_method must be 'total' or 'frequency', "
                f"got {self.majority_sign_method!r}"
            )
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ConfigError(f"{where}: generator must be a torch.Generator or None")


class Method(Generic[ConfigT]):
    """What core needs to know about a method beyond its layers.

    Subclass it, set the class attributes and override the hooks a method needs; the defaults
    fit methods whose adapters live entirely inside their layers (LoRA).
    """

    #: Entry-point name and registry key (``"lora"``).
    name: ClassVar[str] = ""
    #: PEFT's ``peft_type`` (``"LORA"``).
    peft_type: ClassVar[str] = ""
    #: The distribution that provides the method, for messages.
    package: ClassVar[str] = ""
    #: The method's config class.
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: Target modules used when a config names none, by transformers ``model_type``
    #: (PEFT's defaults; see :data:`adapt.core.targeting.QUERY_VALUE_TARGETS`).
    default_target_modules: ClassVar[Mapping[str, Sequence[str]]] = {}
    #: The keys of a saved ``adapter_config.json`` that ``adapt inspect`` prints after the
    #: targets, in this order (a key the file lacks is left out).
    summary_keys: ClassVar[tuple[str, ...]] = ("r",)
    #: How the adapter's part of a checkpoint key begins: ``adapt inspect`` cuts each key at
    #: its first segment that starts with one of these (LoRA: ``("lora_",)`` cuts
    #: ``model.q_proj.lora_A.weight`` into the module ``model.q_proj`` and its tensor
    #: ``lora_A.weight``). Empty: the generic rule, ``<peft_type in lower case>_``.
    tensor_prefixes: ClassVar[tuple[str, ...]] = ()
    #: The layer class for ``target_parameters`` (a subclass of
    #: :class:`~adapt.core.parameter_layer.ParameterLayer`), or None: the method adapts
    #: modules only and a config naming parameters is refused.
    parameter_layer: ClassVar[type[Any] | None] = None

    def config_of(self, model: ModelView, adapter_name: str) -> ConfigT:
        """``adapter_name``'s config, checked to be this method's config class."""
        config = model.peft_config[adapter_name]
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"adapter {adapter_name!r} has a {type(config).__name__}, but the {self.name} "
                f"method needs a {self.config_class.__name__}"
            )
        return cast(ConfigT, config)

    def resolve_config(self, model: ModelView, config: ConfigT) -> ConfigT:
        """The config with the method's defaults for this model filled in (IA³: its
        feed-forward modules by ``model_type``), as a copy (``dataclasses.replace``); called
        once ``target_modules`` is resolved, before anything changes. What it fills is written
        back into the user's config when the adapter is added (and so saved). Default: as is."""
        return config

    def layer_kwargs(
        self, model: ModelView, config: ConfigT, adapter_name: str, path: str
    ) -> dict[str, Any]:
        """Extra keyword arguments for ``update_layer`` of the layer at ``path``."""
        return {}

    def prepare(
        self,
        model: ModelView,
        config: ConfigT,
        adapter_name: str,
        targets: dict[str, nn.Module],
    ) -> None:
        """Called before layers get the adapter (e.g. to build a shared basis). Must raise
        before changing anything if the adapter cannot be added."""

    def extra_layers(
        self, model: ModelView, config: ConfigT, adapter_name: str
    ) -> dict[str, type[Any]]:
        """Layers the adapter adds beyond its target modules, by module path (relative to the
        wrapped model) → the layer class to build there (an existing layer of that class gets
        the adapter through ``update_layer``); e.g. LoRA's ``trainable_token_indices``. Must
        raise before anything changes if they cannot be added. Default: none."""
        return {}

    def initialise(
        self,
        model: ModelView,
        config: ConfigT,
        adapter_name: str,
        layers: Mapping[str, Any],
    ) -> None:
        """Called once the adapter's layers exist (``layers``: module path → layer, new and
        existing) and before they go into the model, for initialisations that read or rewrite
        the base weights (LoRA's PiSSA, OLoRA, LoftQ). If it raises, the base weights must be as
        they were (the rest of the add is rolled back by core)."""

    def convert_for_initial(
        self,
        config: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        initial_config: dict[str, Any],
        initial: dict[str, torch.Tensor],
        source: str,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``save_pretrained(..., path_initial_model_for_weight_conversion=source)``: the config
        and tensors (on-disk keys) to write instead of ``config`` / ``tensors``, given the
        adapter saved at ``source`` before training (LoRA: PiSSA / OLoRA → a plain LoRA of twice
        the rank for the original base). Default: refused."""
        raise ConfigError(
            f"path_initial_model_for_weight_conversion converts adapters whose initialisation "
            f"rewrote the base weights (LoRA's PiSSA, OLoRA); {self.name} adapters have no such "
            "conversion: drop the argument"
        )

    def mark_trainable(self, model: ModelView, config: ConfigT, adapter_name: str) -> None:
        """Called after trainability is set; a method can mark more parameters trainable."""

    def extra_state(self, model: ModelView, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors saved outside the layers, keyed relative to ``base_model.`` (e.g. ``vera_A``)."""
        return {}

    def load_extra_state(
        self, model: ModelView, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> list[str]:
        """Take the tensors :meth:`extra_state` wrote; return the keys consumed."""
        return []

    def before_load(self, model: ModelView, config: ConfigT, adapter_name: str) -> None:
        """Called by ``from_pretrained`` / ``load_adapter`` once the adapter has been added from
        its config and before the saved tensors are read into it, e.g. to give layers the shapes
        a checkpoint was saved with (AdaLoRA's ``rank_pattern``). A failure rolls the load back."""

    def layers_may_be_absent(self, config: ConfigT) -> bool:
        """Whether a checkpoint of ``config`` may lack the tensors of some targeted layers,
        which then drop the adapter on load instead of the load being refused (LoRA's EVA:
        layers given rank 0 are gone, and PEFT's shortened ``target_modules`` may still match
        them). Default: no."""
        return False

    def on_delete(self, model: ModelView, adapter_name: str) -> None:
        """Called when an adapter is removed (or a failed add is rolled back)."""

    def checkpoint_state(
        self, model: ModelView, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The tensors to write for ``adapter_name``, given its live state dict (on-disk keys).
        AdaLoRA writes only the ranks its budget kept."""
        return tensors

    def postprocess_output(self, model: ModelView, adapter_name: str, output: Any) -> Any:
        """Called with the wrapped model's output for each active adapter of this method
        (AdaLoRA adds its orthogonal regulariser to ``output.loss``)."""
        return output

    def rank_of(self, tensors: Mapping[str, tuple[int, ...]]) -> int | None:
        """The rank of one module's adapter, from its saved tensors' shapes (tensor name as
        :attr:`tensor_prefixes` cuts it, e.g. ``lora_A.weight`` → ``(8, 64)``), for the rank
        column of ``adapt inspect``; None (the default) leaves it blank."""
        return None

    def combine_adapters(
        self,
        model: ModelView,
        sources: Sequence[str],
        weights: Sequence[float],
        options: CombineOptions,
    ) -> tuple[AdapterConfig, Callable[[], dict[str, torch.Tensor]]]:
        """``add_weighted_adapter``: the config of the adapter that combines ``sources`` (all of
        this method, weighted by ``weights``), and a function that computes its tensors, keyed
        as on disk relative to the wrapped model (``model.layers.0.q_proj.lora_A.weight``).
        Everything that can be refused must be refused here, before anything changes; core then
        adds the adapter from the config, calls the function and loads the tensors (all of the
        new adapter's must be there), and takes the adapter out again on any error. Default:
        refused."""
        raise ConfigError(
            f"add_weighted_adapter: the {self.name} method ({self.package}) does not support "
            f"combining adapters; combine adapters of a method that does (LoRA)"
        )

    def combine_checkpoints(
        self,
        configs: Sequence[AdapterConfig],
        tensors: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        options: CombineOptions,
    ) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
        """``adapt combine`` (:func:`adapt.core.combine_saved_adapters`): the combination of
        saved adapters of this method, from their configs and tensors alone (no base model),
        keyed as on disk (``base_model.model.<module>.<tensor>``); the result must be what
        :meth:`combine_adapters` gives in a model holding those adapters, saved. Core has
        checked that the adapters are of this method, of one base model and (unless asked
        otherwise) adapt the same modules; shapes and everything else are the method's to
        check; messages name the adapters ``#1``, ``#2``, … in order (core appends which
        folder is which). Default: refused."""
        raise ConfigError(
            f"adapt combine: the {self.name} method ({self.package}) cannot combine saved "
            "adapters without the base model; load them into the model and call "
            "add_weighted_adapter there, if the method supports it"
        )

    def update_and_allocate(self, model: ModelView, global_step: int) -> None:
        raise AdapterStateError(
            f"update_and_allocate is for AdaLoRA adapters; the active adapter uses {self.name!r}"
        )
