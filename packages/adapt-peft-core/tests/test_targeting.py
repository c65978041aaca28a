"""Target matching: suffix names, regexes, all-linear, exclusions, layer selection, errors."""

from __future__ import annotations

import re
import types
from typing import Any

import pytest
import torch
from core_testutils import Stack, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adapt.core import AdaptedModel, AdapterLayer, TargetError, adapt
from adapt.core.targeting import (
    ALL_LINEAR,
    find_targets,
    is_linear,
    layer_index,
    matches_name,
    output_head_names,
)
from adapt.core.testing import ToyConfig

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def test_suffix_match_at_dot_boundary() -> None:
    model = Stack()
    assert find_targets(model, ["q_proj"]) == [f"layers.{i}.self_attn.q_proj" for i in range(3)]
    assert find_targets(model, ["self_attn.q_proj"]) == find_targets(model, ["q_proj"])
    assert find_targets(model, ["layers.1.self_attn.v_proj"]) == ["layers.1.self_attn.v_proj"]
    # "proj" is not a component name: it must not match q_proj, up_proj, ...
    with pytest.raises(TargetError, match="matched no module"):
        find_targets(model, ["proj"])
    # nor does a partial component on the left
    with pytest.raises(TargetError):
        find_targets(model, ["attn.q_proj"])


def test_matches_name_examples() -> None:
    assert matches_name("a.q_proj", ["q_proj"])
    assert matches_name("q_proj", ["q_proj"])
    assert not matches_name("a.q_proj", ["proj"])
    assert not matches_name("a.xq_proj", ["q_proj"])
    assert matches_name("a.b.c", ["x", "b.c"])
    assert not matches_name("a.b.c", [])


def test_regex_must_match_the_whole_path() -> None:
    model = Stack()
    assert find_targets(model, r".*\.q_proj") == [f"layers.{i}.self_attn.q_proj" for i in range(3)]
    assert find_targets(model, r"layers\.0\..*_proj") == [
        *(f"layers.0.self_attn.{n}" for n in ATTN),
        "layers.0.up_proj",
    ]
    assert find_targets(model, r"layers\.[12]\.self_attn\.(q|v)_proj") == [
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj",
        "layers.2.self_attn.q_proj",
        "layers.2.self_attn.v_proj",
    ]
    # a bare name as a string is a regex: it matches no full path, and the error says why
    with pytest.raises(TargetError) as info:
        find_targets(model, "q_proj")
    assert "regular expression matched against the full module path" in str(info.value)


def test_all_linear_excludes_the_output_head_of_a_transformers_model() -> None:
    model = tiny_llama()
    found = find_targets(model, ALL_LINEAR)
    assert "lm_head" not in found
    leaves = {p.rsplit(".", 1)[-1] for p in found}
    assert leaves == {*ATTN, "gate_proj", "up_proj", "down_proj"}
    assert len(found) == 2 * 7
    assert all(isinstance(model.get_submodule(p), nn.Linear) for p in found)
    assert output_head_names(model) == {"lm_head"}

    adapted = adapt(model, ToyConfig(target_modules=ALL_LINEAR))
    paths = [p for p, _ in adapted.adapter_layers()]
    assert paths == found
    assert not isinstance(adapted.model.lm_head, AdapterLayer)


def test_all_linear_head_by_name_without_get_output_embeddings() -> None:
    model = Stack()  # plain nn.Module: the head is found by its name, lm_head
    found = find_targets(model, ALL_LINEAR)
    assert "lm_head" not in found
    assert len(found) == 3 * 5


def test_all_linear_includes_transformers_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = Conv1D(6, 2)
            self.emb = nn.Embedding(3, 2)
            self.classifier = nn.Linear(2, 2)

    assert is_linear(Conv1D(2, 2)) and not is_linear(nn.Embedding(2, 2))
    assert find_targets(Tiny(), ALL_LINEAR) == ["c_attn"]


def test_exclude_modules() -> None:
    model = Stack()
    found = find_targets(model, ["q_proj", "v_proj"], exclude_modules=["layers.1.self_attn.q_proj"])
    assert found == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
        "layers.1.self_attn.v_proj",
        "layers.2.self_attn.q_proj",
        "layers.2.self_attn.v_proj",
    ]
    found = find_targets(model, ALL_LINEAR, exclude_modules=r".*\.(k|o)_proj|.*up_proj")
    assert {p.rsplit(".", 1)[-1] for p in found} == {"q_proj", "v_proj"}
    with pytest.raises(TargetError, match="matched no module"):
        find_targets(model, ["q_proj"], exclude_modules=["q_proj"])


def test_layers_to_transform_and_layers_pattern() -> None:
    model = Stack()
    assert find_targets(model, ["q_proj"], layers_to_transform=1) == ["layers.1.self_attn.q_proj"]
    assert find_targets(model, ["q_proj"], layers_to_transform=[0, 2], layers_pattern="layers") == [
        "layers.0.self_attn.q_proj",
        "layers.2.self_attn.q_proj",
    ]
    # a pattern that names no path component selects nothing, and the error names the layers
    with pytest.raises(TargetError) as info:
        find_targets(model, ["q_proj"], layers_to_transform=[1], layers_pattern="blocks")
    assert "in layers [1]" in str(info.value)
    with pytest.raises(TargetError, match="in layers 7"):
        find_targets(model, ["q_proj"], layers_to_transform=7)


def test_layers_to_transform_on_llama() -> None:
    model = tiny_llama()
    cfg = ToyConfig(
        target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"
    )
    adapted = adapt(model, cfg)
    assert [p for p, _ in adapted.adapter_layers()] == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_layer_index() -> None:
    assert layer_index("model.layers.3.mlp", None) == 3
    assert layer_index("transformer.h.11.attn", None) == 11
    assert layer_index("layers.0", "layers") == 0
    assert layer_index("mylayers.3.x", "layers") is None  # component boundary
    assert layer_index("model.blocks.2.x", ["layers", "blocks"]) == 2
    assert layer_index("model.embed", None) is None


def test_no_match_suggests_close_names() -> None:
    with pytest.raises(TargetError) as info:
        find_targets(Stack(), ["q_prj"])
    msg = str(info.value)
    assert "'q_prj'" in msg and "Stack" in msg
    assert "Did you mean: 'q_proj'" in msg
    assert "Candidate module names:" in msg and "v_proj" in msg


def test_no_match_through_adapt_leaves_the_model_alone() -> None:
    model = Stack()
    with pytest.raises(TargetError, match="Did you mean: 'q_proj'"):
        adapt(model, ToyConfig(target_modules=["q_prj"]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_target_modules_unset() -> None:
    with pytest.raises(TargetError) as info:
        find_targets(Stack(), None)
    msg = str(info.value)
    assert "target_modules is not set" in msg and "'all-linear'" in msg
    with pytest.raises(TargetError, match="target_modules is not set"):
        adapt(Stack(), ToyConfig())


def test_adapted_modules_match_by_their_own_path_not_their_insides(mlp: nn.Module) -> None:
    adapted = adapt(mlp, ToyConfig(target_modules=["up"]))
    # "base_layer" lives inside the adapter layer: never a target
    with pytest.raises(TargetError, match="matched no module"):
        adapted.add_adapter("b", ToyConfig(target_modules=["base_layer"]))
    # all-linear sees the adapter layer as the linear it wraps and adds to it in place
    adapted.add_adapter("c", ToyConfig(target_modules=ALL_LINEAR, exclude_modules=["head"]))
    layers = dict(adapted.adapter_layers())
    assert sorted(layers) == ["down", "up"]
    assert layers["up"].adapter_names == ["default", "c"]
    assert not isinstance(layers["up"].base_layer, AdapterLayer)


# -- properties --------------------------------------------------------------------------------

COMPONENTS = ["q_proj", "proj", "q", "attn", "layers", "0", "1", "mlp", "v_proj", "x_q_proj"]
component = st.sampled_from(COMPONENTS)
paths = st.lists(component, min_size=1, max_size=5)


@given(path=paths, name=st.lists(component, min_size=1, max_size=3))
def test_suffix_match_is_a_component_suffix(path: list[str], name: list[str]) -> None:
    expected = len(name) <= len(path) and path[-len(name) :] == name
    assert matches_name(".".join(path), [".".join(name)]) is expected


@given(path=paths, extra=component)
def test_escaped_regex_matches_exactly_its_path(path: list[str], extra: str) -> None:
    text = ".".join(path)
    assert matches_name(text, re.escape(text))
    assert not matches_name(f"{text}.{extra}", re.escape(text))
    assert not matches_name(f"{extra}.{text}", re.escape(text))


Tree = dict[str, Any]
trees = st.recursive(
    st.none(),
    lambda children: st.dictionaries(component, children, min_size=1, max_size=3),
    max_leaves=12,
).filter(lambda t: isinstance(t, dict))


def build(tree: Tree) -> nn.Module:
    root = nn.Module()
    for key, sub in tree.items():
        root.add_module(key, nn.Linear(2, 2) if sub is None else build(sub))
    return root


@settings(max_examples=60, deadline=None)
@given(tree=trees, name=st.lists(component, min_size=1, max_size=2))
def test_find_targets_on_random_trees(tree: Tree, name: list[str]) -> None:
    model = build(tree)
    wanted = ".".join(name)
    expected = [
        p for p, _ in model.named_modules() if p and (p == wanted or p.endswith("." + wanted))
    ]
    if expected:
        assert find_targets(model, [wanted]) == expected
        for p in expected:
            assert p.split(".")[-len(name) :] == name
    else:
        with pytest.raises(TargetError, match="matched no module"):
            find_targets(model, [wanted])


@settings(max_examples=60, deadline=None)
@given(tree=trees)
def test_all_linear_on_random_trees_is_every_linear(tree: Tree) -> None:
    model = build(tree)
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert find_targets(model, ALL_LINEAR) == linears


def test_adapted_model_targets_match_find_targets() -> None:
    model = Stack()
    expected = find_targets(model, ["q_proj", "up_proj"])
    adapted = AdaptedModel(model, ToyConfig(target_modules=["q_proj", "up_proj"]))
    assert [p for p, _ in adapted.adapter_layers()] == expected
    assert torch.equal(
        adapted.model.layers[0].up_proj.base_layer.weight, model.layers[0].up_proj.weight
    )


def test_target_modules_unset_on_a_model_type_without_a_default_names_it() -> None:
    model = Stack()
    model.config = {"model_type": "not-a-real-arch"}  # type: ignore[assignment]
    config = ToyConfig()
    with pytest.raises(TargetError, match="has no default for model type 'not-a-real-arch'"):
        adapt(model, config)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert config.target_modules is None


def test_a_failed_add_with_default_targets_leaves_the_config_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from adapt.core.testing import ToyLayer, ToyMethod

    monkeypatch.setattr(ToyMethod, "default_target_modules", {"toy-arch": ("q_proj",)})

    def broken(self: ToyLayer, *args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ToyLayer, "update_layer", broken)
    model = Stack()
    model.config = types.SimpleNamespace(model_type="toy-arch")  # type: ignore[assignment]
    config = ToyConfig()
    with pytest.raises(RuntimeError, match="disk on fire"):
        adapt(model, config)
    assert config.target_modules is None
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_target_modules_unset_uses_the_method_default_for_the_model_type(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from adapt.core.testing import ToyMethod

    monkeypatch.setattr(ToyMethod, "default_target_modules", {"toy-arch": ("q_proj",)})
    model = Stack()
    model.config = types.SimpleNamespace(model_type="toy-arch")  # type: ignore[assignment]
    config = ToyConfig()
    adapted = adapt(model, config)
    # as in PEFT, the config now says which modules it took, and is the model's config
    assert adapted.peft_config["default"] is config
    assert config.target_modules == ["q_proj"]
    paths = [path for path, _ in adapted.adapter_layers()]
    assert paths and all(path.endswith("q_proj") for path in paths)
