"""LoRA variants: a change to what one LoRA adapter computes, on every LoRA layer type.

A variant (DoRA is one) is an object subclassing :class:`LoraVariant`, published under the
entry-point group ``adapt.lora_variants`` (:data:`VARIANT_GROUP`) and chosen per adapter by the
config: ``LoraConfig(use_dora=True)`` is the variant ``"dora"``, ``LoraConfig(variant="name",
variant_options={...})`` any other. The layer keeps the plain LoRA factors (``lora_A``,
``lora_B``, scaling, dropout) and asks the variant for everything that differs:

* :attr:`LoraVariant.tensor_names`: per-adapter tensors it adds to the layer (each a
  ``ParameterDict`` on the layer; the name is the checkpoint key, e.g.
  ``...q_proj.lora_magnitude_vector``) and :meth:`LoraVariant.init` to create them;
* :meth:`LoraVariant.adapter_effect`: the adapter's contribution to the output, given the base
  output (mixed batches call it with each adapter's rows);
* :meth:`LoraVariant.delta_weight` (a variant whose merged weight is ``W + ΔW``), or
  :meth:`LoraVariant.merge_weight` / :meth:`LoraVariant.unmerge_weight` /
  :meth:`LoraVariant.merged_form` when the merge depends on ``W`` (DoRA);
* optionally :meth:`LoraVariant.fused_forward` (a fast path on plain ``nn.Linear`` bases) and
  :meth:`LoraVariant.check_options` (``variant_options`` validation).

The layer's own building blocks a variant uses are public on :class:`~adapt.lora.LoraLayer`:
``adapter_output`` (plain LoRA's contribution, dropout included), ``lora_output``
(``s·B(A(x))``, no dropout), ``dropout_active``, ``variant_tensors``, ``per_output``,
``per_weight``, ``original_weight`` and ``base_without_bias``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from adapt.core import ConfigError, PluginError, get_registry
from adapt.core.plugins import PluginGroup
from adapt.core.typenames import describe

if TYPE_CHECKING:
    from .config import LoraConfig
    from .layer import LoraLayer

#: The entry-point group LoRA variants are published under (owned by adapt-lora).
VARIANT_GROUP = "adapt.lora_variants"

#: LoRA's own container names: a variant's tensors must not reuse them.
_RESERVED = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout")


class LoraVariant:
    """Base of LoRA variants. Subclass it, set :attr:`name`, and override what differs from
    plain LoRA; one instance serves every layer (per-adapter state lives on the layer)."""

    #: The name configs use (``variant="gated"``; DoRA is ``"dora"``).
    name: ClassVar[str] = ""
    #: Per-adapter tensors this variant adds to each layer, as layer attributes (a
    #: ``ParameterDict`` keyed by adapter name each); they train and are saved with the adapter.
    tensor_names: ClassVar[tuple[str, ...]] = ()
    #: ``LoraConfig`` field that turns this variant on, when PEFT has one (DoRA: ``use_dora``).
    config_flag: ClassVar[str | None] = None

    def check_options(self, options: dict[str, Any]) -> None:
        """Validate ``LoraConfig.variant_options`` (default: none are accepted)."""
        if options:
            raise ConfigError(
                f"LoRA variant {self.name!r} takes no variant_options, got {sorted(options)}"
            )

    def supports(self, layer: LoraLayer) -> str | None:
        """Why this variant cannot run on ``layer`` (refused when the adapter is added), or
        None. Default: every layer that implements ``lora_output``."""
        from .layer_variants import VariantHost

        if type(layer).lora_output is VariantHost.lora_output:
            return (
                f"{type(layer).__name__} does not implement lora_output(x, adapter_name), which "
                f"the LoRA variant {self.name!r} builds on"
            )
        return None

    def init(self, layer: LoraLayer, adapter_name: str, config: LoraConfig) -> None:
        """Create this variant's tensors for ``adapter_name`` (after A and B are initialised)."""

    def adapter_effect(
        self, layer: LoraLayer, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor
    ) -> torch.Tensor:
        """The adapter's contribution to the output for input ``x``, given the base layer's
        output for the same rows (never modify it in place). Default: plain LoRA
        (``layer.adapter_output``: dropout where the layer type has it, then ``s·B(A(x))``)."""
        return layer.adapter_output(x, adapter_name)

    def fused_forward(
        self, layer: LoraLayer, x: torch.Tensor, adapter_name: str
    ) -> torch.Tensor | None:
        """Base output plus this adapter's, computed together on a plain ``nn.Linear`` base
        with this adapter alone active; None takes the general path (the default)."""
        return None

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """ΔW in the layer's canonical layout, for variants whose merge is ``W + ΔW``."""
        return layer.delta_weight(adapter_name)

    def merged_form(
        self, layer: LoraLayer, adapter_name: str
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """What merging did to the weight, as ``(row_scale, delta)``: ``W ← W·row_scale + delta``
        relative to the original weight (``row_scale`` per output feature, None for 1). Used
        to recover the original weight while adapters are merged. Default: ``(None, ΔW)``."""
        return None, self.delta_weight(layer, adapter_name)

    def merge_weight(
        self, layer: LoraLayer, weight: torch.Tensor, adapter_name: str
    ) -> torch.Tensor:
        """``weight`` (a ≥float32 working copy, canonical layout) with the adapter merged.
        Default: ``weight + ΔW``."""
        weight += self.delta_weight(layer, adapter_name).detach().to(weight.dtype)
        return weight

    def unmerge_weight(
        self, layer: LoraLayer, weight: torch.Tensor, adapter_name: str
    ) -> torch.Tensor:
        """The inverse of :meth:`merge_weight`. Default: ``weight − ΔW``."""
        weight -= self.delta_weight(layer, adapter_name).detach().to(weight.dtype)
        return weight

    def delete(self, layer: LoraLayer, adapter_name: str) -> None:
        """Forget per-adapter state kept outside :attr:`tensor_names` (default: nothing)."""


def variant_contract(obj: Any) -> LoraVariant:
    """What a plugin of :data:`VARIANT_GROUP` must be: a :class:`LoraVariant` (instance or
    subclass) with a name and well-formed tensor names."""
    if isinstance(obj, type) and issubclass(obj, LoraVariant):
        obj = obj()
    if not isinstance(obj, LoraVariant):
        raise ValueError(
            f"{describe(obj)} is not an adapt.lora.LoraVariant (a LoRA variant plugin names a "
            "LoraVariant subclass or instance)"
        )
    if not isinstance(obj.name, str) or not obj.name:
        raise ValueError(f"{describe(obj)}.name is empty; set the name configs use")
    names = obj.tensor_names
    if not isinstance(names, tuple) or not all(
        isinstance(n, str) and n.isidentifier() for n in names
    ):
        raise ValueError(
            f"{describe(obj)}.tensor_names must be a tuple of attribute names, got {names!r}"
        )
    clash = [n for n in names if n in _RESERVED]
    if clash:
        raise ValueError(f"{describe(obj)}.tensor_names reuses LoRA's own {clash}")
    return obj


#: Declares :data:`VARIANT_GROUP` to core's plugin store (entry point in ``adapt.plugin_groups``).
PLUGIN_GROUP = PluginGroup(VARIANT_GROUP, contract=variant_contract)


def register_variant(variant: LoraVariant | type[LoraVariant], *, name: str | None = None) -> None:
    """Register a variant in this process (notebooks, tests); installed ones come from entry
    points."""
    obj = variant_contract(variant)
    get_registry().register(VARIANT_GROUP, name or obj.name, obj)


def unregister_variant(name: str) -> None:
    get_registry().unregister(VARIANT_GROUP, name)


def _builtin(name: str) -> LoraVariant | None:
    # adapt-lora's own variants, also when its entry points are not readable (an isolated
    # registry in tests, a source checkout on sys.path)
    if name == "dora":
        from .dora import DoraVariant

        return DoraVariant()
    return None


def get_variant(name: str) -> LoraVariant:
    """The installed LoRA variant ``name``; a clear error when it is missing or broken."""
    registry = get_registry()
    entry = registry.entry_named(VARIANT_GROUP, name)
    if entry is not None and entry.obj is not None:
        return entry.obj  # type: ignore[no-any-return]
    builtin = _builtin(name)
    if builtin is not None:
        return builtin
    if entry is not None:
        raise PluginError(
            f"the LoRA variant {entry.label()} is installed but cannot be used: {entry.status}"
        )
    available = sorted({e.name for e in registry.entries(VARIANT_GROUP) if not e.broken} | {"dora"})
    raise PluginError(
        f"no LoRA variant named {name!r} is installed (variants are entry points in the group "
        f"{VARIANT_GROUP!r}); available: {', '.join(available)}. Install the package that "
        f"provides it{registry.broken_note(VARIANT_GROUP)}"
    )


def variant_name(config: LoraConfig) -> str | None:
    """The variant ``config`` asks for: ``"dora"`` for ``use_dora=True``, else ``variant``."""
    return "dora" if config.use_dora else config.variant


def installed_variants() -> list[str]:
    """Names of the installed variants (for ``adapt inspect`` and messages)."""
    return sorted(e.name for e in get_registry().entries(VARIANT_GROUP) if not e.broken)
