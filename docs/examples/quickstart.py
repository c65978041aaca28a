"""Quickstart: LoRA on a small Llama built from a config — train, save, reload, merge.

Run with ``nox -s demo`` (installs what it needs) or ``python docs/examples/quickstart.py``.
No download: the model is built from a ``LlamaConfig`` with random weights, and the task is
synthetic (predict ``token + 1`` for every position), which the frozen model cannot do.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adapt.core import AdaptedModel, adapt
from adapt.lora import LoraConfig


def batch(n: int, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab - 1, (n, 16), generator=generator)
    # label at position t is ids[t] + 1; transformers shifts labels by one, so pad in front
    labels = torch.cat([torch.full((n, 1), -100), ids[:, :-1] + 1], dim=1)
    return {"input_ids": ids, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    base = LlamaForCausalLM(config)
    pristine = copy.deepcopy(base)

    model = adapt(
        base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    )
    model.print_trainable_parameters()

    gen = torch.Generator().manual_seed(args.seed)
    held_out = batch(64, config.vocab_size, torch.Generator().manual_seed(10_000 + args.seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    start = time.perf_counter()
    first = last = float("nan")
    for step in range(1, args.steps + 1):
        loss = model(**batch(16, config.vocab_size, gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if step == 1 else first
        last = loss.item()
        if step % 10 == 0 or step == 1:
            print(f"step {step:3d}/{args.steps}  loss {last:.3f}")
    per_step = (time.perf_counter() - start) / args.steps

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=held_out["input_ids"]).logits
    pred = logits[:, :-1].argmax(-1)
    accuracy = (pred == held_out["input_ids"][:, :-1] + 1).float().mean().item()

    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        reloaded = AdaptedModel.from_pretrained(copy.deepcopy(pristine), out).eval()
        with torch.no_grad():
            reload_diff = (
                (reloaded(input_ids=held_out["input_ids"]).logits - logits).abs().max().item()
            )
    merged = model.merge_and_unload()
    with torch.no_grad():
        merge_diff = (merged(input_ids=held_out["input_ids"]).logits - logits).abs().max().item()

    print()
    print(f"loss            {first:.3f} -> {last:.3f}")
    print(f"held-out acc    {accuracy:.1%}  (predict token + 1)")
    print(f"reload max diff {reload_diff:.2e}")
    print(f"merge max diff  {merge_diff:.2e}")
    print(f"time per step   {per_step * 1000:.0f} ms")
    if not (last < first and reload_diff < 1e-4 and merge_diff < 1e-3):
        raise SystemExit("quickstart check failed")


if __name__ == "__main__":
    main()
