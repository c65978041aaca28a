"""Adapted models train under torch.distributed on the CPU (gloo, 2 ranks on localhost).

For LoRA, VeRA and AdaLoRA under DDP, FSDP2 (``fully_shard`` per decoder layer plus the root;
also LoRA on a 4-bit nf4 base) and FSDP1 (``FullyShardedDataParallel`` per decoder layer,
``use_orig_params=True``; AdaLoRA without its regulariser, which FSDP1 cannot serve and which
is refused), ``distributed_worker.py`` is launched with torchrun; each rank trains a tiny Llama
on its half of every global batch. Checked against a single-process run on the whole global
batch (mean loss, so it matches DDP's and FSDP's gradient average):

* the adapter tensors are identical (bit for bit) on both ranks after training;
* they equal the single-process ones within ``PARAM_ATOL`` (AdamW steps amplify rounding, see
  there), and the per-step losses within ``ATOL``;
* ``save_pretrained(path, is_main_process=(rank == 0))`` writes one adapter that loads and
  equals the single-process checkpoint;
* AdaLoRA: the final ``rank_pattern`` is the same on both ranks and in the single process;
* VeRA: the frozen shared basis is untouched and the same everywhere.

One torchrun launch per strategy runs its cases in turn (three launches in all). DeepSpeed
through the Trainer: test_deepspeed.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import distributed_worker as worker  # noqa: E402  (this folder is on sys.path under pytest)
from launching import Launch, torchrun  # noqa: E402

from adapt.core import AdaptedModel  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
CASES = [(s, m) for s in worker.STRATEGIES for m in worker.STRATEGY_METHODS[s]]
IDS = [f"{s}-{m}" for s, m in CASES]
#: distributed vs single process: the same arithmetic up to float32 rounding of the gradient
#: average. Losses and outputs agree to ~1e-6 (ATOL).
ATOL = 1e-5
#: Adapter tensors after STEPS AdamW steps: Adam divides each gradient by its own running
#: magnitude, so an element whose gradient nearly cancels (|g| ~ rounding) gets a rounding-sized
#: difference amplified to a visible fraction of the step size lr. Measured on one process,
#: full batch vs the same batch in two halves: up to 8e-5 for LoRA (lr 1e-2, 10 steps) —
#: the same whether or not the adapter sum is fused; DDP and FSDP2 1.3e-4, FSDP1 2.1e-4 (its
#: reduce-scatter divides before and after summing). 5 % of one step bounds it; the logits of
#: the saved adapters agree to ~3e-5.
PARAM_ATOL = 5e-2 * worker.LR
LAUNCH_TIMEOUT = 150  # seconds, per torchrun launch (about 15 s each on 2 cores)


def launch(strategy: str, out: Path) -> Launch:
    args = ["--strategy", strategy, "--out", str(out)]
    return torchrun(WORKER, args, out, LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Launch]:
    """One torchrun launch per strategy, on first use."""
    done: dict[str, Launch] = {}

    def get(strategy: str) -> Launch:
        if strategy not in done:
            done[strategy] = launch(strategy, tmp_path_factory.mktemp(strategy))
            print(f"\n[{strategy}] torchrun: {done[strategy].seconds:.1f} s", flush=True)
        return done[strategy]

    return get


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """The single-process reference of each method (trained once, with its checkpoint)."""
    done: dict[str, dict[str, Any]] = {}

    def get(method: str) -> dict[str, Any]:
        if method not in done:
            save_dir = tmp_path_factory.mktemp(f"single-{method}") / "adapter"
            result = worker.run_single(method, save_dir)
            result["save_dir"] = save_dir
            done[method] = result
        return done[method]

    return get


def rank_results(run: Launch, strategy: str, method: str) -> list[dict[str, Any]]:
    case = run.out / f"{strategy}-{method}"
    results = []
    for rank in range(worker.WORLD_SIZE):
        file = case / f"rank{rank}.pt"
        if not file.is_file():
            errors = sorted(case.glob("rank*.error")) if case.is_dir() else []
            detail = errors[0].read_text() if errors else run.output[-6000:]
            pytest.fail(
                f"rank {rank} left no result for {strategy}-{method} "
                f"(torchrun exit code {run.returncode}):\n{detail}"
            )
        results.append(torch.load(file, weights_only=True))
    return results


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
    # rank-0 AdaLoRA matrices are saved as empty tensors
    return max(
        (float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()),
        default=0.0,
    )


@pytest.mark.parametrize(("strategy", "method"), CASES, ids=IDS)
def test_ranks_hold_identical_adapters(
    launches: Callable[[str], Launch], strategy: str, method: str
) -> None:
    r0, r1 = rank_results(launches(strategy), strategy, method)
    diff = max_abs_diff(r0["tensors"], r1["tensors"])
    print(f"\n[{strategy}-{method}] max |rank 0 - rank 1| = {diff:.3g}")
    for key in r0["tensors"]:
        assert torch.equal(r0["tensors"][key], r1["tensors"][key]), key
    if strategy == "fsdp":
        # the adapters really were sharded: FSDP2 holds them as DTensor shards (4-bit base too)
        assert r0["placements"], "no DTensor parameters: fully_shard did not shard the adapters"
        assert all("Shard" in p for p in r0["placements"].values()), r0["placements"]
    if method == "vera":
        for name in ("A", "B"):
            assert torch.equal(r0["basis"][name], r1["basis"][name])
    if method.startswith("adalora"):
        assert r0["rank_pattern"] is not None
        assert r0["rank_pattern"] == r1["rank_pattern"]


@pytest.mark.parametrize(("strategy", "method"), CASES, ids=IDS)
def test_matches_single_process(
    launches: Callable[[str], Launch],
    single: Callable[[str], dict[str, Any]],
    strategy: str,
    method: str,
) -> None:
    r0, r1 = rank_results(launches(strategy), strategy, method)
    ref = single(method)
    diff = max_abs_diff(r0["tensors"], ref["tensors"])
    moved = max_abs_diff(ref["initial"], ref["tensors"])
    # the mean of the ranks' losses (each over its half of the batch) is the global loss
    losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"], strict=True)]
    loss_diff = max(abs(a - b) for a, b in zip(losses, ref["losses"], strict=True))
    print(
        f"\n[{strategy}-{method}] max |distributed - single| = {diff:.3g} "
        f"(training moved the adapter by up to {moved:.3g}); losses differ by {loss_diff:.3g}; "
        f"{r0['seconds']:.1f} s on rank 0"
    )
    assert moved > 100 * PARAM_ATOL, (
        "training barely changed the adapter: the comparison is vacuous"
    )
    assert diff <= PARAM_ATOL
    assert loss_diff <= ATOL
    if method == "vera":
        # the frozen basis is untouched (broadcast buffers did not change it) and the same
        for name in ("A", "B"):
            assert torch.equal(r0["basis"][name], ref["basis"][name])
    if method.startswith("adalora"):
        pattern = r0["rank_pattern"]
        assert pattern == ref["rank_pattern"]
        config = worker.make_config(method)
        assert sum(sum(mask) for mask in pattern.values()) == config.target_r * len(pattern)
        assert len({sum(mask) for mask in pattern.values()}) > 1  # not a uniform cut


def logits(model: AdaptedModel) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=worker.global_batch(123)).logits


@pytest.mark.parametrize(("strategy", "method"), CASES, ids=IDS)
def test_rank0_checkpoint_matches_single_process(
    launches: Callable[[str], Launch],
    single: Callable[[str], dict[str, Any]],
    strategy: str,
    method: str,
) -> None:
    run = launches(strategy)
    rank_results(run, strategy, method)  # fails with the workers' error if the run broke
    ref = single(method)
    saved, want = run.out / f"{strategy}-{method}" / "adapter", ref["save_dir"]
    assert sorted(p.name for p in saved.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    got_config = json.loads((saved / "adapter_config.json").read_text())
    want_config = json.loads((want / "adapter_config.json").read_text())
    if method.endswith("nf4"):  # each process quantised its own copy of the base, elsewhere
        got_config.pop("base_model_name_or_path")
        want_config.pop("base_model_name_or_path")
    assert got_config == want_config
    got = safetensors_torch.load_file(str(saved / "adapter_model.safetensors"))
    ref_tensors = safetensors_torch.load_file(str(want / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref_tensors.items()}
    diff = max_abs_diff(got, ref_tensors)

    loaded = AdaptedModel.from_pretrained(worker.tiny_llama(), saved)
    reference = AdaptedModel.from_pretrained(worker.tiny_llama(), want)
    logit_diff = float((logits(loaded) - logits(reference)).abs().max())
    print(
        f"\n[{strategy}-{method}] rank-0 checkpoint vs single: tensors {diff:.3g}, "
        f"logits {logit_diff:.3g}"
    )
    assert diff <= PARAM_ATOL
    assert logit_diff <= 10 * ATOL
    if method.startswith("adalora"):
        # saved pruned to the kept ranks, with the pattern in the config
        assert got_config["rank_pattern"] == ref["rank_pattern"]


def test_fsdp1_refusals(launches: Callable[[str], Launch]) -> None:
    """What FSDP1 cannot give right is refused, with a message that says what to change."""
    run = launches("fsdp1")
    file = run.out / "refusals-rank0.json"
    assert file.is_file(), run.output[-6000:]
    found = json.loads(file.read_text())
    for name, message in found.items():
        print(f"\n[{name}] {message}")
    regulariser = found["adalora_regulariser_fsdp1"]
    assert regulariser.startswith("AdapterStateError") and "orth_reg_weight=0" in regulariser
    save = found["save_root_only_fsdp1"]
    assert save.startswith("CheckpointError") and "summon_full_params" in save
    assert not (run.out / "root-only").exists()  # nothing written
