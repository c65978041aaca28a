"""One rank of the distributed tests, and the single-process reference they compare against.

Launched by ``tests/distributed/test_distributed.py`` through torchrun::

    python -m torch.distributed.run --nnodes 1 --nproc_per_node 2 \\
        --master_addr 127.0.0.1 --master_port PORT \\
        tests/distributed/distributed_worker.py --strategy ddp --out DIR

Every rank trains LoRA, VeRA and AdaLoRA in turn on a tiny Llama under DDP, FSDP2
(``fully_shard``) or FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``) with the
gloo backend on the CPU (``STRATEGY_METHODS`` says which cases each runs). The global batch of a step is the same for
every run; rank ``r`` trains on the ``r``-th chunk of it. After training each rank writes
``DIR/<strategy>-<method>/rank<r>.pt`` (the full adapter tensors, the VeRA basis, the AdaLoRA
rank pattern, the losses), and rank 0 alone saves the adapter with
``save_pretrained(DIR/<strategy>-<method>/adapter, is_main_process=rank == 0)``.

:func:`run_single` is the same training in one process on the whole global batch.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
import json
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adapt.adalora import AdaLoraConfig
from adapt.core import AdaptedModel, AdapterConfig, adapt, testing
from adapt.lora import LoraConfig
from adapt.vera import VeraConfig

METHODS = ("lora", "vera", "adalora")
STRATEGIES = ("ddp", "fsdp", "fsdp1")
#: what each launch trains: under FSDP1 AdaLoRA runs without its orthogonal regulariser
#: ("adalora-noreg"; FSDP1 reshards A and B after each unit's forward, where the regulariser
#: reads them: refused, see refusals()); under DDP and FSDP2 also DoRA, and under FSDP2 LoRA
#: on a 4-bit (nf4) base
STRATEGY_METHODS = {
    "ddp": (*METHODS, "dora"),
    "fsdp": (*METHODS, "dora", "lora-nf4"),
    "fsdp1": ("lora", "vera", "adalora-noreg"),
}
WORLD_SIZE = 2
GLOBAL_BATCH = 4  # sequences per step, split evenly over the ranks
SEQ_LEN = 16
VOCAB = 128
STEPS = 10
LR = 1e-2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama() -> nn.Module:
    """The kit's tiny Llama (seed 0), in training mode."""
    return testing.tiny_llama(training=True, vocab_size=VOCAB)


def make_config(method: str) -> AdapterConfig:
    if method in ("lora", "lora-nf4"):
        return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    if method == "dora":
        return LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS)
    if method == "vera":
        return VeraConfig(r=16, target_modules=TARGETS)
    if method in ("adalora", "adalora-noreg"):
        # 2 warm-up steps, budget decreasing over steps 3..7, final pattern fixed at step 8, then
        # 2 steps under the fixed mask (update_and_allocate(step) for step = 0 .. STEPS - 1)
        return AdaLoraConfig(
            init_r=6,
            target_r=3,
            tinit=2,
            tfinal=2,
            deltaT=1,
            total_step=STEPS,
            lora_alpha=12,
            target_modules=TARGETS,
            orth_reg_weight=0.0 if method == "adalora-noreg" else 0.5,
        )
    raise ValueError(f"unknown method {method!r}")


def nf4_llama() -> nn.Module:
    """tiny_llama() quantised to 4-bit nf4 by transformers (its own folder per process), with
    float32 quantised storage, the setting FSDP needs to shard 4-bit weights."""
    import tempfile

    import transformers

    folder = Path(tempfile.mkdtemp(prefix="nf4-llama-"))
    from safetensors.torch import save_file

    # written by hand: under torch.distributed transformers' save_pretrained writes on rank 0
    # only, and every rank needs its own copy here
    base = tiny_llama()
    base.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    qconfig = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,
    )
    return transformers.LlamaForCausalLM.from_pretrained(
        folder, quantization_config=qconfig, device_map="cpu", dtype=torch.float32
    )


def build(method: str) -> AdaptedModel:
    """The same base weights and the same adapter initialisation in every process."""
    base = nf4_llama() if method.endswith("nf4") else tiny_llama()
    torch.manual_seed(1)
    return adapt(base, make_config(method))


def global_batch(step: int) -> torch.Tensor:
    return testing.token_ids(GLOBAL_BATCH, SEQ_LEN, vocab_size=VOCAB, seed=1000 + step)


def local_batch(step: int, rank: int, world_size: int) -> torch.Tensor:
    return global_batch(step).chunk(world_size)[rank]


def train(
    model: AdaptedModel,
    forward: Callable[..., Any],
    method: str,
    batch: Callable[[int], torch.Tensor],
) -> list[float]:
    """``STEPS`` AdamW steps; ``forward`` is the model or its DDP wrapper. Each process's loss
    is the mean over its own tokens, so DDP's gradient average is the global-batch mean."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(STEPS):
        ids = batch(step)
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if method.startswith("adalora"):
            # after optimizer.step(), before zero_grad(), on every rank at every step
            model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def snapshot(model: AdaptedModel, method: str) -> dict[str, Any]:
    """The adapter's tensors (plain, full, cloned), the VeRA basis and the AdaLoRA pattern."""
    # VeRA: includes the projection (base_model.vera_A / vera_B). Under FSDP2 the adapter
    # parameters are DTensor shards: full_tensor() gathers them (a collective, on every rank)
    tensors = {k: full(v).detach().clone() for k, v in model.adapter_state_dict("default").items()}
    out: dict[str, Any] = {"tensors": tensors}
    if method == "vera":
        basis = model.base_model.vera_basis
        out["basis"] = {"A": basis.A.detach().clone(), "B": basis.B.detach().clone()}
    if method.startswith("adalora"):
        pattern = model.peft_config["default"].rank_pattern
        out["rank_pattern"] = dict(pattern) if pattern is not None else None
    return out


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (an FSDP2 shard) is gathered, any other returned as is."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def run_single(method: str, save_dir: Path | None = None) -> dict[str, Any]:
    """The reference: the same training in one process on the whole global batch."""
    model = build(method)
    initial = snapshot(model, method)["tensors"]
    losses = train(model, model, method, global_batch)
    out = snapshot(model, method)
    out["initial"] = initial
    out["losses"] = losses
    if save_dir is not None:
        model.save_pretrained(save_dir)
    return out


# ------------------------------------------------------------------------------- distributed


def run_distributed(strategy: str, method: str, out: Path) -> dict[str, Any]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = build(method)
    forward: Callable[..., Any]
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # CPU: no device_ids. broadcast_buffers (the default) also broadcasts VeRA's basis.
        forward = DistributedDataParallel(model)
    elif strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # the usual wrapping: one FSDP unit per decoder layer, plus the root
        for layer in model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        forward = model
    elif strategy == "fsdp1":
        forward = fsdp1(model)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")

    losses = train(model, forward, method, lambda step: local_batch(step, rank, world_size))

    with contextlib.ExitStack() as stack:
        if strategy == "fsdp1":  # the test's own view of the adapter: every unit whole
            from torch.distributed.fsdp import FullyShardedDataParallel

            stack.enter_context(FullyShardedDataParallel.summon_full_params(forward))
        result = snapshot(model, method)
    result["losses"] = losses
    # which adapter parameters are sharded (DTensor placements), as strings
    result["placements"] = {
        n: str(p.placements)
        for n, p in model.named_parameters()
        if p.requires_grad and hasattr(p, "placements")
    }
    # on every rank: only rank 0 writes; under FSDP2 every rank helps gather the shards
    model.save_pretrained(out / "adapter", is_main_process=(rank == 0))
    dist.barrier()
    return result


def fsdp1(model: nn.Module, *, per_layer: bool = True) -> nn.Module:
    """FSDP1 as usually set up for adapters: one unit per decoder layer (and the root around
    the AdaptedModel), ``use_orig_params=True`` (frozen and trainable parameters share units)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy({type(model.model.model.layers[0])}) if per_layer else None
    return FullyShardedDataParallel(
        model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu")
    )


def refusals(strategy: str, out: Path) -> dict[str, str]:
    """Messages of what cannot be right (each run on every rank)."""
    found: dict[str, str] = {}
    if strategy != "fsdp1":
        return found
    rank = dist.get_rank()
    ids = local_batch(0, rank, dist.get_world_size())

    model = build("adalora")  # the regulariser reads A and B after FSDP1 resharded them
    forward = fsdp1(model)
    try:
        forward(input_ids=ids, labels=ids)
        found["adalora_regulariser_fsdp1"] = "NOT REFUSED"
    except Exception as exc:
        found["adalora_regulariser_fsdp1"] = f"{type(exc).__name__}: {exc}"

    model = build("lora")  # one FSDP1 unit around the AdaptedModel: adapt cannot gather it
    forward = fsdp1(model, per_layer=False)
    forward(input_ids=ids, labels=ids).loss.backward()
    try:
        model.save_pretrained(out / "root-only", is_main_process=(rank == 0))
        found["save_root_only_fsdp1"] = "NOT REFUSED" if rank == 0 else "not the main process"
    except Exception as exc:
        found["save_root_only_fsdp1"] = f"{type(exc).__name__}: {exc}"
    dist.barrier()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=STRATEGIES, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default=None)
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else STRATEGY_METHODS[args.strategy]

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        for method in methods:
            case = args.out / f"{args.strategy}-{method}"
            case.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            try:
                result = run_distributed(args.strategy, method, case)
            except BaseException:
                (case / f"rank{rank}.error").write_text(traceback.format_exc())
                raise
            result["seconds"] = time.perf_counter() - start
            torch.save(result, case / f"rank{rank}.pt")
        found = refusals(args.strategy, args.out)
        (args.out / f"refusals-rank{rank}.json").write_text(json.dumps(found))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
