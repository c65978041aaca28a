"""The AdaLoRA method object, published under the ``adapt.methods`` entry point ``adalora``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from adapt.core import AdapterConfig, AdapterStateError, ConfigError, Method
from adapt.core.distributed import clean_key, full_tensor
from adapt.core.errors import warn_user
from adapt.core.protocols import ModelView
from adapt.core.targeting import QUERY_VALUE_TARGETS

from .allocator import RankAllocator
from .config import AdaLoraConfig
from .engines import gradient_reader, refuse_unreadable_regulariser, whole
from .layer import AdaLoraLayer, kept_ranks

_STATE_KEY = "adalora.allocators"
LAYER_TENSORS = ("lora_A", "lora_E", "lora_B")

NEVER_RAN = (
    "AdaLoRA adapter {name!r}: {what}, but rank allocation has never run, so it trained as "
    "plain LoRA in SVD form with all init_r ranks. Call model.update_and_allocate(step) after "
    "every optimizer step, or let it run for you: Trainer(..., callbacks=[AdaLoraCallback()]) "
    "or adapt.adalora.allocate_on_step(model, optimizer)"
)


def allocators(model: ModelView) -> dict[str, RankAllocator]:
    """The rank allocators of ``model``'s AdaLoRA adapters, by adapter name."""
    found: dict[str, RankAllocator] = model.adapter_set.state(_STATE_KEY, dict)
    return found


def adalora_layers(model: ModelView, adapter_name: str) -> dict[str, AdaLoraLayer]:
    return {
        path: layer
        for path, layer in model.adapter_layers()
        if isinstance(layer, AdaLoraLayer) and adapter_name in layer.lora_A
    }


def orthogonal_regulariser(model: ModelView, adapter_name: str) -> torch.Tensor:
    """Mean over the adapter's A and B matrices of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F.

    Each matrix's ``r × r`` product is computed on the parameter itself (autograd keeps a
    reference, no copy); the products of one size are stacked and their terms taken together
    (one subtraction, one batched norm) instead of a handful of small nodes per matrix."""
    layers = adalora_layers(model, adapter_name).values()
    refuse_unreadable_regulariser(
        t for layer in layers for t in (layer.lora_A[adapter_name], layer.lora_B[adapter_name])
    )
    covs: dict[tuple[int, torch.dtype, torch.device], list[torch.Tensor]] = {}
    count = 0
    for layer in layers:
        for attr in ("lora_A", "lora_B"):
            p = getattr(layer, attr)[adapter_name]
            count += 1  # a matrix pruned to rank 0 counts, with a zero term (as in PEFT)
            if p.numel() == 0:
                continue
            # FSDP2: outside its own unit's forward a parameter is a DTensor shard; gather it
            p = full_tensor(p)
            cov = p @ p.T if attr == "lora_A" else p.T @ p
            covs.setdefault((cov.shape[0], cov.dtype, cov.device), []).append(cov)
    total: torch.Tensor | None = None
    for (size, dtype, device), group in covs.items():
        eye = torch.eye(size, dtype=dtype, device=device)
        term = torch.linalg.matrix_norm(torch.stack(group) - eye).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total / count


#: PEFT's AdaLoRA defaults: LoRA's query/value projections for most models, every attention
#: and MLP projection for the encoder-decoders and a few encoders, and no default for the
#: model types PEFT's AdaLoRA leaves out.
ADALORA_TARGETS: dict[str, tuple[str, ...]] = {
    model_type: QUERY_VALUE_TARGETS[model_type]
    for model_type in (
        "gpt2", "bloom", "gptj", "gpt_neox", "gpt_neo", "llama", "llama4", "bert",
        "gpt_bigcode", "deberta", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
    )
} | {
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "mt5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "roberta": ("query", "key", "value", "dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
}  # fmt: skip


class AdaLoraMethod(Method[AdaLoraConfig]):
    name: ClassVar[str] = "adalora"
    peft_type: ClassVar[str] = "ADALORA"
    package: ClassVar[str] = "adapt-adalora"
    config_class: ClassVar[type[AdapterConfig]] = AdaLoraConfig
    default_target_modules: ClassVar[Mapping[str, Sequence[str]]] = ADALORA_TARGETS
    # not r: PEFT writes LoRA's r for AdaLoRA, which ignores it (init_r and target_r rule)
    summary_keys: ClassVar[tuple[str, ...]] = ("init_r", "target_r", "lora_alpha", "use_rslora")
    tensor_prefixes: ClassVar[tuple[str, ...]] = ("lora_",)

    def rank_of(self, tensors: Mapping[str, tuple[int, ...]]) -> int | None:
        """The rows of ``lora_A``: the ranks the budget kept (a saved checkpoint holds only
        those)."""
        rank = None
        for name, shape in tensors.items():
            if name.split(".")[0] == "lora_A" and shape:
                rank = shape[0]
        return rank

    def prepare(
        self,
        model: ModelView,
        config: AdaLoraConfig,
        adapter_name: str,
        targets: dict[str, nn.Module],
    ) -> None:
        if config.inference_mode:
            return
        others = [
            n
            for n, c in model.peft_config.items()
            if n != adapter_name and isinstance(c, AdaLoraConfig) and not c.inference_mode
        ]
        if others:
            raise ConfigError(
                f"adapter {others[0]!r} is already a trainable AdaLoRA adapter; rank allocation "
                "trains one AdaLoRA adapter at a time. Add this one with inference_mode=True, "
                "or delete the other first"
            )

    def layer_kwargs(
        self, model: ModelView, config: AdaLoraConfig, adapter_name: str, path: str
    ) -> dict[str, Any]:
        # init_r ranks, whatever config.rank_pattern holds: training writes the pattern into
        # the config object (as PEFT does), and a new model built from it must not start pruned
        # (PEFT too builds init_r and applies rank_pattern only when loading: before_load)
        return {"r": config.init_r}

    def before_load(self, model: ModelView, config: AdaLoraConfig, adapter_name: str) -> None:
        """A budgeted checkpoint holds only the kept ranks: shape each layer to them."""
        for path, layer in adalora_layers(model, adapter_name).items():
            mask = config.kept_ranks(path)
            if mask is None or sum(mask) == layer.r[adapter_name]:
                continue
            trainable = layer.lora_A[adapter_name].requires_grad
            layer.update_layer(adapter_name, config, r=sum(mask))
            for table in (layer.lora_A, layer.lora_E, layer.lora_B):
                table[adapter_name].requires_grad_(trainable)

    def allocator(self, model: ModelView, adapter_name: str) -> RankAllocator:
        found = allocators(model)
        alloc = found.get(adapter_name)
        if alloc is None:
            config = self.config_of(model, adapter_name)
            alloc = RankAllocator(config, adapter_name, adalora_layers(model, adapter_name))
            found[adapter_name] = alloc
        return alloc

    def update_and_allocate(self, model: ModelView, global_step: int) -> None:
        adapter_name = self._trainable(model)
        config = self.config_of(model, adapter_name)
        assert config.total_step is not None  # validated: a trainable AdaLoRA config has it
        alloc = self.allocator(model, adapter_name)
        if any(layer.r[adapter_name] != config.init_r for layer in alloc.layers.values()):
            raise AdapterStateError(
                f"adapter {adapter_name!r} was loaded already budgeted (its layers hold the "
                "kept ranks only); rank allocation needs the full init_r ranks. Train a new "
                "AdaLoRA adapter, or fine-tune this one without update_and_allocate"
            )
        if global_step >= config.total_step and not alloc.warned_past_total:
            alloc.warned_past_total = True
            warn_user(
                f"AdaLoRA adapter {adapter_name!r}: update_and_allocate({global_step}) is past "
                f"total_step={config.total_step}; the rank schedule was laid out for "
                f"{config.total_step} optimizer steps, so the ranks stay as they are now. Set "
                "total_step to the number of optimizer steps you train for"
            )
        alloc.steps_seen += 1
        tensors = alloc.tensors()
        scoring = global_step < config.total_step - config.tfinal
        # refuses when the gradients are where it cannot see them (DeepSpeed without capture)
        read_grad = gradient_reader(model, tensors) if scoring else None
        with whole(model, tensors):  # DeepSpeed ZeRO-3, FSDP1: gathered, written back
            self._allocate(model, config, alloc, global_step, read_grad)

    @staticmethod
    def _allocate(
        model: ModelView,
        config: AdaLoraConfig,
        alloc: RankAllocator,
        global_step: int,
        read_grad: Any,
    ) -> None:
        assert config.total_step is not None
        final = config.total_step - config.tfinal
        if global_step < final:
            alloc.update_importance(read_grad)
            budget, mask_now = alloc.schedule(global_step)
            if mask_now:
                config.rank_pattern = alloc.mask_to_budget(budget)
        elif global_step == final:
            budget, _ = alloc.schedule(global_step)
            config.rank_pattern = alloc.mask_to_budget(budget)
            alloc.reset_importance()
        elif config.rank_pattern is not None:
            alloc.mask_with_pattern(config.rank_pattern)
        else:
            warn_user(
                f"update_and_allocate({global_step}) is past the budgeting phase "
                f"(total_step={config.total_step}, tfinal={config.tfinal}) but no rank was ever "
                "allocated: call it after every optimizer step from step 0"
            )

    @staticmethod
    def _trainable(model: ModelView) -> str:
        for name in model.active_adapters:
            config = model.peft_config[name]
            if isinstance(config, AdaLoraConfig) and not config.inference_mode:
                return name
        raise AdapterStateError(
            "update_and_allocate needs an active, trainable AdaLoRA adapter; active adapters: "
            f"{model.active_adapters}"
        )

    def postprocess_output(self, model: ModelView, adapter_name: str, output: Any) -> Any:
        config = self.config_of(model, adapter_name)
        if not config.inference_mode and model.training and torch.is_grad_enabled():
            self._count_training_forward(model, adapter_name, config)
        loss = getattr(output, "loss", None)
        if config.inference_mode or not isinstance(loss, torch.Tensor):
            return output
        if config.orth_reg_weight > 0:
            reg = orthogonal_regulariser(model, adapter_name).to(loss.device, loss.dtype)
            output.loss = loss + config.orth_reg_weight * reg
        return output

    def _count_training_forward(
        self, model: ModelView, adapter_name: str, config: AdaLoraConfig
    ) -> None:
        alloc = self.allocator(model, adapter_name)
        alloc.training_forwards += 1
        assert config.total_step is not None
        if (
            alloc.steps_seen == 0
            and alloc.training_forwards >= config.total_step
            and not alloc.warned_never_ran
        ):
            alloc.warned_never_ran = True
            warn_user(
                NEVER_RAN.format(
                    name=adapter_name,
                    what=f"training has reached total_step={config.total_step} forward passes",
                )
            )

    def checkpoint_state(
        self, model: ModelView, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        config = self.config_of(model, adapter_name)
        alloc = allocators(model).get(adapter_name)
        trained = alloc is not None and alloc.training_forwards > 0
        if trained and alloc is not None and alloc.steps_seen == 0 and not config.rank_pattern:
            warn_user(NEVER_RAN.format(name=adapter_name, what="it is being saved"))
        if not config.rank_pattern:
            return tensors
        out = dict(tensors)
        for path in adalora_layers(model, adapter_name):
            mask = config.kept_ranks(clean_key(path))
            if mask is None:
                continue
            # from the tensors given (gathered whole by save_pretrained), not the live layer
            keys = {attr: clean_key(f"base_model.model.{path}.{attr}") for attr in LAYER_TENSORS}
            kept = kept_ranks({attr: tensors[key] for attr, key in keys.items()}, mask)
            out.update({keys[attr]: tensor for attr, tensor in kept.items()})
        return out

    def on_delete(self, model: ModelView, adapter_name: str) -> None:
        allocators(model).pop(adapter_name, None)


METHOD = AdaLoraMethod()
