"""CorDA against HF PEFT: ``preprocess_corda`` + ``get_peft_model`` vs adapt's
``preprocess_corda`` + ``adapt`` on a tiny Llama (with rank / alpha patterns and rsLoRA too) and
on GPT-2's transposed Conv1D weights, both modes, with batch-size-1 calibration (PEFT's only
working case): the same ``s·BA``, residual base weights and outputs. Trained checkpoints go both
ways by the routes that work in PEFT, which cannot load a CorDA adapter onto a base that was not
preprocessed: preprocessing the original base again before loading, the residual model with
``init_lora_weights=True``, and the rank-2r plain LoRA (``path_initial_model_for_weight_
conversion``). PEFT's pickled cache is refused, and reads once converted to safetensors.

"Training" adds seeded random perturbations to every ``lora_`` tensor.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft.tuners.lora.config import CordaConfig as PeftCordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from adapt.core import (  # noqa: E402
    AdaptedModel,
    CheckpointError,
    ConfigError,
    adapt,
    load_config,
)
from adapt.core.testing import tiny_gpt2, tiny_llama, token_ids  # noqa: E402
from adapt.lora import CordaConfig, LoraConfig, preprocess_corda  # noqa: E402
from adapt.lora.corda import DECOMPOSITION  # noqa: E402

pytestmark = pytest.mark.interop

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_fc"]
METHODS = ["ipm", "kpm"]
PATTERNS: dict[str, Any] = dict(
    rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 16}, use_rslora=True
)
#: batch size 1: PEFT's hook takes a (1, T, d) input only
CALIBRATION = [token_ids(1, 16, vocab_size=128, seed=s) for s in range(4)]


def runner(model: nn.Module) -> Callable[[], None]:
    def run() -> None:
        for ids in CALIBRATION:
            model(input_ids=ids)

    return run


def ours_on(
    build: Callable[[], nn.Module], method: str, targets: list[str] = LLAMA, **kw: Any
) -> Any:
    base = build().eval()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=method),
        **kw,
    )
    preprocess_corda(base, config, run_model=runner(base))
    return adapt(base, config).eval()


def theirs_on(
    build: Callable[[], nn.Module], method: str, targets: list[str] = LLAMA, **kw: Any
) -> Any:
    base = build().eval()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=PeftCordaConfig(corda_method=method),
        **kw,
    )
    peft_preprocess_corda(base, config, run_model=runner(base))
    return peft.get_peft_model(base, config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=token_ids(2, 12, vocab_size=128, seed=1)).logits
    return out


def max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x - y).abs().max().item()


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm()).item()


def layers(model: Any) -> dict[str, Any]:
    return {n: m for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A")}


def perturb(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))


def compare(ours: Any, theirs: Any) -> dict[str, float]:
    """Every layer: same shapes and scaling, s·BA ≤ 1e-4 and residual base ≤ 1e-5 relative."""
    mine, ref = layers(ours), layers(theirs)
    assert mine.keys() == ref.keys() and mine
    worst = {"sBA": 0.0, "base": 0.0}
    for path, layer in mine.items():
        other = ref[path]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a2, b2 = other.lora_A["default"].weight, other.lora_B["default"].weight
        s, s2 = layer.scaling["default"], other.scaling["default"]
        assert (a.shape, b.shape) == (a2.shape, b2.shape) and s == pytest.approx(s2), path
        worst["sBA"] = max(worst["sBA"], rel(s * b @ a, s2 * b2 @ a2))
        worst["base"] = max(worst["base"], rel(layer.base_layer.weight, other.base_layer.weight))
    assert worst["sBA"] <= 1e-4 and worst["base"] <= 1e-5, worst
    return worst


# ------------------------------------------------------------------------------ at init


@pytest.mark.parametrize("patterns", [False, True], ids=["plain", "patterns_rslora"])
@pytest.mark.parametrize("method", METHODS)
def test_init_matches_peft_on_llama(method: str, patterns: bool) -> None:
    extra = PATTERNS if patterns else {}
    ours, theirs = ours_on(tiny_llama, method, **extra), theirs_on(tiny_llama, method, **extra)
    compare(ours, theirs)
    assert max_diff(logits(ours), logits(theirs)) <= 1e-5
    assert max_diff(logits(ours), logits(tiny_llama())) <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_init_matches_peft_on_gpt2_conv1d(method: str) -> None:
    ours = ours_on(tiny_gpt2, method, GPT2, fan_in_fan_out=True)
    theirs = theirs_on(tiny_gpt2, method, GPT2, fan_in_fan_out=True)
    compare(ours, theirs)
    assert max_diff(logits(ours), logits(theirs)) <= 1e-5


# ------------------------------------------------------------------ trained checkpoints


@pytest.mark.parametrize("method", METHODS)
def test_peft_checkpoint_loads_in_adapt_after_preprocessing(method: str, tmp_path: Path) -> None:
    theirs = theirs_on(tiny_llama, method)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    config = load_config(tmp_path)  # PEFT's config: init_lora_weights="corda", its corda_config
    base = tiny_llama().eval()
    preprocess_corda(base, config, run_model=runner(base))
    ours = AdaptedModel.from_pretrained(base, tmp_path)
    ref = logits(theirs)
    assert max_diff(logits(ours), ref) <= 1e-5
    assert max_diff(ref, logits(tiny_llama())) > 1e-2  # the perturbation shows


@pytest.mark.parametrize("method", METHODS)
def test_adapt_checkpoint_loads_in_peft_after_preprocessing(method: str, tmp_path: Path) -> None:
    ours = ours_on(tiny_llama, method)
    perturb(ours)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "corda"
    assert saved["corda_config"]["corda_method"] == method
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    base = tiny_llama().eval()
    peft_preprocess_corda(base, config, run_model=runner(base))
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert max_diff(logits(theirs), logits(ours)) <= 1e-5


def residual_llama(model: Any) -> nn.Module:
    """A fresh Llama holding ``model``'s residual base weights."""
    residual = tiny_llama().eval()
    with torch.no_grad():
        for path, layer in layers(model).items():
            residual.get_submodule(path).weight.copy_(layer.base_layer.weight)
    return residual


@pytest.mark.parametrize("method", METHODS)
def test_on_the_residual_model_both_ways(method: str, tmp_path: Path) -> None:
    theirs = theirs_on(tiny_llama, method)
    perturb(theirs)
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: no second init
    theirs.save_pretrained(tmp_path / "peft")
    ours = AdaptedModel.from_pretrained(residual_llama(theirs), tmp_path / "peft")
    assert max_diff(logits(ours), logits(theirs)) <= 1e-5

    mine = ours_on(tiny_llama, method)
    perturb(mine, seed=4)
    mine.peft_config["default"].init_lora_weights = True
    mine.save_pretrained(tmp_path / "adapt")
    loaded = peft.PeftModel.from_pretrained(residual_llama(mine), tmp_path / "adapt").eval()
    assert max_diff(logits(loaded), logits(mine)) <= 1e-5


def assert_base_untouched(model: Any) -> None:
    original = tiny_llama()
    for path, layer in layers(model).items():
        assert torch.equal(layer.base_layer.weight, original.get_submodule(path).weight), path


@pytest.mark.parametrize("method", METHODS)
def test_conversion_to_a_plain_lora_both_ways(method: str, tmp_path: Path) -> None:
    ours = ours_on(tiny_llama, method)
    ours.save_pretrained(tmp_path / "init")
    perturb(ours)
    ours.save_pretrained(
        tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init"
    )
    theirs = peft.PeftModel.from_pretrained(tiny_llama().eval(), tmp_path / "lora").eval()
    assert_base_untouched(theirs)
    assert max_diff(logits(theirs), logits(ours)) <= 1e-5

    peft_model = theirs_on(tiny_llama, method)
    peft_model.save_pretrained(tmp_path / "peft_init")
    perturb(peft_model)
    trained = logits(peft_model)
    peft_model.save_pretrained(
        tmp_path / "peft_lora",
        path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"),
    )
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "peft_lora")
    assert_base_untouched(loaded)
    assert max_diff(logits(loaded), trained) <= 1e-5
    mine = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    ref = json.loads((tmp_path / "peft_lora" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert mine[key] == pytest.approx(ref[key]), key


# ---------------------------------------------------------------------------- cache files


def adapt_cache_config(cache: Path) -> LoraConfig:
    options = CordaConfig(cache_file=str(cache))
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="corda", corda_config=options
    )


def test_peft_pickled_cache_is_refused_and_reads_once_converted(tmp_path: Path) -> None:
    cache = tmp_path / "cache.pt"
    base = tiny_llama().eval()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LLAMA,
        init_lora_weights="corda",
        corda_config=PeftCordaConfig(cache_file=str(cache)),
    )
    peft_preprocess_corda(base, config, run_model=runner(base))
    with pytest.raises(ConfigError, match=r"ending in '\.safetensors'"):
        preprocess_corda(tiny_llama(), adapt_cache_config(cache))
    renamed = tmp_path / "renamed.safetensors"
    shutil.copyfile(cache, renamed)
    with pytest.raises(CheckpointError, match="never loads pickle"):
        preprocess_corda(tiny_llama(), adapt_cache_config(renamed))
    converted = tmp_path / "converted.safetensors"  # the conversion the message shows
    with open(cache, "rb") as handle:
        loaded = torch.load(handle, weights_only=True)
    save_file({k: v.contiguous() for k, v in loaded.items()}, str(converted))
    ours_base = tiny_llama().eval()
    preprocess_corda(ours_base, adapt_cache_config(converted))
    for name, module in ours_base.named_modules():
        if hasattr(module, DECOMPOSITION):
            eigens = base.get_submodule(name).eigens
            assert torch.equal(getattr(module, DECOMPOSITION).u, eigens.U_WC), name
    theirs = peft.get_peft_model(base, config).eval()
    compare(adapt(ours_base, adapt_cache_config(converted)).eval(), theirs)
