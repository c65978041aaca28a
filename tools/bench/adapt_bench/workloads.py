"""The work both libraries are given, and where adapt and PEFT differ: the matching configs of
each method, injection (``adapt`` vs ``get_peft_model``), the same-work check of the two
losses, the training step, the frozen-base floor step (both optionally under autocast), the
models and batches of the overhead case's shapes, and the empty-weight injection model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from .config import LIBS, LORA_RANK, MOE_METHODS, TARGETS

#: A context manager factory around a forward (and its loss): ``contextlib.nullcontext`` for
#: float32, ``torch.autocast(...)`` for mixed precision (see ``autocast_for``).
Ctx = Callable[[], contextlib.AbstractContextManager[Any]]

MOE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MOE_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
from .timing import Bench


def configs(method: str, shape: str = "h512") -> tuple[Any, Any]:
    """Fresh ``(adapt config, PEFT config)`` of ``method``, with the same settings (LoRA's rank
    depends on the ``shape`` of the overhead case: r8 on the bench model, r16 on h1024, α 2r).

    PEFT gets ``task_type="CAUSAL_LM"`` (how PEFT is used on a causal LM): without it
    ``get_peft_model`` returns a bare ``PeftModel`` whose forward skips the tuner's forward, so
    AdaLoRA's orthogonal regulariser would silently not be computed on the PEFT side.
    """
    import peft

    task = {"task_type": "CAUSAL_LM"}
    if method == "lora":
        from adapt.lora import LoraConfig

        r = LORA_RANK[shape]
        return (
            LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS)),
            peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), **task),
        )
    if method == "dora":  # the DoRA issue's bench case: LoRA r16 on all linear layers
        from adapt.lora import LoraConfig

        kw = dict(r=16, lora_alpha=32, use_dora=True, target_modules=list(TARGETS))
        return LoraConfig(**kw), peft.LoraConfig(**kw, **task)  # type: ignore[arg-type]
    if method in MOE_METHODS:  # the MoE issue's bench case
        from adapt.lora import LoraConfig

        kw = dict(
            r=8, lora_alpha=16, target_modules=list(MOE_TARGETS), target_parameters=list(MOE_PARAMS)
        )
        return LoraConfig(**kw), peft.LoraConfig(**kw, **task)  # type: ignore[arg-type]
    if method == "vera":
        from adapt.vera import VeraConfig

        return (
            VeraConfig(r=256, target_modules=list(TARGETS)),
            peft.VeraConfig(r=256, target_modules=list(TARGETS), **task),
        )
    if method == "adalora":
        from adapt.adalora import AdaLoraConfig

        kw = dict(init_r=12, target_r=8, tinit=10, tfinal=10, deltaT=2, total_step=1000)
        return (
            AdaLoraConfig(target_modules=list(TARGETS), **kw),
            peft.AdaLoraConfig(target_modules=list(TARGETS), **kw, **task),
        )
    raise ValueError(method)


def init_configs(init: str) -> tuple[Any, Any]:
    """The LoRA bench configs with ``init_lora_weights=init`` (PiSSA, OLoRA)."""
    a_cfg, p_cfg = configs("lora")
    a_cfg.init_lora_weights = p_cfg.init_lora_weights = init
    return a_cfg, p_cfg


def inject(lib: str, model: Any, method: str, init: str | None = None, shape: str = "h512") -> Any:
    a_cfg, p_cfg = configs(method, shape) if init is None else init_configs(init)
    if lib == "adapt":
        from adapt.core import adapt
        from adapt.core.parameter_layer import ParameterLayer

        adapted = adapt(model, a_cfg)
        if method == "moe-dense":
            for layer in adapted.modules():
                if isinstance(layer, ParameterLayer):
                    layer.low_rank_forward = False
        return adapted
    import peft

    return peft.get_peft_model(model, p_cfg)


def trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft_name(name: str) -> str:
    """One spelling for both: PEFT's DoRA magnitude is a module (``...default.weight``),
    adapt's a ParameterDict entry (``...default``)."""
    head, sep, _ = name.partition(".lora_magnitude_vector.")
    if not sep:
        return name
    return f"{head}.lora_magnitude_vector.{name.split('.lora_magnitude_vector.')[1].split('.')[0]}"


def same_work(
    models: dict[str, Any], ids: Any, ctx: Ctx = contextlib.nullcontext, rtol: float = 1e-4
) -> str:
    """Copy adapt's trainable tensors into the PEFT model (same names: both use PEFT's key
    layout) and compare the two training losses, computed under ``ctx`` (autocast for mixed
    precision), to ``rtol`` relative; returns a note for the table."""
    import torch

    params = {
        lib: {_peft_name(n): p for n, p in models[lib].named_parameters() if p.requires_grad}
        for lib in LIBS
    }
    if set(params["adapt"]) != set(params["peft"]):
        return "trainable tensors differ by name"
    with torch.no_grad():
        for name, tensor in params["adapt"].items():
            params["peft"][name].copy_(tensor)
        loss = {}
        for lib in LIBS:
            with ctx():
                loss[lib] = float(models[lib](input_ids=ids, labels=ids).loss)
    if abs(loss["adapt"] - loss["peft"]) > rtol * max(1.0, abs(loss["peft"])):
        return f"LOSSES DIFFER: adapt {loss['adapt']:.5f}, peft {loss['peft']:.5f}"
    return "same loss"


def train_step_fn(model: Any, ids: Any, ctx: Ctx = contextlib.nullcontext) -> Callable[[], None]:
    """zero_grad + forward (causal-LM loss; under ``ctx``) + backward + AdamW step (outside)."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    return step


def floor_fn(model: Any, ids: Any, ctx: Ctx = contextlib.nullcontext) -> Callable[[], None]:
    """The frozen base model's forward (under ``ctx``) + backward: every weight frozen, the
    input embeddings' output made to require grad (``enable_input_require_grads``) so the loss
    backpropagates through every layer (activation grads only, no weight grads); no
    optimizer."""
    model.requires_grad_(False)
    model.enable_input_require_grads()
    model.train()

    def step() -> None:
        with ctx():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    return step


def autocast_for(device_type: str, precision: str) -> Ctx:
    """The forward's context of a precision: "fp32" none, "bf16" ``torch.autocast`` to
    bfloat16 on ``device_type`` (float32 weights: mixed-precision training)."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision != "bf16":
        raise ValueError(precision)
    import torch

    return lambda: torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def shape_base(b: Bench, shape: str) -> Any:
    """A fresh base model of an overhead-case shape: "h512" the bench model (``b.base()``),
    "h1024" the wide Llama of the ``wide_*`` sizes (seed 0, on the bench device)."""
    if shape == "h512":
        return b.fresh_base()
    if shape != "h1024":
        raise ValueError(shape)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = b.sizes
    cfg = LlamaConfig(
        hidden_size=s.wide_hidden,
        intermediate_size=s.wide_intermediate,
        num_hidden_layers=s.wide_layers,
        num_attention_heads=s.wide_heads,
        num_key_value_heads=s.wide_kv_heads,
        vocab_size=s.vocab,
        max_position_embeddings=max(2048, s.wide_seq),
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(b.device)


def shape_batch(b: Bench, shape: str) -> Any:
    """The token batch of a shape: ``b.batch()`` for "h512", ``wide_batch × wide_seq`` else."""
    if shape == "h512":
        return b.batch()
    import torch

    s = b.sizes
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, s.vocab, (s.wide_batch, s.wide_seq), generator=gen).to(b.device)


def empty_llama(b: Bench, how: str) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    s = b.sizes
    cfg = b.llama_config(
        layers=s.inject_layers, hidden=s.inject_hidden, intermediate=s.inject_intermediate
    )
    if how == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM(cfg)
    if how == "init_empty_weights":
        from accelerate import init_empty_weights

        with init_empty_weights():
            return LlamaForCausalLM(cfg)
    torch.manual_seed(0)  # "real": small real weights
    return LlamaForCausalLM(cfg)


def moe_model(b: Bench) -> Any:
    """The MoE bench model: Mixtral, hidden 256, intermediate 512, 8 experts, top-2, 4 layers,
    8 heads / 4 kv heads, vocab 1024 (``--quick``: 2 layers, 4 experts, hidden 64), seed 0,
    transformers' default expert kernel (grouped_mm)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    quick = b.args.quick
    cfg = MixtralConfig(
        hidden_size=64 if quick else 256,
        intermediate_size=128 if quick else 512,
        num_hidden_layers=2 if quick else 4,
        num_attention_heads=4 if quick else 8,
        num_key_value_heads=2 if quick else 4,
        num_local_experts=4 if quick else 8,
        num_experts_per_tok=2,
        vocab_size=b.sizes.vocab,
        max_position_embeddings=max(2048, b.sizes.seq),
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).to(b.device)


def base_for(b: Bench, method: str) -> Any:
    """A fresh base model for ``method``: the MoE model for the MoE methods, else the Llama."""
    return moe_model(b) if method in MOE_METHODS else b.fresh_base()
