"""``add_weighted_adapter`` and ``adapt combine`` for VeRA: the exact weighted sum (λ_b summed
where λ_d is shared, λ_d where λ_b is), refusals that leave the model as it was, a combined
adapter that merges, trains, saves and reloads, and the offline combination byte for byte."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from vera_testutils import Toy, basis_of, input_ids, randomise_lambdas, tiny_llama

from adapt.core import AdaptedModel, CheckpointError, ConfigError, adapt, combine_saved_adapters
from adapt.core.cli import main
from adapt.vera import VeraConfig

R = 8
TARGETS = ["q_proj", "v_proj"]
W = [0.7, -0.4]
BIG = [R, 128, 128]  # a basis for every layer of the tiny Llama
#: saving a declared basis_shape without the projection warns (PEFT would regenerate another)
NO_PROJECTION_WARNING = "ignore:VeRA adapter .* saved without its projection:UserWarning"


def build(
    targets_b: list[str] = TARGETS, *, share: str | None = "lambda_d", base: Any = None, **kw: Any
) -> AdaptedModel:
    """Adapters ``a`` and ``b`` with random λ, ``share``'s vector copied from a into b."""
    kw_b = kw.pop("kw_b", {})
    base = tiny_llama() if base is None else base
    model = adapt(base, VeraConfig(r=R, target_modules=TARGETS, **kw), "a")
    model.add_adapter("b", VeraConfig(**{"r": R, "target_modules": targets_b, **kw, **kw_b}))
    randomise_lambdas(model)
    if share:
        copy_lambda(model, share, "a", "b")
    return model


def copy_lambda(model: AdaptedModel, which: str, src: str, dst: str, only: str = "") -> None:
    with torch.no_grad():
        for path, layer in model.adapter_layers():
            if {src, dst} <= set(layer.adapter_names) and only in path:
                getattr(layer, f"vera_{which}")[dst].copy_(getattr(layer, f"vera_{which}")[src])


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).detach().abs().max() / ref.detach().abs().max())


def assert_weighted_sum(model: AdaptedModel, names: list[str], weights: list[float], new: str):
    """At every module a source adapts: ΔW(new) = Σ wᵢ ΔWᵢ over the sources present."""
    for _, layer in model.adapter_layers():
        present = [(n, w) for n, w in zip(names, weights, strict=True) if n in layer.adapter_names]
        if present:
            expected = sum(w * layer.delta_weight(n) for n, w in present)
            assert rel(layer.delta_weight(new), expected) <= 1e-6


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=input_ids()).logits


def snapshot(model: AdaptedModel) -> dict[str, Any]:
    return {
        "names": list(model.peft_config),
        "active": list(model.active_adapters),
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "logits": logits(model),
        "basis": basis_of(model).shape,
    }


def assert_unchanged(model: AdaptedModel, before: dict[str, Any]) -> None:
    now = snapshot(model)
    assert all(now[key] == before[key] for key in ("names", "active", "modules", "basis"))
    assert now["state"].keys() == before["state"].keys()
    assert all(torch.equal(v, before["state"][k]) for k, v in now["state"].items())
    assert torch.equal(now["logits"], before["logits"])


@pytest.mark.parametrize(("shared", "summed"), [("lambda_d", "lambda_b"), ("lambda_b", "lambda_d")])
def test_the_shared_vector_is_kept_and_the_other_summed(shared: str, summed: str) -> None:
    model = build(share=shared)
    model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    assert_weighted_sum(model, ["a", "b"], W, "ab")
    for _, layer in model.adapter_layers():
        kept, mixed = getattr(layer, f"vera_{shared}"), getattr(layer, f"vera_{summed}")
        assert torch.equal(kept["ab"], kept["a"])
        assert torch.allclose(mixed["ab"], W[0] * mixed["a"] + W[1] * mixed["b"], atol=1e-6)


@pytest.mark.parametrize("weight", [2.0, -1.5])
def test_a_single_source_scales_lambda_b(weight: float) -> None:
    model = build(share=None)
    model.add_weighted_adapter(["b"], [weight], "b2", combination_type="linear")
    assert_weighted_sum(model, ["b"], [weight], "b2")
    for _, layer in model.adapter_layers():
        assert torch.equal(layer.vera_lambda_d["b2"], layer.vera_lambda_d["b"])
        assert torch.equal(layer.vera_lambda_b["b2"], weight * layer.vera_lambda_b["b"])


def test_each_module_takes_its_own_rule_with_negative_weights() -> None:
    model = build(share=None)
    model.add_adapter("c", VeraConfig(r=R, target_modules=TARGETS))
    randomise_lambdas(model, seed=3)
    for src in ("b", "c"):  # q_proj: one λ_d, v_proj: one λ_b
        copy_lambda(model, "lambda_d", "a", src, only="q_proj")
        copy_lambda(model, "lambda_b", "a", src, only="v_proj")
    weights = [-0.5, 1.25, -2.0]
    model.add_weighted_adapter(["a", "b", "c"], weights, "abc", combination_type="linear")
    assert_weighted_sum(model, ["a", "b", "c"], weights, "abc")


def test_modules_only_some_sources_adapt_combine_the_ones_present() -> None:
    model = build(["q_proj", "up_proj"], basis_shape=BIG)
    model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    assert model.peft_config["ab"].target_modules == ["q_proj", "up_proj", "v_proj"]
    adapted = {p for p, layer in model.adapter_layers() if "ab" in layer.adapter_names}
    assert adapted == {p for p, _ in model.adapter_layers()}
    assert_weighted_sum(model, ["a", "b"], W, "ab")


def test_sources_restricted_differently_target_the_adapted_paths() -> None:
    model = build(TARGETS, kw_b={"layers_to_transform": [0]})
    model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    config = model.peft_config["ab"]
    assert config.target_modules == sorted(p for p, _ in model.adapter_layers())
    assert config.layers_to_transform is None


def test_forward_adds_the_weighted_sum_of_the_sources_outputs() -> None:
    model = adapt(Toy([(12, 10), (6, 9)]), VeraConfig(r=4, target_modules=["l0", "l1"]), "a")
    model.add_adapter("b", VeraConfig(r=4, target_modules=["l0", "l1"]))
    randomise_lambdas(model)
    copy_lambda(model, "lambda_b", "a", "b")
    model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    xs, outs = [torch.randn(3, 12), torch.randn(3, 6)], {}
    with torch.no_grad():
        for name in ("a", "b", "ab"):
            model.set_adapter(name)
            outs[name] = model(xs)
        with model.disable_adapter():
            base = model(xs)
    for i, y in enumerate(base):
        expected = W[0] * (outs["a"][i] - y) + W[1] * (outs["b"][i] - y)
        assert rel(outs["ab"][i] - y, expected) <= 1e-5


def test_both_lambdas_differing_is_refused_naming_the_module() -> None:
    model = build(share=None)
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"cannot combine at model\.layers\.0\.self_attn\.q_proj"):
        model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind", [None, "svd", "cat", "ties", "dare_linear_svd"])
def test_other_combination_types_are_refused(kind: str | None) -> None:
    model = build()
    before = snapshot(model)
    kw = {} if kind is None else {"combination_type": kind}
    with pytest.raises(ConfigError, match="combination_type='linear'"):
        model.add_weighted_adapter(["a", "b"], W, "ab", **kw)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "option",
    [{"svd_rank": 2}, {"svd_clamp": 0.9}, {"density": 0.5}, {"svd_full_matrices": False},
     {"majority_sign_method": "frequency"}, {"generator": torch.Generator()}],
)  # fmt: skip
def test_options_that_cannot_apply_are_refused(option: dict[str, Any]) -> None:
    model = build()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=f"uses none of \\['{next(iter(option))}'\\]"):
        model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear", **option)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kw_b", "forced", "match"),
    [({"r": 4}, {}, "r=8 and adapter 'b' 4"), ({"bias": "vera_only"}, {}, "'b' sets bias="),
     ({"modules_to_save": ["lm_head"]}, {}, "'b' sets modules_to_save"),
     ({}, {"projection_prng_key": 5}, "projection_prng_key=0 and adapter 'b' 5")],
)  # fmt: skip
def test_sources_that_cannot_be_combined_are_refused(
    kw_b: dict[str, Any], forced: dict[str, Any], match: str
) -> None:
    model = build(share=None, kw_b=kw_b)
    for field, value in forced.items():  # adapt refuses this when adding: forced here
        setattr(model.peft_config["b"], field, value)
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    assert_unchanged(model, before)


def test_a_failure_while_loading_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapt.core import state_dict

    model = build()
    before = snapshot(model)
    monkeypatch.setattr(state_dict, "load_state_dict_into", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    assert_unchanged(model, before)


def test_combined_adapter_merges_and_trains() -> None:
    model = build()
    model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    model.set_adapter("ab")
    expected = logits(model)
    model.merge_adapter()
    assert rel(logits(model), expected) < 1e-5
    model.unmerge_adapter()
    model.train()
    model(input_ids=input_ids(), labels=input_ids()).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith(".ab") and "vera_lambda" in n for n in grads)


@pytest.mark.parametrize("save_projection", [True, False])
def test_combined_adapter_saves_and_reloads(tmp_path: Path, save_projection: bool) -> None:
    model = build(save_projection=save_projection)
    model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    model.set_adapter("ab")
    expected = logits(model)
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    reloaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "ab")
    assert torch.equal(logits(reloaded), expected)


def test_a_combined_adapter_still_needs_its_projection_when_loaded_later() -> None:
    model = build()
    model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    lambdas = {k: v for k, v in model.adapter_state_dict("ab").items() if "lambda" in k}
    with pytest.raises(CheckpointError, match=r"holds no base_model\.vera_A"):
        model.load_adapter_state_dict(lambdas, "ab")


def test_adapters_loaded_from_files_combine(tmp_path: Path) -> None:
    model = build()
    model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    model.set_adapter("ab")
    expected = logits(model)
    folders = save_both(model, tmp_path)
    loaded = AdaptedModel.from_pretrained(tiny_llama(), folders[0], "a")
    loaded.load_adapter(folders[1], "b")
    loaded.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    loaded.set_adapter("ab")
    assert torch.equal(logits(loaded), expected)


def save_both(model: AdaptedModel, root: Path, pairs: tuple[str, ...] = ("a", "b")) -> list[Path]:
    model.save_pretrained(root, selected_adapters=list(pairs))
    return [root / name for name in pairs]


@pytest.mark.parametrize(
    ("targets_b", "kw", "dtype"),
    [(TARGETS, {}, torch.float32), (TARGETS, {"save_projection": False}, torch.float32),
     (TARGETS, {}, torch.bfloat16), (["q_proj", "up_proj"], {"basis_shape": BIG}, torch.float32),
     (["q_proj", "up_proj"], {"basis_shape": BIG, "save_projection": False}, torch.float32)],
)  # fmt: skip
@pytest.mark.filterwarnings(NO_PROJECTION_WARNING)
def test_offline_is_the_in_model_combination_byte_for_byte(
    tmp_path: Path, targets_b: list[str], kw: dict[str, Any], dtype: torch.dtype
) -> None:
    model = build(targets_b, base=tiny_llama().to(dtype), **kw)
    model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    folders = save_both(model, tmp_path / "src")
    model.save_pretrained(tmp_path / "in", selected_adapters=["ab"])
    out = combine_saved_adapters(
        folders, W, tmp_path / "off", combination_type="linear", union_targets=targets_b != TARGETS
    )
    weights = "adapter_model.safetensors"
    assert (out / weights).read_bytes() == (tmp_path / "in" / "ab" / weights).read_bytes()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "in" / "ab" / "adapter_config.json").read_text())
    projection = kw.get("save_projection", True)
    assert ("base_model.vera_A" in load_file(str(out / weights))) is projection


def two_models(tmp_path: Path, kw_a: dict[str, Any], kw_b: dict[str, Any]) -> list[Path]:
    folders = []
    for name, kw in (("a", kw_a), ("b", kw_b)):
        model = adapt(tiny_llama(), VeraConfig(r=R, target_modules=TARGETS, **kw), name)
        randomise_lambdas(model)
        folders += save_both(model, tmp_path / name, (name,))
    return folders


@pytest.mark.parametrize(
    ("kw_a", "kw_b", "match"),
    [({}, {"basis_shape": BIG}, "saved projections .* differ"),
     ({}, {"projection_prng_key": 1}, "projection_prng_key=0 and adapter #2 1"),
     ({}, {"save_projection": False}, "adapter #1 saved its projection and adapter #2 did not"),
     ({"save_projection": False}, {"save_projection": False, "basis_shape": BIG}, "basis_shape")],
)  # fmt: skip
@pytest.mark.filterwarnings(NO_PROJECTION_WARNING)
def test_offline_refuses_adapters_of_different_bases(
    tmp_path: Path, kw_a: dict[str, Any], kw_b: dict[str, Any], match: str
) -> None:
    folders = two_models(tmp_path, kw_a, kw_b)
    with pytest.raises(ConfigError, match=match):
        combine_saved_adapters(folders, W, tmp_path / "off", combination_type="linear")
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize(
    ("kw", "kind", "match"),
    [({"share": None}, "svd", "pass combination_type='linear'"),
     ({"share": None}, "linear", r"cannot combine at model\.layers\.0"),
     ({"targets_b": ["q_proj", "o_proj"], "save_projection": False}, "linear",
      "adapt different modules and were saved without")],
)  # fmt: skip
def test_offline_refuses(tmp_path: Path, kw: dict[str, Any], kind: str, match: str) -> None:
    folders = save_both(build(**kw), tmp_path / "src")
    with pytest.raises(ConfigError, match=match):
        combine_saved_adapters(
            folders, W, tmp_path / "off", combination_type=kind, union_targets=True
        )
    assert not (tmp_path / "off").exists()


def test_the_command_line_combines_vera_adapters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = save_both(build(), tmp_path / "src")
    argv = ["combine", "--adapter", str(folders[0]), "--adapter", str(folders[1]), "--out"]
    assert main([*argv, str(tmp_path / "o"), "--weights", "0.7,-0.4", "--type", "linear"]) == 0
    assert "VERA adapter, r = 8" in capsys.readouterr().out
    assert main([*argv, str(tmp_path / "p"), "--weights", "1,1"]) == 1
    assert "pass combination_type='linear'" in capsys.readouterr().err


def test_offline_refuses_a_stray_tensor(tmp_path: Path) -> None:
    folders = save_both(build(), tmp_path / "src")
    file = folders[1] / "adapter_model.safetensors"
    tensors = dict(load_file(str(file)))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"adapter #2 holds .*q_proj\.bias"):
        combine_saved_adapters(folders, W, tmp_path / "off", combination_type="linear")


def toy_pair(dtype: torch.dtype) -> tuple[AdaptedModel, list[torch.Tensor]]:
    torch.manual_seed(0)
    config = VeraConfig(r=8, target_modules=["l0", "l1"])
    model = adapt(Toy([(32, 24), (16, 40)]).to(dtype), config, "a")
    model.add_adapter("b", VeraConfig(r=8, target_modules=["l0", "l1"]))
    randomise_lambdas(model)
    copy_lambda(model, "lambda_d", "a", "b")
    model.add_weighted_adapter(["a", "b"], W, "ab", combination_type="linear")
    model.set_adapter("ab")
    return model, [torch.randn(4, 32), torch.randn(4, 16)]


def definition(model: AdaptedModel, xs: list[torch.Tensor], names: list[str]) -> list[torch.Tensor]:
    """base(x) + Σ wᵢ ΔWᵢ x in float32, from the sources' own ΔW."""
    layers, out = dict(model.adapter_layers()), []
    for i, x in enumerate(xs):
        layer = layers[f"l{i}"]
        base = layer.get_base_layer()
        y = torch.nn.functional.linear(x, base.weight.float(), base.bias.float())
        delta = sum(w * layer.delta_weight(n).float() for n, w in zip(names, W, strict=True))
        out.append(y + x @ delta.T)
    return out


@pytest.mark.parametrize(
    ("base_dtype", "autocast"),
    [(torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32 base, bf16 autocast", "bf16 base", "bf16 base, bf16 autocast"],
)
def test_combined_output_matches_the_definition_in_bf16(
    base_dtype: torch.dtype, autocast: bool
) -> None:
    model, xs = toy_pair(base_dtype)
    xs = [x.to(base_dtype) for x in xs]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), context:
        got = model(xs)
    with torch.no_grad():
        floats = [x.float() for x in xs]
        expected = definition(model, floats, ["a", "b"])
        wrong = definition(model, floats, ["a", "a"])  # another combination: the scale of a miss
    for y, ref, bad in zip(got, expected, wrong, strict=True):
        assert y.dtype == torch.bfloat16
        assert rel(y.float(), ref) < 2e-2 < rel(bad, ref)
