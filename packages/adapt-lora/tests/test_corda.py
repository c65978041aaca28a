"""CorDA (``preprocess_corda`` + ``init_lora_weights="corda"``) against its definition: the
covariance and the damped decomposition, IPM keeping the largest and KPM the smallest
directions, the output at init equal to the base's, the residual ``W − s·BA``, the base given
back on delete / unload, the conversion to a plain LoRA, the safetensors cache and covariance
files, batches of several sequences, and refusals that change nothing. (Against PEFT:
tests/interop/test_corda_interop.py.)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adapt.core import AdaptedModel, CheckpointError, ConfigError, TargetError, adapt
from adapt.core.testing import tiny_gpt2, tiny_llama, token_ids
from adapt.lora import CordaConfig, LoraConfig, preprocess_corda
from adapt.lora.corda import DECOMPOSITION, STATISTICS, corda_refusal

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["ipm", "kpm"]
BATCHES = [token_ids(1, 16, vocab_size=128, seed=s) for s in range(4)]


def config(method: str = "ipm", **kw: Any) -> LoraConfig:
    options = kw.pop("corda", {})
    kw.setdefault("target_modules", TARGETS)
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return LoraConfig(
        init_lora_weights="corda", corda_config=CordaConfig(corda_method=method, **options), **kw
    )


def runner(model: nn.Module, batches: list[torch.Tensor] = BATCHES) -> Callable[[], None]:
    def run() -> None:
        for ids in batches:
            model(input_ids=ids)

    return run


def corda_model(method: str = "ipm", base: nn.Module | None = None, **kw: Any) -> AdaptedModel:
    base = tiny_llama() if base is None else base
    cfg = config(method, **kw)
    preprocess_corda(base, cfg, run_model=runner(base))
    return adapt(base, cfg)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


def lora_layers(model: AdaptedModel) -> dict[str, Any]:
    """The LoRA layers by module path of the base model."""
    found = model.get_base_model().named_modules()
    return {n: m for n, m in found if hasattr(m, "lora_A") and m.lora_A}


def perturb(model: nn.Module, seed: int = 3) -> None:
    """Stand-in for training: seeded noise added to every ``lora_`` tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=token_ids(2, 12, vocab_size=128, seed=9)).logits
    return out


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


# ------------------------------------------------------------------------- the definition


@pytest.mark.parametrize("method", METHODS)
def test_decomposition_follows_the_definition(method: str) -> None:
    model = One()
    data = [torch.randn(1, 10, 24, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    cfg = config(method, target_modules=["linear"], corda={"prune_temporary_fields": False})
    preprocess_corda(model, cfg, run_model=lambda: [model(x) for x in data])
    scaled = [x[0] / x.max().abs() for x in data]
    cov = sum(x.T @ x for x in scaled) / 2
    stats = getattr(model.linear, STATISTICS)
    assert stats.sample_count == 2 and torch.allclose(stats.covariance, cov, atol=1e-6)
    damped = cov + torch.eye(24) * cov.diag().mean() * 0.01  # the first step of the loop holds
    w = model.linear.weight.detach().clone()
    u, s, vh = torch.linalg.svd(w @ damped, full_matrices=False)
    keep = slice(None, 4) if method == "ipm" else slice(-4, None)
    part = (u[:, keep] * s[keep]) @ vh[keep] @ torch.linalg.inv(damped)
    ours = adapt(model, cfg)
    layer = ours.get_base_model().linear
    a, b, scale = layer.lora_A["default"].weight, layer.lora_B["default"].weight, 8 / 4
    assert rel(scale * b @ a, part) < 1e-4
    assert rel(layer.base_layer.weight, w - part) < 1e-5
    # B = U √(S/s): orthogonal columns of norm √(S/s); A = √(S/s) (Vh C'⁻¹)
    assert torch.allclose(b.norm(dim=0) ** 2, s[keep] / scale, rtol=1e-4)
    assert torch.allclose(b.T @ b, torch.diag(s[keep] / scale), atol=1e-4)
    assert not hasattr(layer.base_layer, DECOMPOSITION)  # used up, as PEFT deletes it
    assert hasattr(layer.base_layer, STATISTICS)  # kept: prune_temporary_fields=False


@pytest.mark.parametrize("method", METHODS)
def test_output_at_init_is_the_base_output(method: str) -> None:
    expected = logits(tiny_llama())
    model = corda_model(method)
    assert rel(logits(model), expected) < 1e-5
    with model.disable_adapter():  # the residual alone is not the base
        assert rel(logits(model), expected) > 1e-3
    for layer in lora_layers(model).values():
        assert not hasattr(layer.base_layer, DECOMPOSITION)
        assert not hasattr(layer.base_layer, STATISTICS)  # pruned by default


def test_ipm_trains_the_principal_directions_and_kpm_the_minor_ones() -> None:
    ipm, kpm = corda_model("ipm"), corda_model("kpm")
    for path, layer in lora_layers(ipm).items():
        other = lora_layers(kpm)[path]
        big = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).norm()
        small = (other.lora_B["default"].weight @ other.lora_A["default"].weight).norm()
        assert big > small, path


@pytest.mark.parametrize("method", METHODS)
def test_the_base_keeps_the_residual_and_gets_it_back(method: str) -> None:
    original = snapshot(tiny_llama())
    base = tiny_llama()
    model = corda_model(method, base=base)
    for path, layer in lora_layers(model).items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        w = original[f"{path}.weight"]
        assert rel(layer.base_layer.weight, w - layer.scaling["default"] * b @ a) < 1e-6
    perturb(model)
    model.delete_adapter("default")
    now = base.state_dict()
    assert all(torch.allclose(now[k], v, atol=1e-6) for k, v in original.items())
    plain = corda_model(method).unload()
    assert all(torch.allclose(plain.state_dict()[k], v, atol=1e-6) for k, v in original.items())


def test_rank_pattern_alpha_pattern_and_rslora() -> None:
    expected = logits(tiny_llama())
    extra: dict[str, Any] = dict(
        rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 16}, use_rslora=True
    )
    model = corda_model("kpm", **extra)
    layers = lora_layers(model)
    assert layers["model.layers.0.self_attn.v_proj"].lora_A["default"].weight.shape[0] == 2
    assert rel(logits(model), expected) < 1e-5


def test_gpt2_conv1d_weights_in_the_canonical_layout() -> None:
    expected = logits(tiny_gpt2())
    base = tiny_gpt2()
    cfg = config("ipm", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    preprocess_corda(base, cfg, run_model=runner(base))
    model = adapt(base, cfg)
    assert rel(logits(model), expected) < 1e-5


# -------------------------------------------------------------------- batches, hooks


def test_a_batch_of_sequences_is_those_sequences_one_by_one() -> None:
    ones, batched = tiny_llama(), tiny_llama()
    stacked = torch.cat(BATCHES)
    keep = {"prune_temporary_fields": False}
    preprocess_corda(ones, config(corda=keep), run_model=runner(ones))
    preprocess_corda(batched, config(corda=keep), run_model=runner(batched, [stacked]))
    for name, module in ones.named_modules():
        if hasattr(module, STATISTICS):
            other = batched.get_submodule(name)
            mine, theirs = getattr(module, STATISTICS), getattr(other, STATISTICS)
            assert mine.sample_count == theirs.sample_count == 4
            assert torch.allclose(mine.covariance, theirs.covariance, rtol=1e-5, atol=1e-6)
            assert rel(getattr(other, DECOMPOSITION).s, getattr(module, DECOMPOSITION).s) < 1e-4


def test_hooks_are_removed_and_user_hooks_stay() -> None:
    base = tiny_llama()
    calls: list[int] = []
    q = base.model.layers[0].self_attn.q_proj
    handle = q.register_forward_hook(lambda *args: calls.append(1))
    base.train()
    preprocess_corda(base, config(), run_model=runner(base))
    assert len(calls) == len(BATCHES) and len(q._forward_hooks) == 1
    assert base.training  # the modes preprocess_corda switched to eval are restored
    handle.remove()
    assert all(not m._forward_hooks for m in base.modules())


def test_hooked_model_gives_its_covariances_to_the_model() -> None:
    base, other = tiny_llama(), tiny_llama()
    hooked = copy.deepcopy(other)
    preprocess_corda(base, config(), run_model=runner(base))
    preprocess_corda(other, config(), run_model=runner(hooked), hooked_model=hooked)
    a = getattr(base.model.layers[1].mlp.down_proj, DECOMPOSITION)
    b = getattr(other.model.layers[1].mlp.down_proj, DECOMPOSITION)
    assert torch.equal(a.s, b.s) and torch.equal(a.u, b.u)
    assert not any(hasattr(m, DECOMPOSITION) for m in hooked.modules())


# -------------------------------------------------------------- checkpoints, conversion


def test_conversion_to_a_plain_lora_for_the_original_base(tmp_path: Path) -> None:
    model = corda_model("kpm")
    model.save_pretrained(tmp_path / "init")
    perturb(model)
    trained = logits(model)
    model.save_pretrained(
        tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init"
    )
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    assert rel(logits(loaded), trained) < 1e-5
    assert rel(trained, logits(tiny_llama())) > 1e-3


def test_a_saved_corda_adapter_reloads_after_preprocessing_again(tmp_path: Path) -> None:
    model = corda_model("ipm")
    perturb(model)
    trained = logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "corda" and saved["corda_config"]["corda_method"] == "ipm"
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(TargetError, match="run preprocess_corda"):
        AdaptedModel.from_pretrained(base, tmp_path)
    assert same_state(base, before)
    preprocess_corda(base, config(), run_model=runner(base))
    loaded = AdaptedModel.from_pretrained(base, tmp_path)
    assert rel(logits(loaded), trained) < 1e-5


def test_cache_and_covariance_files_round_trip(tmp_path: Path) -> None:
    files = {
        "cache_file": str(tmp_path / "c" / "cache.safetensors"),
        "covariance_file": str(tmp_path / "c" / "cov.safetensors"),
    }
    first = tiny_llama()
    preprocess_corda(first, config("kpm", corda=files), run_model=runner(first))
    cache = load_file(files["cache_file"])
    assert set(cache) == {
        f"{n}.eigens.{k}"
        for n, m in first.named_modules()
        if hasattr(m, DECOMPOSITION)
        for k in ("S_WC", "U_WC", "V_WC")
    }
    expected = {
        n: getattr(m, DECOMPOSITION) for n, m in first.named_modules() if hasattr(m, DECOMPOSITION)
    }
    for only in ("cache_file", "covariance_file"):
        other = tiny_llama()
        preprocess_corda(other, config("kpm", corda={only: files[only]}))  # no run_model
        for name, want in expected.items():
            got = getattr(other.get_submodule(name), DECOMPOSITION)
            assert torch.equal(got.s, want.s) and torch.equal(got.v, want.v), (only, name)
    with pytest.raises(ConfigError, match="holds a KPM decomposition"):
        preprocess_corda(tiny_llama(), config("ipm", corda={"cache_file": files["cache_file"]}))
    with pytest.raises(ConfigError, match="shape"):  # built for r=4
        preprocess_corda(
            tiny_llama(), config("kpm", r=2, corda={"cache_file": files["cache_file"]})
        )
    assert rel(logits(adapt(first, config("kpm", corda=files))), logits(tiny_llama())) < 1e-5


# ------------------------------------------------------------------------------ refusals


def test_refusals_leave_the_model_as_it_was(tmp_path: Path) -> None:
    base = tiny_llama()
    before = snapshot(base)
    layout = [type(m).__name__ for m in base.modules()]

    def unchanged() -> bool:
        return (
            same_state(base, before)
            and [type(m).__name__ for m in base.modules()] == layout
            and not any(hasattr(m, DECOMPOSITION) or m._forward_hooks for m in base.modules())
        )

    with pytest.raises(TargetError, match=r"run preprocess_corda\(model, lora_config"):
        adapt(base, config())
    assert unchanged()
    with pytest.raises(ConfigError, match="corda_method must be 'ipm' or 'kpm'"):
        CordaConfig(corda_method="svd")
    bad = config()
    assert bad.corda_config is not None
    bad.corda_config.corda_method = "svd"
    with pytest.raises(ConfigError, match="corda_method must be 'ipm' or 'kpm'"):
        preprocess_corda(base, bad, run_model=runner(base))
    pickle = tmp_path / "cache.safetensors"
    torch.save({"x": torch.ones(2)}, pickle)
    with pytest.raises(CheckpointError, match="never loads pickle"):
        preprocess_corda(base, config(corda={"cache_file": str(pickle)}), run_model=runner(base))
    with pytest.raises(ConfigError, match=r"ending in '\.safetensors'"):
        preprocess_corda(base, config(corda={"cache_file": "cache.pt"}), run_model=runner(base))
    with pytest.raises(ConfigError, match="needs run_model"):
        preprocess_corda(base, config())
    with pytest.raises(ConfigError, match="init_lora_weights='corda'"):
        preprocess_corda(base, LoraConfig(target_modules=TARGETS), run_model=runner(base))

    def broken() -> None:
        base(input_ids=BATCHES[0])
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader failed"):
        preprocess_corda(base, config(), run_model=broken)
    with pytest.raises(TargetError, match="never called"):
        preprocess_corda(base, config(target_modules=["q_proj", "lm_head"]), run_model=lambda: None)
    assert unchanged()
    preprocess_corda(base, config(r=4), run_model=runner(base))
    with pytest.raises(TargetError, match="decomposed this module for rank 4"):
        adapt(base, config(r=2))
    assert same_state(base, before)
    assert adapt(base, config(r=4)) is not None  # the decomposition is still there


def test_a_pickled_peft_cache_converted_once_reads(tmp_path: Path) -> None:
    first = tiny_llama()
    preprocess_corda(first, config(), run_model=runner(first))
    found = {
        n: getattr(m, DECOMPOSITION) for n, m in first.named_modules() if hasattr(m, DECOMPOSITION)
    }
    pickled = {
        f"{n}.eigens.{k}": t
        for n, d in found.items()
        for k, t in zip(("S_WC", "U_WC", "V_WC"), (d.s, d.u, d.v), strict=True)
    }
    torch.save(pickled, tmp_path / "peft_cache.pt")
    from safetensors.torch import save_file  # the conversion the error message shows

    with open(tmp_path / "peft_cache.pt", "rb") as handle:
        loaded = torch.load(handle, weights_only=True)
    save_file({k: v.contiguous() for k, v in loaded.items()}, str(tmp_path / "new.safetensors"))
    other = tiny_llama()
    preprocess_corda(other, config(corda={"cache_file": str(tmp_path / "new.safetensors")}))
    got = getattr(other.model.layers[0].self_attn.q_proj, DECOMPOSITION)
    assert got.method is None and torch.equal(got.u, found["model.layers.0.self_attn.q_proj"].u)


def test_refusal_names_a_mode_mismatch_when_given_the_config() -> None:
    base = tiny_llama()
    preprocess_corda(base, config("kpm", target_modules=["q_proj"]), run_model=runner(base))
    from adapt.lora.layer import LoraLinear

    layer = LoraLinear(base.model.layers[0].self_attn.q_proj)
    layer.update_layer("default", config("kpm", target_modules=["q_proj"]), r=4, lora_alpha=8)
    assert corda_refusal(layer, "default", config("kpm")) is None
    assert "KPM decomposition" in str(corda_refusal(layer, "default", config("ipm")))


# ------------------------------------------------------------------------ half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_keeps_its_dtype_and_trains_under_autocast(
    dtype: torch.dtype,
) -> None:
    """The statistics and the decomposition are float32 whatever the base's dtype; the
    residual goes back into the base in its own dtype; the output at init is the base's up to
    that rounding; a step under bf16 autocast trains only the adapters."""
    expected = logits(tiny_llama().to(dtype)).float()
    model = corda_model("ipm", base=tiny_llama().to(dtype))
    for path, layer in lora_layers(model).items():
        assert layer.base_layer.weight.dtype == dtype, path
        assert torch.isfinite(layer.lora_A["default"].weight).all(), path
    assert rel(logits(model).float(), expected) < 2e-2
    model.train()
    ids = token_ids(2, 12, vocab_size=128, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
