"""``AdaptedModel``: a model with named adapters injected, and the ``adapt()`` entry point.

The wrapped model sits at ``adapted.base_model.model`` so that state-dict keys read
``base_model.model.<module path>...`` exactly as in HF PEFT. ``AdaptedModel`` is a façade: its
PEFT-named methods delegate to the modules that own each job — :mod:`~adapt.core.injection`
(adding and deleting), :mod:`~adapt.core.trainability` (activation, counts),
:mod:`~adapt.core.merging`, :mod:`~adapt.core.state_dict` and :mod:`~adapt.core.pretrained`
(folders and the Hub) — over the model's :class:`~adapt.core.adapters.AdapterSet`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import batches, combine, injection, merging, pretrained, state_dict, trainability
from .adapters import AdapterSet, ModelHost
from .config import AdapterConfig
from .deprecation import moved_names
from .errors import AdapterStateError
from .fixed_mixing import FixedMixing
from .foreign_hooks import ForeignHooks
from .layer import AdapterLayer
from .merge import MergeReport
from .method import CombineOptions, Method
from .modules_to_save import ModulesToSave
from .pretrained import load_config
from .routing import route_batch
from .signature import expose_forward_signature
from .wrapped import guard_direct_save

__all__ = ["AdaptedModel", "ModulesToSave", "adapt", "load_config"]


class AdaptedModel(ForeignHooks):
    """A model with adapters. Forward, ``generate`` and attribute access pass through to the
    wrapped model."""

    #: transformers' Trainer refuses "purely quantized" models unless adapters are attached;
    #: this is the flag it reads (transformers' own PEFT integration sets it the same way).
    _hf_peft_config_loaded = True
    _adapters: AdapterSet

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig,
        adapter_name: str = "default",
        *,
        is_trainable: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(model, AdaptedModel):
            raise AdapterStateError(
                "this model is already adapted; use model.add_adapter(name, config) to add "
                "another adapter"
            )
        self.base_model = ModelHost(model)
        self._adapters = AdapterSet(self.base_model, is_trainable=is_trainable)
        self._adapters.view = self
        self._fixed_mixing: FixedMixing | None = None
        self.add_adapter(adapter_name, config)
        expose_forward_signature(self, model.forward, AdaptedModel.forward)
        guard_direct_save(model)

    # -- pass-through and views ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules", "_adapters"):
                raise
            return getattr(self.base_model.model, name)

    @property
    def model(self) -> nn.Module:
        """The wrapped model (with adapter layers inside)."""
        inner: nn.Module = self.base_model.model
        return inner

    def get_base_model(self) -> nn.Module:
        return self.model

    @property
    def adapter_set(self) -> AdapterSet:
        """The owner of this model's adapter state (what method hooks keep state in)."""
        return self._adapters

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        """Adapter configs by name, as on PEFT's model."""
        return self._adapters.configs

    @property
    def active_adapters(self) -> list[str]:
        return self._adapters.active

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        self._adapters.active = list(names)

    @property
    def is_trainable(self) -> bool:
        return self._adapters.is_trainable

    @is_trainable.setter
    def is_trainable(self, value: bool) -> None:
        self._adapters.is_trainable = bool(value)

    @property
    def active_adapter(self) -> str | None:
        return self.active_adapters[0] if self.active_adapters else None

    @property
    def peft_type(self) -> str | None:
        """The method of the active adapter as PEFT names it (``"LORA"``), as on PEFT's model."""
        name = self.active_adapter
        return self.peft_config[name].peft_type if name in self.peft_config else None

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """``(path, layer)`` for every adapter layer; paths relative to the wrapped model."""
        return self._adapters.layers()

    def method_of(self, adapter_name: str) -> Method[Any]:
        """The method object of ``adapter_name`` (resolved once, then cached per adapter)."""
        return self._adapters.method_of(adapter_name)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        mixing = self._fixed_mixing
        if adapter_names is None:
            output = self.model(*args, **kwargs)
        elif mixing is not None:
            batches.enter_fixed(self._adapters, mixing, adapter_names)
            try:
                output = self.model(*args, **kwargs)
            finally:
                batches.exit_fixed(mixing)
        else:
            output = batches.call_mixed(self._adapters, self.model, adapter_names, args, kwargs)
        output = self._adapters.postprocess(output)
        return output

    def prepare_mixed_batches_for_compile(self) -> None:
        """Serve mixed batches (``adapter_names=``) with fixed shapes, so a compiled model runs
        a new mix of adapters without recompiling (the mix becomes index tensors filled in
        place). Fixes the adapters a batch may name to those the model has now: call it again
        after adding or deleting adapters (and before compiling, or expect one recompile).
        Every row then computes through every layer's gathered path (``__base__`` rows get
        exact zeros added); eval mode (no active dropout) is required."""
        self._fixed_mixing = batches.prepare_fixed(self._adapters)

    def generate(
        self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> Any:
        inner: Any = self.model
        generate = inner.generate
        if adapter_names is None:
            return generate(*args, **kwargs)
        mixing = self._fixed_mixing
        if mixing is not None:  # prepared: every step through the fixed-shape path
            batches.enter_fixed(self._adapters, mixing, adapter_names)
            try:
                return generate(*args, **kwargs)
            finally:
                batches.exit_fixed(mixing)
        batches.check_batch_names(self._adapters, adapter_names)
        with route_batch(list(adapter_names)):
            return generate(*args, **kwargs)

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA's rank-allocation step for the trainable adapter: call it after
        ``loss.backward()`` and ``optimizer.step()``, before ``zero_grad()``, every step."""
        trainability.update_and_allocate(self._adapters, global_step)

    # -- adding, selecting, deleting ----------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Inject a new adapter. On any error the model is left exactly as it was."""
        injection.add_adapter(self._adapters, adapter_name, config)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make ``adapter_name`` (or several) active; only active adapters train."""
        trainability.set_active(self._adapters, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; layers left with no adapter go back to their base module."""
        injection.delete_adapter(self._adapters, adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: every adapter (and modules_to_save copy) is bypassed inside."""
        with trainability.all_disabled(self._adapters):
            yield

    def disable_adapter_layers(self) -> None:
        """Bypass every adapter (and modules_to_save copy) until :meth:`enable_adapter_layers`;
        PEFT's call of the same name. :meth:`disable_adapter` is the scoped form."""
        trainability.set_disabled(self._adapters, True)

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`: the active adapters apply again."""
        trainability.set_disabled(self._adapters, False)

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        """Add ``adapter_name``, the combination of ``adapters`` weighted by ``weights`` (PEFT's
        call and combination types; the method defines the math). ``generator`` drives DARE's
        random masks (default: the global RNG, as PEFT). The new adapter is ordinary (not made
        active); on any error the model is left as it was."""
        options = CombineOptions(
            combination_type, svd_rank, svd_clamp, svd_full_matrices, svd_driver, density,
            majority_sign_method, generator,
        )  # fmt: skip
        combine.add_weighted_adapter(self._adapters, adapters, weights, adapter_name, options)

    # -- parameters ---------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """PEFT's name for :meth:`trainable_parameters`."""
        return self.trainable_parameters()

    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (quantised weights counted unpacked)."""
        return trainability.parameter_counts(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}")

    # -- merging ------------------------------------------------------------------------------
    def merge_adapter(
        self,
        adapter_names: Sequence[str] | None = None,
        safe_merge: bool = False,
        *,
        progress_bar: bool | None = None,
    ) -> MergeReport:
        """Fold adapters (default: the active ones) into the base weights. With ``safe_merge``
        every merged weight is checked for NaN/Inf before any layer changes. Returns the worst
        error the writes introduced (non-zero only for quantised base layers)."""
        return merging.merge_adapters(
            self._adapters, adapter_names, safe_merge=safe_merge, progress_bar=progress_bar
        )

    def unmerge_adapter(self) -> None:
        merging.unmerge_all(self._adapters)

    def merge_and_unload(
        self,
        progressbar: bool | None = None,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        *,
        progress_bar: bool | None = None,
    ) -> nn.Module:
        """Merge the adapters and return the base model with plain modules again. PEFT's
        arguments in PEFT's order (``merge_and_unload(True)`` shows the progress bar);
        ``progress_bar`` is :meth:`merge_adapter`'s spelling; without either the bar shows
        when stderr is a terminal."""
        show = merging.progress_flag(progressbar, progress_bar)
        self.merge_adapter(adapter_names, safe_merge=safe_merge, progress_bar=show)
        return merging.unload(self._adapters, keep_modules_to_save=True)

    def unload(self) -> nn.Module:
        """Return the base model without any adapter (merged adapters are taken out first)."""
        self.unmerge_adapter()
        return merging.unload(self._adapters, keep_modules_to_save=False)

    # -- checkpoints --------------------------------------------------------------------------
    def adapter_state_dict(
        self, adapter_name: str, *, include_shared: bool = True
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's on-disk keys (adapter name removed).
        ``include_shared`` adds state a method keeps outside the layers (VeRA's projection)."""
        return state_dict.adapter_state_dict(
            self._adapters, adapter_name, include_shared=include_shared
        )

    def load_adapter_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default"
    ) -> None:
        """PEFT's ``set_peft_model_state_dict``: copy tensors under PEFT's keys into the existing
        adapter ``adapter_name``. Every tensor is checked first (names, shapes, dtypes, finite
        values) and all must be there; on any error the adapter is left as it was."""
        _state_dict_module.load_state_dict_into(self._adapters, state_dict, adapter_name)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter in PEFT's format: ``default`` in ``save_directory``, any other in
        ``save_directory/<name>/``; files are replaced atomically. In distributed training call
        it on every rank with ``is_main_process=(rank == 0)``: only the main process writes,
        every rank takes part in gathering sharded tensors (FSDP, DeepSpeed ZeRO-3).
        ``state_dict=`` (as in PEFT) takes a gathered state dict of the whole model, or of the
        adapter under PEFT's keys."""
        pretrained.save_pretrained(self._adapters, save_directory, selected_adapters, kwargs)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        *,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> AdaptedModel:
        """Load a saved adapter (adapt's or PEFT's) onto ``model``; on any error ``model`` is
        left as it was. The method is read from ``adapter_config.json`` and resolved through
        entry points. ``allow_pickle=True`` accepts an old ``adapter_model.bin`` (read with
        ``torch.load(weights_only=True)``; trusted files only). ``model_id`` is a local folder
        or a Hugging Face Hub repo id; ``subfolder``, ``revision``, ``cache_dir``, ``token``,
        ``local_files_only`` and ``force_download`` go to the download as in PEFT."""

        def build(config: AdapterConfig) -> AdaptedModel:
            return cls(model, config, adapter_name, is_trainable=is_trainable)

        return pretrained.load_new_model(
            build, model, model_id, adapter_name, config,
            is_trainable=is_trainable, allow_pickle=allow_pickle, hub=kwargs,
        )  # fmt: skip

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        *,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load a saved adapter next to the existing ones (not made active). ``model_id`` and
        the Hub arguments are as for :meth:`from_pretrained`."""
        pretrained.load_next_to(
            self._adapters, self.add_adapter, self.delete_adapter, model_id, adapter_name, config,
            is_trainable=is_trainable, allow_pickle=allow_pickle, hub=kwargs,
        )  # fmt: skip


_state_dict_module = state_dict


def adapt(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdaptedModel:
    """Inject ``config``'s adapter into ``model`` and return the trainable ``AdaptedModel``."""
    # getattr: a non-config is refused by add_adapter with a clear ConfigError
    is_trainable = not getattr(config, "inference_mode", False)
    return AdaptedModel(model, config, adapter_name, is_trainable=is_trainable)


__getattr__ = moved_names(__name__, {"find_targets_hint": "adapt.core.targeting:names_hint"})
