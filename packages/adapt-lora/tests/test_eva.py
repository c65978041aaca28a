"""EVA (``init_lora_weights="eva"``, :func:`adapt.lora.initialize_lora_eva_weights`) against its
definition: ``lora_A`` holds the top principal directions of each layer's centred input tokens
(a direct SVD of every token collected), B = 0 so the output at init is the base's, the ranks
share out the budget ``Σ r`` (a layer may get 0 and go back to its base module), α follows the
rank, whitening divides by √singular value, padding and masked labels are left out, q/k/v share
one decomposition, and every refusal (or failure part-way) leaves the model as it was.
Checkpoints reload the new shapes. (Against PEFT: tests/interop/test_eva_interop.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_testutils import tiny_llama
from torch import nn

import adapt.lora.eva_fit as eva_fit
from adapt.core import AdaptedModel, AdapterStateError, ConfigError, adapt
from adapt.lora import EvaConfig, LoraConfig, LoraLinear, get_eva_state_dict
from adapt.lora import initialize_lora_eva_weights as init_eva

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAIR_KW: dict[str, Any] = dict(
    forward_fn=lambda m, batch: m(*batch),
    prepare_model_inputs_fn=None,
    prepare_layer_inputs_fn=None,
    show_progress_bar=False,
)


class Pair(nn.Module):
    """``a(x) + b(y)``: two linear layers on inputs of the test's choosing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 8)
        self.b = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.a(x) + self.b(y)
        return out


def pair_batches(n: int = 3, rows: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """x: isotropic noise in 32 dimensions (flat spectrum); y: exactly rank 4 in 16 dimensions
    (an offset plus four orthogonal directions of std 2, 1.8, 1.6, 1.4)."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 4, generator=gen))[0].T
    scales = torch.tensor([2.0, 1.8, 1.6, 1.4])
    offset = torch.randn(16, generator=gen)
    out = []
    for _ in range(n):
        x = torch.randn(rows, 32, generator=gen)
        y = (torch.randn(rows, 4, generator=gen) * scales) @ basis + offset
        out.append((x, y))
    return out


def pair_model(**eva: Any) -> AdaptedModel:
    eva.setdefault("tau", 0.999)
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["a", "b"], init_lora_weights="eva",
        eva_config=EvaConfig(**eva),
    )  # fmt: skip
    return adapt(Pair(), config)


def llama_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        ids = torch.randint(3, 64, (3, 12), generator=torch.Generator().manual_seed(i))
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def llama_model(**kw: Any) -> AdaptedModel:
    eva = kw.pop("eva", {"rho": 2, "tau": 0.9})
    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **kw}
    return adapt(
        tiny_llama(), LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(**eva), **kw)
    )


def ranks(model: AdaptedModel) -> dict[str, int]:
    return {p: layer.r["default"] for p, layer in model.adapter_layers() if "default" in layer.r}


def state(model: AdaptedModel) -> dict[str, Any]:
    """Everything EVA could change: module types, tensors, ranks, scalings, config fields."""
    config = model.peft_config["default"]
    return {
        "types": {p: type(m).__name__ for p, m in model.model.named_modules()},
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "scaling": {p: dict(getattr(m, "scaling", {})) for p, m in model.adapter_layers()},
        "config": (config.target_modules, config.rank_pattern, config.alpha_pattern),
        "training": model.training,
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["types"] == after["types"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key
    assert before["scaling"] == after["scaling"]
    assert before["config"] == after["config"]
    assert before["training"] == after["training"]


def flipped(v: torch.Tensor) -> torch.Tensor:
    """Rows sign-fixed as EVA's: the entry of largest magnitude positive."""
    signs = torch.sign(v[range(v.shape[0]), v.abs().argmax(dim=1)])
    return v * signs[:, None]


# -- the definition -----------------------------------------------------------------------------
def test_components_are_the_top_directions_of_the_centred_inputs() -> None:
    model = pair_model()
    data = pair_batches()
    init_eva(model, data, **PAIR_KW)
    assert ranks(model) == {"b": 4}  # the rank-4 input takes the whole budget (2 + 2)
    assert isinstance(model.model.a, nn.Linear) and not isinstance(model.model.a, LoraLinear)
    y = torch.cat([y for _, y in data]).double()
    _, _, vh = torch.linalg.svd(y - y.mean(0), full_matrices=False)
    got = model.model.b.lora_A["default"].weight
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), flipped(vh[:4]), atol=1e-5, rtol=0)
    assert torch.equal(model.model.b.lora_B["default"].weight, torch.zeros(8, 4))


def test_whiten_divides_by_the_root_of_the_singular_values() -> None:
    data = pair_batches()
    plain = get_eva_state_dict(pair_model(), data, **PAIR_KW)
    white = get_eva_state_dict(pair_model(whiten=True), data, **PAIR_KW)
    assert plain["b"].dtype == torch.float64 and plain["a"].shape == (0, 32)
    s = 1 / white["b"].norm(dim=1) ** 2  # the singular values EVA divided by (their root)
    torch.testing.assert_close(white["b"] * s.sqrt()[:, None], plain["b"])
    # s² is the centred sum of squares along each direction over every sample seen, so a
    # whole number of passes times the data's own singular values squared
    y = torch.cat([y for _, y in data]).double()
    sigma = torch.linalg.svdvals(y - y.mean(0))[:4]
    passes = s**2 / sigma**2
    torch.testing.assert_close(passes, passes.round(), atol=1e-4, rtol=0)
    assert passes.min() >= 2 and torch.all(passes.round() == passes[0].round()), passes


def test_output_at_init_is_the_base_and_ranks_share_the_budget() -> None:
    model = llama_model()
    tokens = llama_batches()[0]
    with torch.no_grad():
        base = tiny_llama()(**tokens).logits
    init_eva(model, llama_batches(), show_progress_bar=False)
    got = ranks(model)
    assert sum(got.values()) == 4 * len(TARGETS) * 2  # Σ r over the 14 layers
    assert len(set(got.values())) > 1 and max(got.values()) <= 8  # redistributed, ≤ rho·r
    assert all(
        layer.lora_B["default"].weight.abs().max() == 0 for _, layer in model.adapter_layers()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**tokens).logits, base, atol=1e-6, rtol=0)
    config = model.peft_config["default"]
    assert config.rank_pattern == {p: r for p, r in got.items() if r != 4}
    for path, layer in model.adapter_layers():  # adjust_scaling_factors: α/r stays
        assert layer.scaling["default"] == pytest.approx(2.0)
        want = config.rank_and_alpha(path)
        assert want == (layer.r["default"], layer.lora_alpha["default"])


def test_without_adjusting_scaling_factors_alpha_stays() -> None:
    model = pair_model(adjust_scaling_factors=False)
    init_eva(model, pair_batches(), **PAIR_KW)
    layer = model.model.b
    assert layer.lora_alpha["default"] == 4 and layer.scaling["default"] == 1.0
    assert model.peft_config["default"].alpha_pattern == {}
    adjusted = pair_model()
    init_eva(adjusted, pair_batches(), **PAIR_KW)
    assert adjusted.peft_config["default"].alpha_pattern == {"b": 8.0}
    assert adjusted.model.b.scaling["default"] == 2.0


def test_rank_zero_layer_goes_and_the_checkpoint_reloads(tmp_path: Path) -> None:
    model = pair_model()
    init_eva(model, pair_batches(), **PAIR_KW)
    config = model.peft_config["default"]
    assert config.target_modules == ["b"] and config.rank_pattern == {"b": 4}
    with torch.no_grad():
        model.model.b.lora_B["default"].weight.normal_()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["target_modules"] == ["b"]
    loaded = AdaptedModel.from_pretrained(Pair(), tmp_path)
    assert ranks(loaded) == {"b": 4} and not isinstance(loaded.model.a, LoraLinear)
    x, y = pair_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y), model(x, y))
        assert (model(x, y) - Pair()(x, y)).abs().max() > 1e-3


def test_rank_zero_on_a_layer_with_another_adapter_deletes_only_this_one() -> None:
    model = pair_model()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False))
    init_eva(model, pair_batches(), **PAIR_KW)
    assert isinstance(model.model.a, LoraLinear) and model.model.a.adapter_names == ["other"]
    assert model.model.b.r == {"default": 4, "other": 2}


def test_label_mask_leaves_out_masked_tokens_like_padding() -> None:
    cfg: dict[str, Any] = {"eva": {"rho": 2, "tau": 0.9}, "target_modules": ["q_proj"], "r": 2}
    masked, padded, unmasked = [], [], []
    for batch in llama_batches():
        labels = batch["input_ids"].clone()
        labels[:, :4] = -100
        masked.append({**batch, "labels": labels})
        padded.append({**batch, "attention_mask": batch["attention_mask"] * (labels != -100)})
        unmasked.append({**batch, "labels": batch["input_ids"]})
    first = "model.layers.0.self_attn.q_proj"  # its input does not depend on attention

    def get(data: list[dict[str, torch.Tensor]], **kw: Any) -> torch.Tensor:
        model = llama_model(**{**cfg, **kw})
        return get_eva_state_dict(model, data, show_progress_bar=False)[first]

    assert torch.equal(get(masked), get(padded))
    assert not torch.equal(get(masked), get(unmasked))
    eva_off = {"rho": 2, "tau": 0.9, "use_label_mask": False}
    assert torch.equal(get(masked, eva=eva_off), get(unmasked))


def test_qkv_and_gate_up_share_one_decomposition() -> None:
    model = llama_model()
    init_eva(model, llama_batches(), show_progress_bar=False)
    for i in range(2):
        layer = f"model.layers.{i}."
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                      ("mlp.gate_proj", "mlp.up_proj")):  # fmt: skip
            mods = [model.model.get_submodule(layer + name) for name in group]
            rows = [m.lora_A["default"].weight if isinstance(m, LoraLinear) else None for m in mods]
            first = rows[0]
            assert first is not None and first.shape[0] == max(
                r.shape[0] for r in rows if r is not None
            )
            for other in rows[1:]:
                if other is not None:
                    assert torch.equal(other, first[: other.shape[0]])


def test_state_dicts_by_plain_model_or_peft_names_load_the_same() -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=2, tau=0.9))  # fmt: skip
    from_plain = get_eva_state_dict(tiny_llama(), llama_batches(), config, show_progress_bar=False)
    model = llama_model()
    computed = get_eva_state_dict(model, llama_batches(), show_progress_bar=False)
    assert computed.keys() == from_plain.keys()
    assert all(torch.equal(computed[k], from_plain[k]) for k in computed)
    peft_keys = {f"base_model.model.{k}": v for k, v in from_plain.items()}
    init_eva(model, eva_state_dict=peft_keys)
    assert len(peft_keys) == len(from_plain)  # not emptied (PEFT's is)
    for path, rows in from_plain.items():
        layer = model.model.get_submodule(path)
        if rows.shape[0]:
            assert torch.equal(layer.lora_A["default"].weight, rows.float())
        else:
            assert not isinstance(layer, LoraLinear)


def test_dora_and_training_mode() -> None:
    model = llama_model(use_dora=True, target_modules=["q_proj", "v_proj", "o_proj"])
    model.train()
    tokens = llama_batches()[0]
    init_eva(model, llama_batches(), show_progress_bar=False)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**tokens).logits, tiny_llama()(**tokens).logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)


def test_half_precision_base_keeps_float32_adapters(capsys: pytest.CaptureFixture[str]) -> None:
    model = adapt(
        Pair().to(torch.bfloat16),
        LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights="eva",
                   eva_config=EvaConfig(tau=0.999)),
    )  # fmt: skip
    data = [(x.bfloat16(), y.bfloat16()) for x, y in pair_batches()]
    init_eva(model, data, **{**PAIR_KW, "show_progress_bar": True})
    assert capsys.readouterr() == ("", "")  # the bar shows on a terminal only
    assert ranks(model) == {"b": 4}
    assert model.model.b.lora_A["default"].weight.dtype == torch.float32
    assert model.model.b.lora_B["default"].weight.dtype == torch.float32


# -- refusals -----------------------------------------------------------------------------------
def test_refusals() -> None:
    data = pair_batches()
    with pytest.raises(ConfigError, match="needs an adapted model"):
        init_eva(Pair(), data, **PAIR_KW)
    plain = adapt(Pair(), LoraConfig(r=2, target_modules=["a", "b"]))
    with pytest.raises(ConfigError, match="init_lora_weights='eva'"):
        init_eva(plain, data, **PAIR_KW)
    model = pair_model()
    with pytest.raises(ConfigError, match="dataloader or an eva_state_dict"):
        init_eva(model)
    with pytest.raises(ConfigError, match="dataloader is empty"):
        init_eva(model, [], **PAIR_KW)
    with pytest.raises(ConfigError, match="needs peft_config"):
        get_eva_state_dict(Pair(), data, **PAIR_KW)
    with pytest.raises(AdapterStateError, match="no adapter named"):
        init_eva(model, data, adapter_name="nope", **PAIR_KW)
    kw = {**PAIR_KW, "prepare_layer_inputs_fn": {"c": lambda *a: a[0][0]}}
    with pytest.raises(ConfigError, match=r"\['c'\] name no layer"):
        init_eva(model, data, **kw)
    with pytest.raises(ConfigError, match="input features"):
        init_eva(pair_model(rho=20), data, **PAIR_KW)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["a"]))
    model.set_adapter(["default", "other"])
    with pytest.raises(AdapterStateError, match="one active adapter"):
        init_eva(model, data, **PAIR_KW)
    model.set_adapter("default")
    model.merge_adapter()
    with pytest.raises(AdapterStateError, match="unmerge_adapter"):
        init_eva(model, data, **PAIR_KW)


@pytest.mark.parametrize(
    "entries,match",
    [
        ({"c": torch.zeros(2, 16)}, "name no LoRA linear layer"),
        ({"b": torch.zeros(2, 15)}, r"shape \(rank, 16\)"),
        ({"b": torch.full((2, 16), float("nan"))}, "NaN"),
        ({"b": torch.zeros(0, 16), "a": torch.zeros(0, 32)}, "adapter would be empty"),
        ({"b": torch.zeros(2, 16), "base_model.model.b": torch.zeros(2, 16)}, "twice"),
    ],
)
def test_bad_state_dicts_change_nothing(entries: dict[str, torch.Tensor], match: str) -> None:
    model = pair_model()
    before = state(model)
    with pytest.raises(ConfigError, match=match):
        init_eva(model, eva_state_dict={"a": torch.ones(3, 32), **entries})
    assert_same(before, state(model))


def test_a_failure_part_way_puts_every_layer_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama_model()
    sd = get_eva_state_dict(model, llama_batches(), show_progress_bar=False)
    first = "model.layers.0.self_attn.q_proj"
    sd[first] = sd[first][:0]  # removed, then rows copied and layers re-created, then the failure
    before = state(model)
    calls = []
    original = LoraLinear.update_layer

    def failing(self: LoraLinear, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(self, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "update_layer", failing)
    with pytest.raises(KeyboardInterrupt):
        init_eva(model, eva_state_dict=sd)
    assert len(calls) == 3
    assert_same(before, state(model))
    monkeypatch.undo()
    init_eva(model, eva_state_dict=sd)  # and then it works
    assert sum(ranks(model).values()) == 56 - 4 and not isinstance(
        model.model.get_submodule(first), LoraLinear
    )


def test_no_convergence_stops_with_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eva_fit, "MAX_EPOCHS", 3)
    model = pair_model(tau=0.9999)
    model.train()
    before = state(model)
    noise = {**PAIR_KW, "prepare_layer_inputs_fn": lambda inp, _m, _n: torch.randn_like(inp[0])}
    with pytest.raises(ConfigError, match="did not converge in 3 passes"):
        init_eva(model, pair_batches(), **noise)
    assert_same(before, state(model))
    assert not any(m._forward_hooks for m in model.modules())
    few = [(x[:3], y[:3]) for x, y in pair_batches()]  # 3 tokens, 4 components
    with pytest.raises(ConfigError, match="never got as many tokens"):
        init_eva(model, few, **PAIR_KW)
    assert_same(before, state(model))
