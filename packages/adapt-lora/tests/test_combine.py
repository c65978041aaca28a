"""``add_weighted_adapter`` for LoRA: each combination type's definition, exactness of ``cat``
and full-rank ``svd`` (property tests over random adapters), errors that leave the model as it
was, and a combined adapter that trains, merges, saves and reloads like any other."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

transformers = pytest.importorskip("transformers")

from lora_testutils import Wrap, ids, max_diff, tiny_llama  # noqa: E402

from adapt.core import AdaptedModel, ConfigError, adapt  # noqa: E402
from adapt.core.errors import AdapterStateError  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
WEIGHTS = [0.7, -0.4]


def two_adapters(
    r2: int = 4, *, rslora: bool = False, pattern: dict[str, int] | None = None
) -> AdaptedModel:
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(target_modules=TARGETS, init_lora_weights=False, use_rslora=rslora)
    model = adapt(tiny_llama(), LoraConfig(r=4, lora_alpha=8, **kw))
    model.add_adapter("b", LoraConfig(r=r2, lora_alpha=3, rank_pattern=pattern or {}, **kw))
    return model


def delta(layer: Any, name: str) -> torch.Tensor:
    out: torch.Tensor = layer.delta_weight(name)
    return out


def weighted_sum(layer: Any, names: list[str], weights: list[float]) -> torch.Tensor:
    return sum((w * delta(layer, n) for n, w in zip(names, weights, strict=True)), torch.zeros(()))


def snapshot(model: AdaptedModel) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, sorted(model.peft_config), list(model.active_adapters)


def assert_unchanged(model: AdaptedModel, before: Any) -> None:
    state, names, active = snapshot(model)
    assert names == before[1] and active == before[2]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids()).logits
    return out


# ---------------------------------------------------------------------------- definitions


def test_cat_is_the_exact_weighted_sum_with_per_module_ranks() -> None:
    model = two_adapters(r2=2, pattern={"v_proj": 3})
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "cat", combination_type="cat")
    config = model.peft_config["cat"]
    # v_proj: 4 + 3 (the most common rank, ties: the larger), q_proj: 4 + 2; scaling 1
    assert config.r == 7 and config.lora_alpha == 7
    assert set(config.rank_pattern.values()) == {6} and set(config.alpha_pattern.values()) == {6}
    for _, layer in model.adapter_layers():
        assert layer.scaling["cat"] == 1
        expected = weighted_sum(layer, ["default", "b"], WEIGHTS)
        assert max_diff(delta(layer, "cat"), expected) < 1e-6


def test_svd_truncates_the_weighted_sum() -> None:
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "s", combination_type="svd", svd_rank=3)
    for _, layer in model.adapter_layers():
        target = weighted_sum(layer, ["default", "b"], WEIGHTS)
        u, s, vh = torch.linalg.svd(target)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert layer.r["s"] == 3
        assert max_diff(delta(layer, "s"), best) < 1e-5


def test_linear_is_factor_wise_with_cross_terms() -> None:
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "lin", combination_type="linear")
    for _, layer in model.adapter_layers():
        sa, sb = layer.scaling["default"], layer.scaling["b"]
        ra, rb = math.sqrt(0.7 * sa), math.sqrt(0.4 * sb)
        a = ra * layer.lora_A["default"].weight - rb * layer.lora_A["b"].weight
        b = ra * layer.lora_B["default"].weight + rb * layer.lora_B["b"].weight
        assert max_diff(layer.lora_A["lin"].weight, a) < 1e-6
        assert max_diff(layer.lora_B["lin"].weight, b) < 1e-6
        # cross terms: not the weighted sum
        assert max_diff(delta(layer, "lin"), weighted_sum(layer, ["default", "b"], WEIGHTS)) > 1e-3


def reference(kind: str, tasks: list[torch.Tensor], weights: list[float], density: float) -> Any:
    """An independent, loop-based statement of the definitions (no DARE: random)."""
    if kind in ("ties", "magnitude_prune"):
        pruned = []
        for t in tasks:
            k = int(density * t.numel())
            threshold = t.abs().flatten().sort(descending=True).values[k - 1] if k else math.inf
            pruned.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
        tasks = pruned
    if kind != "ties":
        return sum((w * t for t, w in zip(tasks, weights, strict=True)), torch.zeros(()))
    elected = torch.where(sum(tasks, torch.zeros(())) >= 0, 1.0, -1.0)
    total, count = torch.zeros_like(tasks[0]), torch.zeros_like(tasks[0])
    for t, w in zip(tasks, weights, strict=True):
        agree = (t.sign() == elected).float()
        total, count = total + agree * w * t, count + agree
    return total / count.clamp(min=1)


@pytest.mark.parametrize("kind", ["ties", "magnitude_prune"])
def test_pruning_types_follow_their_definitions(kind: str) -> None:
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "f", combination_type=kind, density=0.5)
    model.add_weighted_adapter(
        ["default", "b"], WEIGHTS, "d", combination_type=f"{kind}_svd", density=0.5, svd_rank=32
    )
    for _, layer in model.adapter_layers():
        s = [layer.scaling["default"], layer.scaling["b"]]
        root = [math.sqrt(abs(w * x)) for w, x in zip(WEIGHTS, s, strict=True)]
        signed = [r * math.copysign(1, w) for r, w in zip(root, WEIGHTS, strict=True)]
        for factor, fw in ((layer.lora_A, signed), (layer.lora_B, root)):
            tasks = [factor["default"].weight, factor["b"].weight]
            assert max_diff(factor["f"].weight, reference(kind, tasks, fw, 0.5)) < 1e-6
        on_delta = reference(kind, [delta(layer, "default"), delta(layer, "b")], WEIGHTS, 0.5)
        assert max_diff(delta(layer, "d"), on_delta) < 1e-5  # rank 32 ≥ min(shape): exact


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_draws_from_the_global_rng_or_a_generator(kind: str) -> None:
    model = two_adapters()
    names = ["default", "b"]
    for name, seed in (("x", 3), ("y", 3), ("z", 4)):
        torch.manual_seed(seed)
        model.add_weighted_adapter(names, WEIGHTS, name, combination_type=kind, density=0.5)
    for gen_name in ("g1", "g2"):
        torch.manual_seed(99)  # the generator's draws do not depend on the global RNG
        gen = torch.Generator().manual_seed(3)
        model.add_weighted_adapter(
            names, WEIGHTS, gen_name, combination_type=kind, density=0.5, generator=gen
        )
    for _, layer in model.adapter_layers():
        assert torch.equal(delta(layer, "x"), delta(layer, "y"))
        assert not torch.equal(delta(layer, "x"), delta(layer, "z"))
        assert torch.equal(delta(layer, "g1"), delta(layer, "g2"))


def test_dare_with_density_one_is_the_plain_combination() -> None:
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "d", "dare_linear", density=1.0)
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "l", "linear")
    for _, layer in model.adapter_layers():
        assert torch.equal(delta(layer, "d"), delta(layer, "l"))


def test_rslora_combination_is_exact() -> None:
    model = two_adapters(rslora=True)
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "cat", combination_type="cat")
    config = model.peft_config["cat"]
    assert config.use_rslora and config.lora_alpha == pytest.approx(math.sqrt(8))
    for _, layer in model.adapter_layers():
        assert layer.scaling["cat"] == pytest.approx(1.0)
        assert max_diff(delta(layer, "cat"), weighted_sum(layer, ["default", "b"], WEIGHTS)) < 1e-6


def test_reduced_svd_gives_the_full_svd_result() -> None:
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "f", "svd", svd_rank=3)
    model.add_weighted_adapter(
        ["default", "b"], WEIGHTS, "r", "svd", svd_rank=3, svd_full_matrices=False
    )
    for _, layer in model.adapter_layers():
        assert max_diff(delta(layer, "f"), delta(layer, "r")) < 1e-5


def test_half_precision_sources_combine_into_an_adapter_of_the_usual_dtype() -> None:
    """The new adapter is added as any adapter (float32 factors on a bf16 model, as PEFT)."""
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(target_modules=TARGETS, init_lora_weights=False)
    model = adapt(tiny_llama(), LoraConfig(r=4, **kw))
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=4, **kw))
    model.to(torch.bfloat16)
    for kind in ("cat", "svd", "ties"):
        model.add_weighted_adapter(["default", "b"], WEIGHTS, kind, kind, density=0.5)
    for _, layer in model.adapter_layers():
        assert layer.lora_A["default"].weight.dtype == torch.bfloat16
        assert layer.lora_A["svd"].weight.dtype == torch.float32
        expected = weighted_sum(layer, ["default", "b"], WEIGHTS).float()
        assert max_diff(delta(layer, "cat").float(), expected) < 2e-2


def test_one_adapter_is_combined_linearly_as_in_peft() -> None:
    model = two_adapters()
    model.add_weighted_adapter(["b"], [-2.0], "neg", combination_type="svd")
    for _, layer in model.adapter_layers():
        assert max_diff(delta(layer, "neg"), -2.0 * delta(layer, "b")) < 1e-6


# ---------------------------------------------------------------------------- exactness

SHAPES = st.tuples(st.integers(1, 12), st.integers(1, 12))
WEIGHT = st.floats(-3, 3, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    shape=SHAPES,
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    data=st.data(),
    rslora=st.booleans(),
)
def test_cat_and_full_rank_svd_are_exact(
    shape: tuple[int, int], ranks: list[int], data: Any, rslora: bool
) -> None:
    out_f, in_f = shape
    weights = data.draw(st.lists(WEIGHT, min_size=len(ranks), max_size=len(ranks)))
    alphas = data.draw(st.lists(st.floats(0.5, 16), min_size=len(ranks), max_size=len(ranks)))
    torch.manual_seed(len(ranks) * 100 + out_f)
    names = [f"a{i}" for i in range(len(ranks))]
    model: AdaptedModel | None = None
    for name, r, alpha in zip(names, ranks, alphas, strict=True):
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["layer"],
                            init_lora_weights=False, use_rslora=rslora)  # fmt: skip
        if model is None:
            model = adapt(Wrap(nn.Linear(in_f, out_f)), config, name)
        else:
            model.add_adapter(name, config)
    assert model is not None
    model.add_weighted_adapter(names, weights, "cat", combination_type="cat")
    model.add_weighted_adapter(names, weights, "svd", combination_type="svd", svd_rank=12)
    layer = model.model.layer
    expected = weighted_sum(layer, names, weights)
    scale = 1 + expected.abs().max().item()
    assert layer.r["cat"] == (sum(ranks) if len(ranks) > 1 else ranks[0])
    assert max_diff(delta(layer, "cat"), expected) <= 1e-5 * scale
    assert max_diff(delta(layer, "svd"), expected) <= 1e-5 * scale


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "words"),
    [
        ((["default", "nope"], WEIGHTS, "n"), {}, AdapterStateError, "no adapter named 'nope'"),
        ((["default", "b"], [1.0], "n"), {}, ConfigError, "1 weights for 2 adapters"),
        ((["default", "b"], [1.0, math.nan], "n"), {}, ConfigError, "finite"),
        (("default", [1.0], "n"), {}, ConfigError, "list of adapter names"),
        (([], [], "n"), {}, ConfigError, "empty"),
        ((["default", "b"], WEIGHTS, "b"), {}, AdapterStateError, "exists already"),
        ((["default", "b"], WEIGHTS, "n"), {"combination_type": "avg"}, ConfigError, "unknown"),
        ((["default", "b"], WEIGHTS, "n"), {"combination_type": "ties"}, ConfigError, "density="),
        ((["default", "b"], WEIGHTS, "n"), {"density": 1.5}, ConfigError, "in [0, 1]"),
        ((["default", "b"], WEIGHTS, "n"), {"svd_rank": 0}, ConfigError, "positive"),
        ((["default", "b"], WEIGHTS, "n"), {"majority_sign_method": "x"}, ConfigError, "total"),
    ],
)
def test_bad_calls_are_refused_and_change_nothing(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    model = two_adapters()
    before = snapshot(model)
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        model.add_weighted_adapter(*args, **kwargs)
    assert_unchanged(model, before)


def test_factor_wise_types_refuse_different_ranks() -> None:
    model = two_adapters(r2=2)
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"one rank at each module.*use 'cat' or 'svd'"):
        model.add_weighted_adapter(["default", "b"], WEIGHTS, "n", combination_type="linear")
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("extra", "message"),
    [({"use_dora": True}, r"\['odd'\] are DoRA adapters and \['default'\] are not"),
     ({"modules_to_save": ["lm_head"]}, "'odd' sets modules_to_save=.*cannot be combined"),
     ({"bias": "all"}, "'odd' trains the model's own biases")],
)  # fmt: skip
def test_refused_kinds_of_adapter_say_why(extra: dict[str, Any], message: str) -> None:
    model = two_adapters()
    model.add_adapter("odd", LoraConfig(r=4, target_modules=TARGETS, **extra))
    before = snapshot(model)
    with pytest.raises(ConfigError, match=message):
        model.add_weighted_adapter(["default", "odd"], WEIGHTS, "n", combination_type="cat")
    assert_unchanged(model, before)


def test_svd_driver_goes_to_torch_and_a_refusal_there_changes_nothing() -> None:
    model = two_adapters()
    before = snapshot(model)
    if torch.cuda.is_available():
        pytest.skip("drivers are CUDA-only; this checks the CPU refusal")
    with pytest.raises(RuntimeError, match="driver"):
        model.add_weighted_adapter(["default", "b"], WEIGHTS, "n", "svd", svd_driver="gesvd")
    assert_unchanged(model, before)


def test_svd_clamp_bounds_both_factors() -> None:
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "c", "svd", svd_clamp=0.8)
    # the reference through the same (dense) route: a clamp at the maximum clamps nothing
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "u", "svd", svd_clamp=1.0)
    for _, layer in model.adapter_layers():
        a, b = layer.lora_A["c"].weight, layer.lora_B["c"].weight
        a_u, b_u = layer.lora_A["u"].weight, layer.lora_B["u"].weight
        high = torch.quantile(torch.cat([b_u.flatten(), a_u.flatten()]), 0.8)
        assert torch.equal(a, a_u.clamp(-high, high)) and torch.equal(b, b_u.clamp(-high, high))


def test_an_init_that_rewrites_the_base_is_not_rerun() -> None:
    model = two_adapters()
    model.add_adapter("p", LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    bases = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    model.add_weighted_adapter(["p", "default"], WEIGHTS, "n", combination_type="cat")
    assert model.peft_config["n"].init_lora_weights is True
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in bases.items())


def test_other_methods_refuse_by_default() -> None:
    adalora = pytest.importorskip("adapt.adalora")
    config = adalora.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=TARGETS)
    model = adapt(tiny_llama(), config, "v")
    before = snapshot(model)
    with pytest.raises(ConfigError, match="does not support combining"):
        model.add_weighted_adapter(["v"], [1.0], "n", combination_type="cat")
    assert_unchanged(model, before)


def test_a_failure_while_filling_rolls_the_new_adapter_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from adapt.core import state_dict

    model = two_adapters()
    before = snapshot(model)

    def broken(*args: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(state_dict, "load_state_dict_into", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        model.add_weighted_adapter(["default", "b"], WEIGHTS, "n", combination_type="cat")
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------- an ordinary adapter


def test_combined_adapter_trains_merges_saves_and_reloads(tmp_path: Path) -> None:
    model = two_adapters(r2=2, pattern={"v_proj": 3})
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type="cat")
    model.set_adapter("mix")
    expected = logits(model)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    saved = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["alpha_pattern"] and saved["init_lora_weights"] is False
    reloaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "mix")
    assert max_diff(logits(reloaded), expected) < 1e-5
    # merges: the merged base gives the adapter's outputs
    merged = reloaded.merge_and_unload()
    assert max_diff(logits(merged), expected) < 1e-4
    # trains: only the combined adapter's factors get gradients
    model.train()
    loss = model(input_ids=ids(), labels=ids()).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".mix" in n for n in grads)


def test_all_linear_targets_stay_a_keyword() -> None:
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(target_modules="all-linear", init_lora_weights=False)
    model = adapt(tiny_llama(), LoraConfig(r=4, **kw))
    model.add_adapter("b", LoraConfig(r=4, **kw))
    model.add_adapter("c", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "same", combination_type="cat")
    assert model.peft_config["same"].target_modules == "all-linear"
    model.add_weighted_adapter(["default", "c"], WEIGHTS, "mixed", combination_type="cat")
    mixed = model.peft_config["mixed"].target_modules
    assert isinstance(mixed, list) and "model.layers.0.mlp.down_proj" in mixed
