"""PiSSA, OLoRA and LoftQ initialisations against HF PEFT: the factors (``s·BA`` for PiSSA,
whose singular vectors may differ in sign; A and B themselves for OLoRA), the residual base
weights and the outputs at init on a tiny Llama (with rank / alpha patterns and rsLoRA too) and
on GPT-2's transposed Conv1D weights; trained checkpoints loading both ways onto the original
base; the conversion to a rank-2r plain LoRA (``path_initial_model_for_weight_conversion``) both
ways, with PEFT's keys, shapes and config; LoftQ configs read both ways.

"Training" adds seeded random perturbations to every ``lora_`` tensor. PEFT's LoftQ itself runs
on CUDA only and is not called here.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import peft.tuners.lora.layer as peft_lora_layer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from adapt.core import AdaptedModel, adapt, load_config  # noqa: E402
from adapt.core.testing import tiny_llama, token_ids  # noqa: E402
from adapt.lora import LoftQConfig, LoraConfig  # noqa: E402

pytestmark = pytest.mark.interop

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj"]
PATTERNS: dict[str, Any] = dict(rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 16})
#: tolerance on s·BA (and on A, B for OLoRA); the exact PiSSA of adapt goes through a Gram
#: eigendecomposition, PEFT's through a full SVD
TOL = {"pissa": 1e-4, "olora": 1e-5}


def llama() -> nn.Module:
    return tiny_llama().eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=token_ids(2, 12, vocab_size=128, seed=1)).logits
    return out


def max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x - y).abs().max().item()


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm()).item()


def ours_on(build: Callable[[], nn.Module], init: str, targets: list[str], **kw: Any) -> Any:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **kw)
    return adapt(build(), config).eval()


def theirs_on(build: Callable[[], nn.Module], init: str, targets: list[str], **kw: Any) -> Any:
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **kw
    )
    return peft.get_peft_model(build(), config).eval()


def layers(model: Any) -> dict[str, Any]:
    """The LoRA layers by module path (``get_base_model`` is the same call in both)."""
    return {n: m for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A")}


def factors(layer: Any) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """``(A, B, scaling, stored base weight)`` of the default adapter."""
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    return a, b, float(layer.scaling["default"]), layer.base_layer.weight.detach()


def perturb(model: nn.Module, seed: int = 3) -> None:
    """Stand-in for training: seeded noise on every ``lora_`` tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))


def compare_layers(ours: Any, theirs: Any, tol: float, same_factors: bool) -> dict[str, float]:
    """Every layer: same shapes and scaling, s·BA (and A, B if ``same_factors``) within
    ``tol``, residual base weights within 1e-5; the worst relative differences."""
    mine, ref = layers(ours), layers(theirs)
    assert mine.keys() == ref.keys() and mine
    worst = {"sBA": 0.0, "A/B": 0.0, "base": 0.0}
    for path, layer in mine.items():
        a, b, s, w = factors(layer)
        a2, b2, s2, w2 = factors(ref[path])
        assert (a.shape, b.shape, w.shape) == (a2.shape, b2.shape, w2.shape), path
        assert s == pytest.approx(s2, rel=1e-6), path
        worst["sBA"] = max(worst["sBA"], rel(s * b @ a, s2 * b2 @ a2))
        worst["base"] = max(worst["base"], rel(w, w2))
        if same_factors:
            worst["A/B"] = max(worst["A/B"], rel(a, a2), rel(b, b2))
    assert worst["sBA"] <= tol and worst["A/B"] <= tol, worst
    assert worst["base"] <= 1e-5, worst
    return worst


# ------------------------------------------------------------------------------ at init


@pytest.mark.parametrize("patterns", [False, True], ids=["plain", "patterns_rslora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_matches_peft_on_llama(init: str, patterns: bool) -> None:
    extra: dict[str, Any] = dict(PATTERNS, use_rslora=True) if patterns else {}
    ours, theirs = ours_on(llama, init, LLAMA, **extra), theirs_on(llama, init, LLAMA, **extra)
    compare_layers(ours, theirs, TOL[init], same_factors=init == "olora")
    ranks = {p.rsplit(".", 1)[-1]: m.r["default"] for p, m in layers(ours).items()}
    assert ranks["v_proj"] == (2 if patterns else 4) and ranks["q_proj"] == 4
    mine, ref, base = logits(ours), logits(theirs), logits(llama())
    assert max_diff(mine, ref) <= 1e-5
    assert rel(mine, base) <= 1e-5 and rel(ref, base) <= 1e-5


def test_pissa_matches_peft_on_gpt2_conv1d() -> None:
    ours, theirs = ours_on(gpt2, "pissa", GPT2), theirs_on(gpt2, "pissa", GPT2)
    compare_layers(ours, theirs, TOL["pissa"], same_factors=False)
    mine, ref, base = logits(ours), logits(theirs), logits(gpt2())
    assert max_diff(mine, ref) <= 1e-5
    assert rel(mine, base) <= 1e-5


def test_olora_on_gpt2_conv1d_where_peft_qrs_the_stored_weight() -> None:
    # PEFT 0.21.2's olora_init QRs Conv1D's stored (in, out) weight without transposing it
    # (pissa_init does transpose): A gets shape (r, out), B (in, r). The forward then fails on
    # the non-square c_attn / mlp.c_proj and is silently wrong on the square attn.c_proj.
    theirs = theirs_on(gpt2, "olora", GPT2)
    peft_layers = layers(theirs)
    assert tuple(peft_layers["transformer.h.0.attn.c_attn"].lora_A["default"].weight.shape) == (
        4,
        192,
    )
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        logits(theirs)
    x, original = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)), gpt2()
    with torch.no_grad():
        square = peft_layers["transformer.h.0.attn.c_proj"](x)
        assert max_diff(square, original.get_submodule("transformer.h.0.attn.c_proj")(x)) > 1e-3
    # adapt QRs the canonical (out, in) weight: OLoRA by its definition
    ours = ours_on(gpt2, "olora", GPT2)
    for path, layer in layers(ours).items():
        a, b, s, w = factors(layer)
        weight = original.get_submodule(path).weight.detach().T  # (out, in)
        q, r = torch.linalg.qr(weight)
        assert rel(a, r[:4]) <= 1e-5 and rel(b, q[:, :4]) <= 1e-5, path
        assert rel(w.T + s * b @ a, weight) <= 1e-5, path
    assert rel(logits(ours), logits(original)) <= 1e-5


def _reseeding(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real`` (``torch.svd_lowrank``) reseeding the global RNG by its call index first."""
    calls = itertools.count()

    def seeded(*args: Any, **kwargs: Any) -> Any:
        torch.manual_seed(1000 + next(calls))
        return real(*args, **kwargs)

    return seeded


def _niter_layers(make: Callable[..., Any]) -> dict[str, Any]:
    """pissa_niter_4 layers built after ``torch.manual_seed(0)`` on a fresh base."""
    base = llama()
    torch.manual_seed(0)
    return layers(make(lambda: base, "pissa_niter_4", LLAMA))


def test_pissa_niter_same_random_draws_give_peft_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", _reseeding(real))
    ours = _niter_layers(ours_on)
    monkeypatch.setattr(peft_lora_layer, "svd_lowrank", _reseeding(real))
    monkeypatch.setattr(torch, "svd_lowrank", real)
    theirs = _niter_layers(theirs_on)
    assert ours.keys() == theirs.keys()  # and the same layer order
    for path, layer in ours.items():
        a, b, _, w = factors(layer)
        a2, b2, _, w2 = factors(theirs[path])
        assert rel(a, a2) <= 1e-4 and rel(b, b2) <= 1e-4, path
        assert rel(w, w2) <= 1e-5, path


def test_pissa_niter_same_global_seed_same_accuracy_as_peft() -> None:
    # torch.manual_seed(0) before each library does NOT give PEFT's factors: PEFT draws each
    # layer's nn.Linear (Kaiming) init of lora_A and lora_B right before that layer's
    # svd_lowrank, adapt creates every layer first and runs the SVDs afterwards, so the random
    # test matrices differ (with the draws aligned they agree: the test above). What holds:
    # per layer, the error of s·BA to the exact top-r part is within a factor 2 of PEFT's.
    ours, theirs = _niter_layers(ours_on), _niter_layers(theirs_on)
    for path, layer in ours.items():
        a, b, s, w = factors(layer)
        a2, b2, s2, w2 = factors(theirs[path])
        weight = w + s * b @ a
        assert rel(weight, w2 + s2 * b2 @ a2) <= 1e-5, path  # both keep W = residual + s·BA
        u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
        best = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]
        mine, ref = rel(s * b @ a, best), rel(s2 * b2 @ a2, best)
        assert 0.5 <= mine / ref <= 2.0, (path, mine, ref)


# ------------------------------------------------------------------ trained checkpoints


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_peft_checkpoint_loads_in_adapt(init: str, tmp_path: Path) -> None:
    theirs = theirs_on(llama, init, LLAMA)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(llama(), tmp_path)  # re-initialises the original base
    ref = logits(theirs)
    assert max_diff(logits(ours), ref) <= 1e-5
    assert max_diff(ref, logits(llama())) > 1e-2  # the perturbation shows


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapt_checkpoint_loads_in_peft(init: str, tmp_path: Path) -> None:
    ours = ours_on(llama, init, LLAMA)
    perturb(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    mine = logits(ours)
    assert max_diff(logits(theirs), mine) <= 1e-5
    assert max_diff(mine, logits(llama())) > 1e-2


# ------------------------------------------------ conversion to a plain LoRA of rank 2r

CONVERSIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "patterns": PATTERNS,
    "rslora": {"use_rslora": True},
    "rslora_patterns": dict(PATTERNS, use_rslora=True),  # PEFT refuses, adapt converts
}


def peft_converted(init: str, root: Path, **extra: Any) -> tuple[Path, torch.Tensor]:
    """PEFT's conversion (init folder saved right after creation; PEFT rewrites its config
    with init_lora_weights=True itself) and PEFT's trained logits."""
    theirs = theirs_on(llama, init, LLAMA, **extra)
    theirs.save_pretrained(root / "peft_init")
    perturb(theirs)
    trained = logits(theirs)
    out = root / "peft_lora"
    theirs.save_pretrained(out, path_initial_model_for_weight_conversion=str(root / "peft_init"))
    return out, trained


def saved(folder: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    tensors = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    return {k: tuple(v.shape) for k, v in tensors.items()}, config


def assert_base_untouched(model: Any) -> None:
    """A converted adapter loads as a plain LoRA: the base weights are the original ones."""
    original = llama()
    for path, layer in layers(model).items():
        assert torch.equal(layer.base_layer.weight, original.get_submodule(path).weight), path


@pytest.mark.parametrize("case", list(CONVERSIONS))
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapt_conversion_loads_in_peft(init: str, case: str, tmp_path: Path) -> None:
    extra = CONVERSIONS[case]
    ours = ours_on(llama, init, LLAMA, **extra)
    ours.save_pretrained(tmp_path / "init")
    perturb(ours)
    out = tmp_path / "lora"
    ours.save_pretrained(out, path_initial_model_for_weight_conversion=tmp_path / "init")
    theirs = peft.PeftModel.from_pretrained(llama(), out).eval()
    assert_base_untouched(theirs)
    assert max_diff(logits(theirs), logits(ours)) <= 1e-5
    if case == "rslora_patterns":
        with pytest.raises(ValueError, match="use_rslora"):
            peft_converted(init, tmp_path, **extra)
        return
    shapes, config = saved(out)
    ref_shapes, ref_config = saved(peft_converted(init, tmp_path, **extra)[0])
    assert shapes == ref_shapes  # PEFT's keys, the rank-2r shapes
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert config[key] == pytest.approx(ref_config[key]), key
    assert config["r"] == 8 and config["init_lora_weights"] is True


@pytest.mark.parametrize("case", ["plain", "patterns", "rslora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_conversion_loads_in_adapt(init: str, case: str, tmp_path: Path) -> None:
    out, trained = peft_converted(init, tmp_path, **CONVERSIONS[case])
    ours = AdaptedModel.from_pretrained(llama(), out)
    assert_base_untouched(ours)
    assert max_diff(logits(ours), trained) <= 1e-5
    assert max_diff(trained, logits(llama())) > 1e-2


# ------------------------------------------------------------------------- LoftQ configs


def test_adapt_loftq_config_reads_in_peft(tmp_path: Path) -> None:
    loftq = LoftQConfig(loftq_bits=4, loftq_iter=1)
    ours = ours_on(llama, "loftq", ["q_proj", "v_proj"], loftq_config=loftq)
    ours.save_pretrained(tmp_path)
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    assert theirs.init_lora_weights == "loftq"
    assert theirs.loftq_config == {"loftq_bits": 4, "loftq_iter": 1}
    assert (theirs.r, theirs.lora_alpha) == (4, 8)
    assert set(theirs.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize("bits,iters", [(4, 1), (8, 3)])
def test_peft_loftq_config_reads_in_adapt(bits: int, iters: int, tmp_path: Path) -> None:
    theirs = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=bits, loftq_iter=iters),
    )  # fmt: skip
    theirs.save_pretrained(tmp_path)
    ours = load_config(tmp_path)
    assert isinstance(ours, LoraConfig)
    assert ours.init_lora_weights == "loftq"
    assert ours.loftq_config == {"loftq_bits": bits, "loftq_iter": iters}
    assert (ours.r, ours.lora_alpha) == (4, 8)
    assert set(ours.target_modules) == {"q_proj", "v_proj"}
