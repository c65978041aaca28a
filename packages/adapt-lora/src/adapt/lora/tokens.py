"""``LoraConfig(trainable_token_indices=...)``: train a few rows of an embedding (new special
tokens) without saving the whole matrix — PEFT's trainable tokens, in its checkpoint layout.

Each listed token's row is an adapter tensor ``trainable_tokens_delta`` (n, dim), holding the
row's *value* as PEFT does (it starts as the original row), saved under
``<module>.token_adapter.trainable_tokens_delta``. The layer adds ``value − original`` for those
tokens only (no copy of the whole table per forward, unlike PEFT's ``index_copy``); merging
writes the rows into the weight and unmerging puts the originals back. A model whose output
head shares the embedding's weight (``tie_word_embeddings``) gets a tied layer on the head that
reads the same rows and saves nothing, as in PEFT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from adapt.core import AdapterLayer, AdapterStateError, ConfigError, TargetError
from adapt.core.typenames import describe

__all__ = ["TrainableTokensLayer", "token_targets"]

DELTA = "token_adapter.trainable_tokens_delta"


class _Rows(nn.Module):
    """The listed rows as they were (a non-persistent buffer: never saved, as in PEFT)."""

    rows: torch.Tensor

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("rows", rows, persistent=False)


class TrainableTokensLayer(AdapterLayer):
    """Trainable rows of an ``nn.Embedding`` (or of an output head ``nn.Linear`` whose rows are
    tokens); ``tied_to`` another such layer (set by ``LoraMethod.initialise``) reads its rows."""

    method: ClassVar[str] = "lora"
    base_types: ClassVar[tuple[type | str, ...]] = ()  # built by extra_layers, never resolved
    adapter_layer_names: ClassVar[tuple[str, ...]] = ("trainable_tokens_delta",)
    other_param_names: ClassVar[tuple[str, ...]] = ("trainable_tokens_original",)

    def __init__(self, base_layer: nn.Module) -> None:
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise TargetError(
                f"trainable_token_indices applies to nn.Embedding (or a Linear output head), "
                f"not {describe(base_layer)}"
            )
        super().__init__(base_layer)
        self.trainable_tokens_delta = nn.ParameterDict()
        self.trainable_tokens_original = nn.ModuleDict()  # the rows at creation (buffers)
        self.token_indices: dict[str, list[int]] = {}
        self.tied: dict[str, TrainableTokensLayer] = {}
        self._positions: dict[str, torch.Tensor] = {}

    def update_layer(
        self,
        adapter_name: str,
        config: Any,
        token_indices: Sequence[int] | None = None,
        tied: bool = False,
        **kwargs: Any,
    ) -> None:
        if token_indices is None:
            raise TargetError(
                f"{describe(self.base_layer)} holds trainable tokens; it cannot also be a LoRA "
                "target (as in PEFT): drop it from target_modules, or train it with "
                "trainable_token_indices only"
            )
        weight = cast(torch.Tensor, self.base_layer.weight)
        indices = list(token_indices)
        bad = [i for i in indices if not 0 <= i < weight.shape[0]]
        if bad or len(set(indices)) != len(indices):
            raise ConfigError(
                f"trainable_token_indices for {describe(self.base_layer)}: "
                + (f"{bad} outside 0..{weight.shape[0] - 1}" if bad else "an index repeats")
            )
        rows = weight.detach()[indices].float().clone()
        self.token_indices[adapter_name] = indices
        self.trainable_tokens_original[adapter_name] = _Rows(rows)
        # a tied layer reads its embedding's rows (LoraMethod.initialise ties it); a placeholder
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(rows.clone())

    def tie_to(self, other: TrainableTokensLayer, adapter_name: str) -> None:
        self.trainable_tokens_delta[adapter_name] = other.trainable_tokens_delta[adapter_name]
        self.tied[adapter_name] = other

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name in self.tied or adapter_name not in self.trainable_tokens_delta:
            return {}  # the embedding's layer saves the rows
        return {DELTA: self.trainable_tokens_delta[adapter_name]}

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.token_indices.pop(adapter_name, None)
        self.tied.pop(adapter_name, None)
        self._positions.pop(adapter_name, None)

    def _change(self, adapter_name: str, like: torch.Tensor) -> torch.Tensor:
        rows = self.trainable_tokens_delta[adapter_name]
        original = cast(_Rows, self.trainable_tokens_original[adapter_name]).rows
        change: torch.Tensor = (rows - original.to(rows.device)).to(like.dtype)
        return change

    def _index(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        index = self._positions.get(adapter_name)
        if index is None or index.device != device:
            index = torch.tensor(self.token_indices[adapter_name], device=device)
            self._positions[adapter_name] = index
        return index

    def adapter_output(
        self, x: Any, adapter_name: str, *, base_output: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        assert base_output is not None  # core passes it: this signature declares it
        self._check_overlap()
        index = self._index(adapter_name, base_output.device)
        change = self._change(adapter_name, base_output)
        if isinstance(self.base_layer, nn.Embedding):
            lookup = torch.full(
                (self.base_layer.num_embeddings,), -1, dtype=torch.long, device=x.device
            )
            lookup[index] = torch.arange(len(index), device=x.device)
            where = lookup[x]
            hit = where >= 0
            out = torch.zeros_like(base_output)
            scale = getattr(self.base_layer, "embed_scale", None)
            rows = F.embedding(where.clamp_min(0), change) * hit.unsqueeze(-1)
            out = out + (rows * scale if scale is not None else rows)
            return out
        # an output head: logits of the listed tokens change by x · (value − original)ᵀ
        extra = F.linear(x.to(change.dtype), change)
        return torch.zeros_like(base_output).index_add(-1, index, extra.to(base_output.dtype))

    def _check_overlap(self) -> None:
        live = [n for n in self.active_adapters if n in self.token_indices]
        if len(live) > 1:
            seen: set[int] = set()
            for name in live:
                if seen & set(self.token_indices[name]):
                    raise AdapterStateError(
                        f"adapters {live} of {describe(self.base_layer)} train the same tokens; "
                        "activate one of them at a time (as in PEFT)"
                    )
                seen |= set(self.token_indices[name])

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight = cast(torch.Tensor, self.base_layer.weight)
        delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if adapter_name in self.tied:  # the embedding's merge writes the shared weight
            return delta
        index = self._index(adapter_name, weight.device)
        return delta.index_copy(0, index, self._change(adapter_name, delta))


def _embedding_path(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    for path, module in model.named_modules():
        if embedding is not None and module is embedding:
            return str(path)
    raise ConfigError(
        "trainable_token_indices as a list goes to the model's input embedding, and this model "
        "has no get_input_embeddings(): give a dict {module name: [indices]}"
    )


def _find(model: nn.Module, name: str) -> str:
    hits = [p for p, _ in model.named_modules() if p == name or p.endswith("." + name)]
    if len(hits) != 1:
        what = "matches no module" if not hits else f"matches several modules {hits[:3]}"
        raise ConfigError(f"trainable_token_indices key {name!r} {what}")
    return str(hits[0])


def token_targets(model: nn.Module, spec: Any) -> dict[str, tuple[list[int], str | None]]:
    """Module path → (indices, path of the layer it is tied to or None)."""
    if isinstance(spec, dict):
        targets = {_find(model, k): list(v) for k, v in spec.items()}
    else:
        targets = {_embedding_path(model): list(spec)}
    out: dict[str, tuple[list[int], str | None]] = {p: (i, None) for p, i in targets.items()}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for path, (indices, _) in list(out.items()):
        module = model.get_submodule(path)
        if head is None or getattr(head, "weight", None) is not getattr(module, "weight", 0):
            continue
        if head is module:
            continue
        head_path = next(p for p, m in model.named_modules() if m is head)
        if head_path in out and out[head_path][0] != indices:
            raise ConfigError(
                f"{path} and {head_path} share one weight (tie_word_embeddings), and "
                "trainable_token_indices gives them different tokens; give both the same"
            )
        out[head_path] = (indices, path)
    return out
