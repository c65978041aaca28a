"""sentence-transformers: adapt a ``SentenceTransformer`` in place, save it, load it back.

::

    from adapt.core.integrations.sentence_transformers import (
        adapt_sentence_transformer, load_sentence_transformer)

    adapted = adapt_sentence_transformer(st, LoraConfig(r=8, target_modules=["query", "value"]))
    SentenceTransformerTrainer(model=st, ...).train()       # trains the adapter
    st.save("out")                                          # adapter files, PEFT's format
    st2 = load_sentence_transformer("out")                  # same embeddings as st

The transformers model inside the ``SentenceTransformer`` is replaced by the
:class:`~adapt.core.AdaptedModel`, so ``st.save()`` writes the adapter (PEFT's
``adapter_config.json`` + ``adapter_model.safetensors``; sentence-transformers with PEFT
installed loads that folder too). Adapting the inner model without putting the result back
(``adapt(st[0].auto_model, config)``) is refused when ``st.save()`` runs, instead of writing a
model whose adapted layers would reload re-initialised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

from torch import nn

from ..checkpoint import read_config
from ..config import AdapterConfig
from ..errors import CheckpointError, IntegrationError
from ..model import AdaptedModel, adapt


def _child(module: nn.Module, name: str) -> nn.Module | None:
    """``module``'s direct submodule ``name`` (not an attribute it passes through), or None."""
    return dict(module.named_children()).get(name)


def _transformer_module(st: Any) -> tuple[nn.Module, str]:
    """The module of ``st`` holding the transformers model, and the attribute it is under."""
    for module in st.children() if isinstance(st, nn.Module) else ():
        for attr in ("model", "auto_model"):  # sentence-transformers >= 6, then older
            inner = _child(module, attr)
            if inner is not None and hasattr(inner, "config"):
                return module, attr
    raise IntegrationError(
        f"{type(st).__name__} has no transformers module (a sentence_transformers Transformer "
        "whose .model is a transformers model); pass a SentenceTransformer"
    )


def adapt_sentence_transformer(
    st: Any, config: AdapterConfig, adapter_name: str = "default"
) -> AdaptedModel:
    """Adapt ``st``'s transformers model in place and return the :class:`AdaptedModel`
    (for ``print_trainable_parameters``, ``merge_and_unload``, more adapters); ``st`` itself
    stays the model to train, encode and save."""
    module, attr = _transformer_module(st)
    inner = cast(nn.Module, _child(module, attr))
    if isinstance(inner, AdaptedModel):
        raise IntegrationError(
            "this SentenceTransformer is adapted already; add another adapter with "
            "st[0].model.add_adapter(name, config)"
        )
    adapted = adapt(inner, config, adapter_name)
    setattr(module, attr, adapted)
    return adapted


def _differences(folder: Path, st: Any) -> list[str]:
    """Where the modules saved in ``folder`` differ from the freshly loaded base ``st``: module
    kinds (modules.json) and each module's saved ``config.json`` against its config now."""
    entries = (
        json.loads((folder / "modules.json").read_text())
        if (folder / "modules.json").is_file()
        else []
    )
    modules = list(st.children())
    if not entries:
        return []
    kinds = [str(e.get("type", "")).rsplit(".", 1)[-1] for e in entries]
    if kinds != [type(m).__name__ for m in modules]:
        return [f"modules.json: {kinds} vs the base's {[type(m).__name__ for m in modules]}"]
    out = []
    for entry, module in zip(entries, modules, strict=True):
        saved = folder / str(entry.get("path", "")) / "config.json"
        if not entry.get("path") or not saved.is_file() or not hasattr(module, "get_config_dict"):
            continue
        now = json.loads(json.dumps(module.get_config_dict()))
        if json.loads(saved.read_text()) != now:
            out.append(f"{entry['path']}/config.json")
    return out


def load_sentence_transformer(
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
    **kwargs: Any,
) -> Any:
    """Load a ``SentenceTransformer`` saved after :func:`adapt_sentence_transformer`: its base
    (``base_model_name_or_path`` of the adapter config) with the adapter from ``path``.
    ``kwargs`` go to ``SentenceTransformer``. The saved modules (pooling, normalisation, dense
    layers) must be the base's: a folder whose modules differ is refused, not half-loaded."""
    from sentence_transformers import SentenceTransformer

    folder = Path(path)
    base = read_config(folder).get("base_model_name_or_path")
    if not base:
        raise CheckpointError(
            f"{folder}/adapter_config.json names no base_model_name_or_path; load the base "
            "yourself: st = SentenceTransformer(base); then "
            "adapt_sentence_transformer-style: AdaptedModel.from_pretrained(st[0].model, path)"
        )
    st = SentenceTransformer(str(base), **kwargs)
    differ = _differences(folder, st)
    if differ:
        raise CheckpointError(
            f"{folder} has modules that differ from its base {base} ({differ}): only the "
            "transformers model's adapter can be restored onto the base. Load it with "
            "sentence-transformers and PEFT instead: SentenceTransformer(path)"
        )
    module, attr = _transformer_module(st)
    adapted = AdaptedModel.from_pretrained(
        cast(nn.Module, _child(module, attr)),
        folder,
        adapter_name=adapter_name,
        is_trainable=is_trainable,
    )
    setattr(module, attr, adapted)
    return st


__all__ = ["adapt_sentence_transformer", "load_sentence_transformer"]
