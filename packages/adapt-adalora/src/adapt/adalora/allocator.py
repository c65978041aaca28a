"""Rank allocation: importance scores, the budget schedule, and masking to the budget.

Numerics follow the AdaLoRA paper and PEFT's implementation (so the same training run keeps
the same ranks in both): for every adapter tensor ``p``

* ``I = |p ⊙ ∇p|`` (sensitivity), ``Ī ← β₁ Ī + (1 − β₁) I``,
  ``Ū ← β₂ Ū + (1 − β₂) |I − Ī|`` (uncertainty), element score ``s = Ī ⊙ Ū``;
* a triplet's score is ``s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)``;
* the budget (total kept ranks) is ``init_r × n`` up to ``tinit``, then
  ``int((b₀ − b_T) (1 − (t − tinit) / (T − tfinal − tinit))³ + b_T)``, then ``target_r × n``;
* at a masking step the triplets scoring at or below the (b₀ − budget)-th smallest score get
  ``E_i = 0``.

Sharded training (FSDP2 ``fully_shard``): adapter parameters and gradients are then DTensors,
each rank holding a shard. Scores are computed on the full tensors (gathered with
``full_tensor()``, a collective: every rank must call ``update_and_allocate`` at every step), so
every rank keeps the same importance state, finds the same threshold and masks the same ranks.
DeepSpeed and FSDP1 keep gradients elsewhere: :mod:`adapt.adalora.engines` reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapt.core import AdapterStateError
from adapt.core.distributed import clean_key, full_tensor

from .config import AdaLoraConfig
from .engines import sync_master
from .layer import AdaLoraLayer


def _own_grad(p: torch.Tensor) -> torch.Tensor | None:
    return p.grad


def budget_at(config: AdaLoraConfig, step: int, init_budget: int, target_budget: int) -> int:
    """The number of ranks kept at ``step`` (the schedule alone, no masking decision)."""
    return schedule(config, step, init_budget, target_budget)[0]


def schedule(
    config: AdaLoraConfig, step: int, init_budget: int, target_budget: int
) -> tuple[int, bool]:
    """``(budget, mask_now)`` at ``step``: warm-up, cubic decrease, then the final budget."""
    assert config.total_step is not None
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    progress = (step - tinit) / (total - tfinal - tinit)
    budget = int((init_budget - target_budget) * (1 - progress) ** 3 + target_budget)
    return budget, step % config.deltaT == 0


@dataclass
class RankAllocator:
    """Importance tracking and budget masking for one AdaLoRA adapter.

    ``layers`` maps a module path (relative to the wrapped model) to its AdaLoRA layer.
    """

    config: AdaLoraConfig
    adapter_name: str
    layers: dict[str, AdaLoraLayer]
    exp_avg_ipt: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_unc: dict[str, torch.Tensor] = field(default_factory=dict)
    #: How many times importance was updated and masks applied (for diagnostics).
    updates: int = 0
    maskings: int = 0
    #: update_and_allocate calls, training forward passes, and warnings given once.
    steps_seen: int = 0
    training_forwards: int = 0
    warned_past_total: bool = False
    warned_never_ran: bool = False

    @property
    def init_budget(self) -> int:
        return sum(layer.r[self.adapter_name] for layer in self.layers.values())

    @property
    def target_budget(self) -> int:
        return self.config.target_r * len(self.layers)

    def schedule(self, step: int) -> tuple[int, bool]:
        return schedule(self.config, step, self.init_budget, self.target_budget)

    def reset_importance(self) -> None:
        self.exp_avg_ipt.clear()
        self.exp_avg_unc.clear()

    def _tensors(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for path, layer in self.layers.items():
            for attr in ("lora_A", "lora_B", "lora_E"):
                out.append((f"{path}.{attr}", getattr(layer, attr)[self.adapter_name]))
        return out

    def tensors(self) -> list[torch.Tensor]:
        """The adapter's A, B and E parameters, in the same order on every rank."""
        return [t for _, t in self._tensors()]

    @torch.no_grad()
    def update_importance(
        self, read_grad: Callable[[torch.Tensor], torch.Tensor | None] = _own_grad
    ) -> None:
        """Fold the current gradients (``read_grad(p)``: ``p.grad`` by default) into the smoothed
        sensitivity and uncertainty. Refuses when no tensor has a gradient: scoring would see
        zero importance everywhere and prune every rank."""
        b1, b2 = self.config.beta1, self.config.beta2
        seen = 0
        for key, p in self._tensors():
            grad = read_grad(p)
            if grad is None:
                continue
            seen += 1
            full = full_tensor(p)
            ipt = (full * full_tensor(grad).to(full.dtype)).abs()
            if key not in self.exp_avg_ipt:
                self.exp_avg_ipt[key] = torch.zeros_like(full)
                self.exp_avg_unc[key] = torch.zeros_like(full)
            avg = self.exp_avg_ipt[key].mul_(b1).add_(ipt, alpha=1 - b1)
            self.exp_avg_unc[key].mul_(b2).add_((ipt - avg).abs(), alpha=1 - b2)
        if seen == 0 and self._tensors():
            raise AdapterStateError(
                f"AdaLoRA adapter {self.adapter_name!r}: update_and_allocate found no gradient "
                "on any of its A, B and E tensors, so it cannot score the ranks. Call it after "
                "optimizer.step() and before optimizer.zero_grad(), at the steps where the "
                "optimizer steps"
            )
        self.updates += 1

    def _score(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.exp_avg_ipt:
            # like.shape is the full shape, also for a sharded DTensor
            return torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per layer path: one score per rank (E's score plus A's row mean and B's column mean)."""
        scores = {}
        for path, layer in self.layers.items():
            a = layer.lora_A[self.adapter_name]
            b = layer.lora_B[self.adapter_name]
            e = layer.lora_E[self.adapter_name]
            s_a = self._score(f"{path}.lora_A", a).mean(dim=1)
            s_b = self._score(f"{path}.lora_B", b).mean(dim=0)
            s_e = self._score(f"{path}.lora_E", e).view(-1)
            scores[path] = s_e + (s_a + s_b)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the singular values of the least important triplets so ``budget`` remain;
        returns the rank pattern (per ``<path>.lora_E``, one bool per rank: kept)."""
        scores = self.triplet_scores()
        n_drop = self.init_budget - budget
        if n_drop > 0 and scores and not any(bool((s != 0).any()) for s in scores.values()):
            # never prune on an importance that is zero everywhere: nothing was learnt about
            # the ranks (PEFT would drop them all)
            raise AdapterStateError(
                f"AdaLoRA adapter {self.adapter_name!r}: every rank's importance is zero at this "
                "masking step, so there is nothing to choose the kept ranks by; no rank was "
                "pruned. Importance comes from the gradients: check that update_and_allocate "
                "runs after every optimizer step, before the gradients are zeroed"
            )
        if n_drop > 0 and scores:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=n_drop)[0].item()
        else:
            threshold = None
        pattern: dict[str, list[bool]] = {}
        for path, layer in self.layers.items():
            score = scores[path]
            keep = (
                torch.ones_like(score, dtype=torch.bool) if threshold is None else score > threshold
            )
            mask = keep.tolist()
            self._mask(layer, mask)
            pattern[f"{clean_key(path)}.lora_E"] = mask
        self.maskings += 1
        return pattern

    @torch.no_grad()
    def mask_with_pattern(self, pattern: dict[str, list[bool]]) -> None:
        for path, layer in self.layers.items():
            mask = pattern.get(f"{clean_key(path)}.lora_E")
            if mask is not None:
                self._mask(layer, mask)

    def _mask(self, layer: AdaLoraLayer, mask: list[bool]) -> None:
        layer.apply_mask(self.adapter_name, mask)
        sync_master(layer.lora_E[self.adapter_name])  # DeepSpeed's fp32 copy masked too
