"""How an adapter layer merges into its base weight, and back: the part of
:class:`~adapt.core.layer.AdapterLayer` that writes through the weight backend.

A method says *what* merging an adapter means with four hooks, each given the tensor so far and
returning the next one (in at least float32, canonical layout):

* :meth:`LayerMerging.merge_weight` / :meth:`LayerMerging.unmerge_weight`: ``W ← W + ΔW`` and
  ``W ← W − ΔW`` by default (from ``delta_weight``); a method whose update depends on ``W``
  (IA³: ``W ← W · diag(l)``) overrides them;
* :meth:`LayerMerging.merge_bias` / :meth:`LayerMerging.unmerge_bias`: the base bias unchanged
  by default; a method that changes the bias too (IA³ on outputs: ``b ← b · l``) overrides them.

Core does the rest, once, for every method: it computes the new tensors for all the adapters
being merged before writing anything, refuses a result that is not finite (``safe_merge``, and
always on unmerge, where a division by a near-zero factor cannot restore the weight), writes
the weight through the backend (whose :class:`~adapt.core.merge.MergeReport` says what storing
it cost), warns that unmerging a quantised weight is lossy, and keeps ``merged_adapters``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn

from .errors import AdapterStateError, warn_user
from .merge import MergeReport, accumulation_dtype, fits_dtype, unsafe_merge_error
from .typenames import describe


def _working_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(accumulation_dtype(tensor.dtype), copy=True)


class LayerMerging:
    """Merging for :class:`~adapt.core.layer.AdapterLayer` (a mixin; the layer provides the
    attributes declared here)."""

    backend: Any
    base_layer: nn.Module
    merged_adapters: list[str]
    active_adapters: list[str]

    # attributes of the layer this mixin relies on
    @property
    def adapter_names(self) -> list[str]:  # pragma: no cover - provided by AdapterLayer
        raise NotImplementedError

    def get_base_layer(self) -> nn.Module:  # pragma: no cover - provided by AdapterLayer
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # -- the hooks ------------------------------------------------------------------------------
    def on_unload(self) -> None:
        """Called when ``unload`` / ``merge_and_unload`` takes the layer out of the model:
        undo what unmerged adapters did to the base weight beyond merging (LoRA's PiSSA puts
        the principal part back). Default: nothing."""

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The base weight after merging ``adapter_name`` into ``weight`` (canonical layout, at
        least float32, a copy this call may change in place). Default: ``weight + ΔW``."""
        weight += self.delta_weight(adapter_name).detach().to(weight.dtype)
        return weight

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The inverse of :meth:`merge_weight`. Default: ``weight − ΔW``. Raise
        :class:`~adapt.core.AdapterStateError` when the inverse cannot be computed."""
        weight -= self.delta_weight(adapter_name).detach().to(weight.dtype)
        return weight

    def merge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The base bias after merging ``adapter_name`` (same conventions). Default: unchanged,
        and then core never writes the bias."""
        return bias

    def unmerge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The inverse of :meth:`merge_bias`. Default: unchanged."""
        return bias

    # -- core's side --------------------------------------------------------------------------
    def _check_names(self, names: Iterable[str]) -> list[str]:
        out = []
        for name in names:
            if name not in self.adapter_names:
                raise AdapterStateError(
                    f"{describe(self)} has no adapter {name!r}; it has {self.adapter_names}"
                )
            out.append(name)
        return out

    def _bias(self) -> torch.Tensor:
        return cast(torch.Tensor, self.get_base_layer().bias)

    def changes_bias(self) -> bool:
        """Whether merging may change the base bias: by default when the class overrides
        :meth:`merge_bias` / :meth:`unmerge_bias`; a method whose bias hooks act for some
        adapters only (LoRA's ``lora_bias``) narrows it to when they do."""
        cls = type(self)
        return (
            cls.merge_bias is not LayerMerging.merge_bias
            or cls.unmerge_bias is not LayerMerging.unmerge_bias
        )

    def _changes_bias(self) -> bool:
        return self.changes_bias() and getattr(self.get_base_layer(), "bias", None) is not None

    def merged_weight(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """The base weight with ``adapter_names`` merged, without writing it (in at least
        float32: a float16/bfloat16 weight is rounded once, when it is written)."""
        weight = _working_copy(self.backend.get_weight(self.base_layer))
        for name in adapter_names:
            weight = self.merge_weight(weight, name)
        return weight

    def merged_bias(self, adapter_names: Sequence[str]) -> torch.Tensor | None:
        """The base bias with ``adapter_names`` merged, or None when merging leaves it alone."""
        if not self._changes_bias():
            return None
        bias = _working_copy(self._bias())
        for name in adapter_names:
            bias = self.merge_bias(bias, name)
        return bias

    def merge_is_safe(self, adapter_names: Sequence[str]) -> bool:
        """Whether merging ``adapter_names`` gives finite tensors that fit their dtypes."""
        return self._fits(self.merged_weight(adapter_names), self.merged_bias(adapter_names))

    def _fits(self, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        if not fits_dtype(weight, self.backend.get_weight(self.base_layer).dtype):
            return False
        return bias is None or fits_dtype(bias, self._bias().dtype)

    def _write(self, weight: torch.Tensor, bias: torch.Tensor | None) -> MergeReport:
        report: MergeReport = self.backend.set_weight(self.base_layer, weight)
        if bias is not None:
            target = self._bias()
            with torch.no_grad():
                target.copy_(bias.to(target.dtype))
        return report

    def merge(
        self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False
    ) -> MergeReport | None:
        """Fold adapters into the base weight (:meth:`merge_weight`, :meth:`merge_bias`).

        ``safe_merge`` computes the result first and refuses it (layer unchanged) when it holds
        NaN or Inf.
        """
        names = self._check_names(
            adapter_names if adapter_names is not None else self.active_adapters
        )
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return None
        weight = self.merged_weight(names)
        bias = self.merged_bias(names)
        if safe_merge and not self._fits(weight, bias):
            raise unsafe_merge_error(
                names, describe(self.get_base_layer()), "the layer was left unchanged"
            )
        report = self._write(weight, bias)
        self.merged_adapters.extend(names)
        return report

    def unmerged_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias (None: unchanged) with every merged adapter taken out, last
        merged first, without writing them; raises :class:`~adapt.core.AdapterStateError`
        when they cannot be computed or are not finite."""
        names = list(reversed(self.merged_adapters))
        weight = _working_copy(self.backend.get_weight(self.base_layer))
        for name in names:
            weight = self.unmerge_weight(weight, name)
        bias = None
        if self._changes_bias():
            bias = _working_copy(self._bias())
            for name in names:
                bias = self.unmerge_bias(bias, name)
        if not torch.isfinite(weight).all() or (
            bias is not None and not torch.isfinite(bias).all()
        ):
            raise AdapterStateError(
                f"unmerging {names} from {describe(self.get_base_layer())} gives NaN or Inf "
                "weights, so the original weight cannot be restored; the layer was left merged "
                "(to get the base model back, reload it)"
            )
        return weight, bias

    def merge_depends_on_weight(self) -> bool:
        """Whether merging runs a method's own hooks (which may refuse), not ``W + ΔW``."""
        return self._changes_bias() or type(self).merge_weight is not LayerMerging.merge_weight

    def unmerge_depends_on_weight(self) -> bool:
        """Whether unmerging runs a method's own hooks (which may refuse), not ``W − ΔW``."""
        cls = type(self)
        return self._changes_bias() or cls.unmerge_weight is not LayerMerging.unmerge_weight

    def unmerge(self) -> MergeReport | None:
        """Take every merged adapter back out of the base weight, the last merged first."""
        if not self.merged_adapters:
            return None
        weight, bias = self.unmerged_tensors()
        if self.backend.lossy:
            warn_user(
                f"unmerging from {describe(self.get_base_layer())} is lossy: its weight is "
                "quantised, so the restored weight differs from the original by the "
                "requantisation error"
            )
        report = self._write(weight, bias)
        self.merged_adapters = []
        return report
