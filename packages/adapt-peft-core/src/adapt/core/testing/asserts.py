"""Assertions over any :class:`~adapt.core.AdaptedModel`: the merge round trip, mixed-batch
routing, and the helpers they share (the output tensor of a call, a closeness check)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..model import AdaptedModel
from ..routing import BASE


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output: the tensor itself, ``.logits``, or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Sequence) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}")


def forward_no_grad(model: nn.Module, batch: Any, **kwargs: Any) -> torch.Tensor:
    """A detached copy of the main output tensor of ``model`` on ``batch`` (a tensor passed
    positionally, a tuple passed as several positional inputs, or a mapping passed as keyword
    arguments), computed without gradients."""
    with torch.no_grad():
        if isinstance(batch, Mapping):
            return output_tensor(model(**batch, **kwargs)).detach().clone()
        if isinstance(batch, tuple):
            return output_tensor(model(*batch, **kwargs)).detach().clone()
        return output_tensor(model(batch, **kwargs)).detach().clone()


def check_close(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str, rtol: float = 0.0
) -> None:
    """Raise ``AssertionError`` (its message starting with ``what``) unless both tensors have
    the same shape and differ by at most ``atol`` everywhere, or (``rtol > 0``, for lossy
    weights) by at most ``rtol`` relative to ``expected`` in the Frobenius norm."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    delta = actual.double() - expected.double()
    diff = delta.abs().max().item() if actual.numel() else 0.0
    if diff <= atol:
        return
    if rtol > 0:
        rel = (delta.norm() / expected.double().norm().clamp_min(1e-30)).item()
        if rel <= rtol:
            return
        raise AssertionError(
            f"{what}: relative difference {rel:.3g} exceeds rtol={rtol:g} (max abs {diff:.3g})"
        )
    raise AssertionError(f"{what}: max abs difference {diff:.3g} exceeds atol={atol:g}")


def assert_merge_roundtrip(
    model: AdaptedModel,
    batch_fn: Callable[[], Any],
    atol: float = 1e-5,
    *,
    adapter_names: Sequence[str] | None = None,
    rtol: float = 0.0,
) -> None:
    """Check the merge protocol on ``model``, whose adapters must all be unmerged.

    * the merged model gives the unmerged output (``batch_fn()`` is a tensor passed
      positionally, or a mapping passed as keyword arguments);
    * ``unmerge_adapter()`` restores every base weight to within ``atol``, and the
      output with it.

    Adapters ``adapter_names`` (default: the active ones) are merged. The model is left
    unmerged. ``rtol`` > 0 (lossy, quantised bases) bounds outputs and restored weights by a
    relative error instead: a quantised weight is compared as its backend reads it.
    """
    for path, layer in model.adapter_layers():
        if layer.merged:
            raise AssertionError(f"{path} is already merged; unmerge it before the round trip")
    batch = batch_fn()
    before = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    dense = {p: layer.backend.get_weight(layer.base_layer).detach().clone()
             for p, layer in model.adapter_layers() if layer.backend.lossy}  # fmt: skip
    unmerged = forward_no_grad(model, batch)
    model.merge_adapter(adapter_names)
    if not any(layer.merged for _, layer in model.adapter_layers()):
        raise AssertionError("merge_adapter() merged no layer")
    merged = forward_no_grad(model, batch)
    check_close(merged, unmerged, atol, "merged output vs unmerged output", rtol)
    model.unmerge_adapter()
    for path, layer in model.adapter_layers():
        if layer.merged:
            raise AssertionError(f"{path} is still merged after unmerge_adapter()")
    after = model.model.state_dict()
    if set(after) != set(before):
        raise AssertionError(
            f"unmerge changed the state-dict keys: {sorted(set(after) ^ set(before))[:5]}"
        )
    lossy_prefixes = tuple(f"{p}.base_layer." for p in dense)
    for key, value in before.items():
        if key.startswith(lossy_prefixes):
            continue  # quantised storage: compared below, as its backend reads it
        if value.is_floating_point():
            check_close(after[key], value, atol, f"{key} after merge→unmerge")
        elif not torch.equal(after[key], value):
            raise AssertionError(f"{key} changed after merge→unmerge")
    layers = dict(model.adapter_layers())
    for path, weight in dense.items():
        restored = layers[path].backend.get_weight(layers[path].base_layer)
        check_close(restored, weight, atol, f"{path} weight after merge→unmerge", rtol)
    check_close(forward_no_grad(model, batch), unmerged, atol, "output after merge→unmerge", rtol)


def _select(batch: Any, index: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[index : index + 1]
    if isinstance(batch, tuple):
        return tuple(_select(item, index) for item in batch)
    if isinstance(batch, Mapping):
        return {
            k: v[index : index + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()
        }
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into samples")


def assert_mixed_batch_matches(
    model: AdaptedModel,
    batch: Any,
    adapter_names: Sequence[str],
    atol: float = 1e-5,
    rtol: float = 0.0,
) -> None:
    """Check that ``model(batch, adapter_names=...)`` equals, sample by sample, the output of
    the model with only that sample's adapter active (``"__base__"``: adapters disabled).

    The active adapters are restored afterwards.
    """
    mixed = forward_no_grad(model, batch, adapter_names=list(adapter_names))
    previous = list(model.active_adapters)
    try:
        for i, name in enumerate(adapter_names):
            sample = _select(batch, i)
            if name == BASE:
                with model.disable_adapter():
                    expected = forward_no_grad(model, sample)
            else:
                model.set_adapter(name)
                expected = forward_no_grad(model, sample)
            check_close(mixed[i : i + 1], expected, atol, f"sample {i} (adapter {name!r})", rtol)
    finally:
        if previous:
            model.set_adapter(previous)
