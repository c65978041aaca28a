"""Hot-swapping LoRA adapters (adapt.lora.hotswap): a swap equals a fresh load of the new
adapter, copies into the same storage, and refuses (changing nothing) what it cannot carry;
prepare_model_for_compiled_hotswap pads exactly, and a compiled, prepared model swaps adapters
of other ranks and alphas without recompiling."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_testutils import ids, tiny_llama
from torch import nn
from torch._dynamo.testing import CompileCounter

from adapt.core import AdaptedModel, AdapterStateError, CheckpointError, ConfigError, adapt
from adapt.core.testing import randomise_adapters
from adapt.lora import LoraConfig, LoraLayer, hotswap_adapter, prepare_model_for_compiled_hotswap
from adapt.lora.hotswap import checkpoint_tensors

TARGETS = ["q_proj", "v_proj", "embed_tokens"]
TOL = 1e-6


@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama().eval()


@pytest.fixture
def saved(base: nn.Module, tmp_path: Path) -> Callable[..., Path]:
    """``saved(name, seed, **config)``: a randomised adapter for ``base``, saved; its folder."""

    def save(name: str, seed: int, model: nn.Module | None = None, **kwargs: Any) -> Path:
        kwargs.setdefault("target_modules", TARGETS)
        adapted = adapt(copy.deepcopy(base if model is None else model), LoraConfig(**kwargs))
        randomise_adapters(adapted, seed=seed)
        adapted.save_pretrained(tmp_path / name)
        return tmp_path / name

    return save


def fresh(base: nn.Module, path: Path) -> AdaptedModel:
    return AdaptedModel.from_pretrained(copy.deepcopy(base), path).eval()


def logits(model: nn.Module, batch: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids() if batch is None else batch).logits.float()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def lora_layers(model: AdaptedModel) -> dict[str, LoraLayer]:
    return {p: m for p, m in model.adapter_layers() if isinstance(m, LoraLayer)}


def snapshot(model: AdaptedModel) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scalings = {
        p: {n: float(s) for n, s in layer.scaling.items()}
        for p, layer in lora_layers(model).items()
    }
    return (
        state,
        {"config": model.peft_config["default"].to_dict(), "scalings": scalings},
        logits(model),
    )


def assert_unchanged(model: AdaptedModel, before: tuple[Any, Any, Any]) -> None:
    state, meta, out = snapshot(model)
    assert state.keys() == before[0].keys()
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), key
    assert meta == before[1]
    assert torch.equal(out, before[2])


# -- definition --------------------------------------------------------------------------------
def test_same_rank_swap_equals_a_fresh_load_in_the_same_storage(base, saved) -> None:
    first = saved("a", 1, r=4, lora_alpha=8)
    second = saved("b", 2, r=4, lora_alpha=3, use_rslora=True, alpha_pattern={"v_proj": 5})
    model = fresh(base, first)
    pointers = {k: v.data_ptr() for k, v in model.adapter_state_dict("default").items()}
    hotswap_adapter(model, second, torch_device="cpu")
    assert diff(logits(model), logits(fresh(base, second))) <= TOL
    assert {k: v.data_ptr() for k, v in model.adapter_state_dict("default").items()} == pointers
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 3, True)
    assert config.alpha_pattern == {"v_proj": 5} and config.inference_mode
    layer = lora_layers(model)["model.layers.0.self_attn.v_proj"]
    assert layer.scaling["default"] == 5 / 2 and layer.lora_alpha["default"] == 5


def test_fewer_targets_zero_the_rest(base, saved) -> None:
    first = saved("a", 1, r=4)
    subset = saved("b", 2, r=4, target_modules=["q_proj"])
    model = fresh(base, first)
    hotswap_adapter(model, subset)
    assert diff(logits(model), logits(fresh(base, subset))) <= TOL
    v_proj = lora_layers(model)["model.layers.1.self_attn.v_proj"]
    assert not v_proj.lora_B["default"].weight.any()
    assert model.peft_config["default"].target_modules == ["q_proj"]


def test_prepare_pads_exactly_and_holds_scalings_as_tensors(base, saved) -> None:
    path = saved("a", 1, r=4, lora_alpha=8, rank_pattern={"q_proj": 2})
    model = fresh(base, path)
    before = logits(model)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert diff(logits(model), before) <= TOL
    layers = lora_layers(model)
    q_proj, embed = layers["model.layers.0.self_attn.q_proj"], layers["model.embed_tokens"]
    a, b = q_proj.lora_A["default"].weight, q_proj.lora_B["default"].weight
    assert a.shape[0] == b.shape[1] == 8 and q_proj.lora_A["default"].out_features == 8
    assert not a[2:].any() and not b[:, 2:].any() and a[:2].any()
    assert embed.lora_embedding_A["default"].shape[0] == 8
    assert not embed.lora_embedding_B["default"][:, 4:].any()
    assert isinstance(q_proj.scaling["default"], torch.Tensor) and q_proj.r["default"] == 2
    assert model.peft_config["default"].r == 4  # the config keeps the true ranks


def test_prepared_model_swaps_smaller_and_larger_ranks(base, saved) -> None:
    model = fresh(base, saved("a", 1, r=4))
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    for i, kwargs in enumerate(
        [{"r": 8, "lora_alpha": 2}, {"r": 2, "rank_pattern": {"q_proj": 6}}]
    ):
        path = saved(f"n{i}", 10 + i, **kwargs)
        hotswap_adapter(model, path)
        assert diff(logits(model), logits(fresh(base, path))) <= TOL
        assert model.peft_config["default"].r == kwargs["r"]


def test_default_target_rank_is_the_largest_of_model_and_configs(base, saved) -> None:
    model = fresh(base, saved("a", 1, r=4))
    prepare_model_for_compiled_hotswap(model, config={"x": LoraConfig(r=2, rank_pattern={"q": 6})})
    assert lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_A["default"].out_features == 6
    model = fresh(base, saved("b", 1, r=4))
    prepare_model_for_compiled_hotswap(model)
    assert lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_A["default"].out_features == 4


# -- torch.compile -----------------------------------------------------------------------------
@pytest.mark.compile
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_five_swaps_of_other_ranks_and_alphas_compile_once(
    base, saved, grad: bool, dora: bool
) -> None:
    torch._dynamo.reset()
    fewer = TARGETS if dora else ["q_proj", "v_proj"]  # DoRA swaps need the same targets
    paths = [
        saved("s0", 20, r=2, lora_alpha=3, use_dora=dora),
        saved("s1", 21, r=8, lora_alpha=16, use_rslora=True, use_dora=dora),
        saved("s2", 22, r=4, lora_alpha=1, target_modules=fewer, use_dora=dora),
        saved("s3", 23, r=6, lora_alpha=7, alpha_pattern={"q_proj": 2}, use_dora=dora),
        saved("s4", 24, r=1, lora_alpha=4, use_dora=dora),
    ]
    model = fresh(base, saved("first", 1, r=4, lora_alpha=8, use_dora=dora))
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)

    def run() -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return compiled(input_ids=ids()).logits.detach()

    run()
    assert counter.frame_count == 1
    for path in paths:
        hotswap_adapter(compiled, path)
        assert diff(run(), logits(fresh(base, path))) <= TOL
    assert counter.frame_count == 1, f"{counter.frame_count - 1} recompiles after the first"


@pytest.mark.compile
def test_long_inputs_take_the_merged_path_without_recompiles(base, saved) -> None:
    # no-grad batches of many rows run as x (W + ΔW)ᵀ; the tensor scaling scales the smaller
    # factor (LoraLinear.add_delta_weight): one graph, a swap recompiles nothing, outputs exact
    torch._dynamo.reset()
    long = ids(length=32)
    model = fresh(base, saved("a", 1, r=4, lora_alpha=8))
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    logits(compiled, long)
    frames = counter.frame_count
    for i, (r, alpha) in enumerate([(8, 3), (2, 5)]):
        path = saved(f"n{i}", 10 + i, r=r, lora_alpha=alpha)
        hotswap_adapter(compiled, path)
        assert diff(logits(compiled, long), logits(fresh(base, path), long)) <= TOL
    assert counter.frame_count == frames == 1


@pytest.mark.compile
def test_unprepared_swap_of_another_alpha_recompiles_once(base, saved) -> None:
    torch._dynamo.reset()
    model = fresh(base, saved("a", 1, r=4, lora_alpha=8))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(input_ids=ids())
        hotswap_adapter(compiled, saved("b", 2, r=4, lora_alpha=8))
        compiled(input_ids=ids())
        assert counter.frame_count == 1  # same scaling: same graph
        hotswap_adapter(compiled, saved("c", 3, r=4, lora_alpha=2))
        compiled(input_ids=ids())
    assert counter.frame_count == 2  # the scaling is a Python float the graph guards on


@pytest.mark.compile
def test_prepare_refuses_a_compiled_model_unless_told(base, saved) -> None:
    compiled = torch.compile(fresh(base, saved("a", 1, r=4)), backend="eager")
    with pytest.raises(AdapterStateError, match=r"before torch\.compile"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8)
    with pytest.warns(UserWarning, match="compiled model"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8, check_compiled="warn")
    prepare_model_for_compiled_hotswap(compiled, target_rank=8, check_compiled="ignore")
    with pytest.raises(ConfigError, match="'error', 'warn' or 'ignore'"):
        prepare_model_for_compiled_hotswap(compiled, check_compiled="loud")  # type: ignore[arg-type]


# -- variants, layer types, dtypes -------------------------------------------------------------
@pytest.mark.parametrize("prepare", [False, True], ids=["same_rank", "prepared"])
@pytest.mark.parametrize("kind", ["dora", "lora_bias"])
def test_dora_magnitudes_and_lora_bias_are_swapped(base, saved, kind: str, prepare: bool) -> None:
    extra = {"use_dora": True} if kind == "dora" else {"lora_bias": True}
    targets = ["q_proj", "v_proj"] if kind == "lora_bias" else TARGETS  # no bias on embeddings
    model = fresh(base, saved("a", 1, r=4, target_modules=targets, **extra))
    if prepare:
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    path = saved("b", 2, r=8 if prepare else 4, lora_alpha=3, target_modules=targets, **extra)
    hotswap_adapter(model, path)
    assert diff(logits(model), logits(fresh(base, path))) <= TOL


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_convolutions_pad_and_swap(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, x = ConvNet().eval(), torch.randn(2, 3, 8, 8)
    paths = []
    for i, r in enumerate([2, 4]):
        adapted = adapt(copy.deepcopy(net), LoraConfig(r=r, lora_alpha=3, target_modules=["conv"]))
        randomise_adapters(adapted, seed=i)
        adapted.save_pretrained(tmp_path / str(i))
        paths.append(tmp_path / str(i))
    model = AdaptedModel.from_pretrained(copy.deepcopy(net), paths[0]).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    hotswap_adapter(model, paths[1])
    want = AdaptedModel.from_pretrained(copy.deepcopy(net), paths[1]).eval()
    with torch.no_grad():
        assert diff(model(x), want(x)) <= TOL


def test_bf16_base(base, saved) -> None:
    half = copy.deepcopy(base).to(torch.bfloat16)
    first, second = saved("a", 1, model=half, r=4), saved("b", 2, model=half, r=8, lora_alpha=3)
    model = fresh(half, first)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    hotswap_adapter(model, second)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A["default"].weight.dtype == torch.float32  # adapters stay float32
    assert diff(logits(model), logits(fresh(half, second))) == 0


# -- refusals: each names the problem and the fix, and changes nothing -------------------------
def _edit_config(path: Path, **changes: Any) -> Path:
    file = path / "adapter_config.json"
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))
    return path


REFUSALS: dict[str, tuple[dict[str, Any], dict[str, Any], type[Exception], str]] = {
    "more targets": (
        {"target_modules": ["q_proj"]},
        {},
        CheckpointError,
        r"does not: \['model.embed_tokens', 'model.layers.0.self_attn.v_proj'",
    ),
    "larger rank": (
        {},
        {"r": 8},
        CheckpointError,
        r"prepare_model_for_compiled_hotswap\(model, target_rank=R\)",
    ),
    "smaller rank unprepared": ({}, {"r": 2}, CheckpointError, "ranks must be equal"),
    "dropout": ({"lora_dropout": 0.1}, {"lora_dropout": 0.05}, ConfigError, '"lora_dropout": 0.1'),
    "dora": ({}, {"use_dora": True}, ConfigError, "use_dora"),
    "dora fewer targets": (
        {"use_dora": True},
        {"use_dora": True, "target_modules": ["q_proj"]},
        ConfigError,
        "cannot be zeroed there",
    ),
    "lora_bias": (
        {"target_modules": ["q_proj"]},
        {"target_modules": ["q_proj"], "lora_bias": True},
        ConfigError,
        "lora_bias",
    ),
    "modules_to_save": ({}, {"modules_to_save": ["lm_head"]}, ConfigError, "modules_to_save"),
    "bias": ({}, {"bias": "all"}, ConfigError, "base model's biases"),
    "fan_in_fan_out": ({}, {"fan_in_fan_out": True}, ConfigError, "fan_in_fan_out"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_leave_the_model_bitwise_unchanged(base, saved, case: str) -> None:
    loaded, new, error, message = REFUSALS[case]
    model = fresh(base, saved("a", 1, **{"r": 4, **loaded}))
    before = snapshot(model)
    if case == "fan_in_fan_out":  # only the config says it (LoRA on nn.Linear ignores it)
        path = _edit_config(saved("b", 2, r=4), fan_in_fan_out=True)
    else:
        path = saved("b", 2, **{"r": 4, **new})
    with pytest.raises(error, match=message):
        hotswap_adapter(model, path)
    assert_unchanged(model, before)


def test_prepared_rank_above_the_padding_is_refused(base, saved) -> None:
    model = fresh(base, saved("a", 1, r=4))
    prepare_model_for_compiled_hotswap(model, target_rank=6)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"rank 8, the loaded slot holds 6"):
        hotswap_adapter(model, saved("b", 2, r=8))
    assert_unchanged(model, before)


def test_other_refusals(base, saved, tmp_path: Path) -> None:
    model = fresh(base, saved("a", 1, r=4))
    before = snapshot(model)
    with pytest.raises(AdapterStateError, match=r"no adapter named 'other'.*load the first"):
        hotswap_adapter(model, saved("b", 2, r=4), adapter_name="other")
    vera = _edit_config(saved("c", 3, r=4), peft_type="VERA")
    with pytest.raises(ConfigError, match=r"VERA adapter.*load_adapter"):
        hotswap_adapter(model, vera)
    wide = tiny_llama(hidden_size=48, vocab_size=64)
    with pytest.raises(CheckpointError, match="saved for another base model"):
        hotswap_adapter(model, saved("d", 4, model=wide, r=4))
    bad = saved("e", 5, r=4)
    from safetensors.torch import load_file, save_file

    tensors = load_file(bad / "adapter_model.safetensors")
    next(iter(tensors.values()))[0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="NaN"):
        hotswap_adapter(model, bad)
    with pytest.raises(CheckpointError, match="no adapter at"):
        hotswap_adapter(model, tmp_path / "missing")
    assert_unchanged(model, before)
    model.merge_adapter()
    with pytest.raises(AdapterStateError, match="unmerge_adapter"):
        hotswap_adapter(model, saved("f", 6, r=4))
    with pytest.raises(TypeError, match="model adapted by adapt"):
        hotswap_adapter(copy.deepcopy(base), saved("g", 7, r=4))


def test_prepare_refusals(base, saved) -> None:
    model = fresh(base, saved("a", 1, r=4))
    with pytest.raises(ConfigError, match="target_rank >= 4"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)
    with pytest.raises(ConfigError, match="positive integer"):
        prepare_model_for_compiled_hotswap(model, target_rank=0)
    assert lora_layers(model)["model.embed_tokens"].lora_embedding_A["default"].shape[0] == 4
    assert not isinstance(lora_layers(model)["model.embed_tokens"].scaling["default"], torch.Tensor)
    with pytest.raises(TypeError, match="model adapted by adapt"):
        prepare_model_for_compiled_hotswap(copy.deepcopy(base))


# -- saving after padding and swaps ------------------------------------------------------------
def test_saving_after_padding_and_swaps_writes_the_adapter_as_loaded(base, saved, tmp_path) -> None:
    from safetensors.torch import load_file

    model = fresh(base, saved("a", 1, r=4))
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    for source in [saved("b", 2, r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"])]:
        hotswap_adapter(model, source)
        prepare_model_for_compiled_hotswap(model, target_rank=8)  # again: the ranks stay known
        model.save_pretrained(tmp_path / "out")
        written = load_file(tmp_path / "out" / "adapter_model.safetensors")
        original = load_file(source / "adapter_model.safetensors")
        assert written.keys() == original.keys()
        assert all(torch.equal(written[k], original[k]) for k in original)
        config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (2, 5)
        assert diff(logits(fresh(base, tmp_path / "out")), logits(model)) <= TOL


def test_a_readded_adapter_is_not_trimmed_by_an_old_record(base, saved, tmp_path) -> None:
    model = fresh(base, saved("a", 1, r=4))
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    model.delete_adapter("default")
    model.add_adapter("default", LoraConfig(r=8, target_modules=TARGETS))
    tensors = model.adapter_state_dict("default")
    kept = checkpoint_tensors(model, "default", tensors)
    assert all(kept[k].shape == v.shape for k, v in tensors.items())


def test_saving_refuses_to_cut_off_values(base, saved, tmp_path: Path) -> None:
    model = fresh(base, saved("a", 1, r=4))
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    with torch.no_grad():
        lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_A["default"].weight[6] = 1.0
    with pytest.raises(CheckpointError, match=r"beyond the adapter's rank \(4\) is not zero"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
