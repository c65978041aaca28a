"""PiSSA, OLoRA and LoftQ initialisations (``init_lora_weights``) against their definitions:
the output at init is the base's, ``s·BA`` is the weight's top-r part (PiSSA) or its QR part
(OLoRA), the base keeps the residual and gets it back when the adapter goes, checkpoints and the
conversion to a plain LoRA give the trained model on the original base, and every option is
validated before anything changes. (Against PEFT: tests/interop/test_init_interop.py; on
bitsandbytes bases and with its quantiser: adapt-bnb's tests/test_bnb_inits.py.)
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from adapt.core import (
    AdaptedModel,
    CheckpointError,
    ConfigError,
    DenseBackend,
    TargetError,
    adapt,
    register_backend,
)
from adapt.core.plugins import GROUP_BACKENDS
from adapt.core.testing import randomise_adapters, tiny_gpt2, tiny_llama, token_ids
from adapt.lora import LoftQConfig, LoraConfig
from adapt.lora import inits as inits_module

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHT_INITS = ["pissa", "pissa_niter_2", "olora"]


def config(init: Any = "pissa", **kw: Any) -> LoraConfig:
    kw.setdefault("target_modules", TARGETS)
    kw.setdefault("lora_alpha", 8)
    return LoraConfig(r=4, init_lora_weights=init, **kw)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def lora_layers(model: AdaptedModel) -> dict[str, Any]:
    return {p: layer for p, layer in model.adapter_set.layers() if hasattr(layer, "lora_A")}


@pytest.mark.parametrize("init", WEIGHT_INITS)
def test_output_at_init_is_the_base_output(init: str) -> None:
    base = tiny_llama()
    ids = token_ids()
    expected = base(ids).logits
    model = adapt(base, config(init))
    assert rel(model(ids).logits, expected) < 1e-5
    with model.disable_adapter():  # the residual alone is not the base
        assert rel(model(ids).logits, expected) > 1e-3


def test_pissa_is_the_top_r_singular_part_and_the_base_keeps_the_residual() -> None:
    base = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith("proj")}
    model = adapt(base, config("pissa", target_modules=TARGETS, use_rslora=True))
    for path, layer in lora_layers(model).items():
        u, s, vh = torch.linalg.svd(weights[path], full_matrices=False)
        top = (u[:, :4] * s[:4]) @ vh[:4]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta = layer.scaling["default"] * b @ a
        assert rel(delta, top) < 1e-4, path
        assert rel(layer.base_layer.weight + delta, weights[path]) < 1e-6
        # the singular values are split evenly between the factors (PEFT's convention)
        assert torch.allclose(a.norm(dim=1), b.norm(dim=0), rtol=1e-4)


def test_olora_is_the_qr_part() -> None:
    base = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith("proj")}
    model = adapt(base, config("olora"))
    for path, layer in lora_layers(model).items():
        q, r = torch.linalg.qr(weights[path])
        assert torch.allclose(layer.lora_A["default"].weight, r[:4], atol=1e-6)
        assert torch.allclose(layer.lora_B["default"].weight, q[:, :4], atol=1e-6)


def test_pissa_niter_is_torch_svd_lowrank_with_the_global_rng() -> None:
    weight = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().clone()
    torch.manual_seed(7)
    u, s, v = torch.svd_lowrank(weight, q=4, niter=3)
    base = tiny_llama()
    torch.manual_seed(7)
    model = adapt(base, config("pissa_niter_3", target_modules=["q_proj"]))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    root = (s / layer.scaling["default"]).sqrt()
    assert torch.allclose(layer.lora_B["default"].weight, u * root, atol=1e-6)
    assert torch.allclose(layer.lora_A["default"].weight, root[:, None] * v.T, atol=1e-6)


def test_gram_route_falls_back_to_the_svd_on_a_flat_spectrum() -> None:
    gen = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen))
    values = torch.logspace(0, -6, 32)
    weight = (q1[:, :32] * values) @ q2.T  # σ₄ / σ₁ ≈ 0.15 — and a run with σ down to 1e-6
    for r in (4, 24):
        u, s, vh = inits_module.top_singular(weight, r)
        assert torch.allclose(s, values[:r], rtol=1e-3, atol=1e-7)
        assert rel((u * s) @ vh, (q1[:, :r] * values[:r]) @ q2[:, :r].T) < 1e-4


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conv1d_weights_are_read_in_the_canonical_layout(init: str) -> None:
    base = tiny_gpt2()
    ids = token_ids()
    expected = base(ids).logits
    model = adapt(base, config(init, target_modules=["c_attn", "c_proj"]))
    assert rel(model(ids).logits, expected) < 1e-5
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].weight.shape == (4, layer.in_features)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_and_autocast(dtype: torch.dtype) -> None:
    base = tiny_llama().to(dtype)
    ids = token_ids()
    expected = base(ids).logits.float()
    model = adapt(base, config("pissa"))
    assert base.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    assert rel(model(ids).logits.float(), expected) < 3e-2  # the residual is stored in `dtype`
    fp32 = tiny_llama()
    ref = fp32(ids).logits
    model32 = adapt(fp32, config("olora"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model32(ids).logits
    assert rel(out.float(), ref) < 3e-2
    out.float().sum().backward()
    grads = [p.grad for n, p in model32.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("init", WEIGHT_INITS)
def test_delete_and_unload_give_the_original_base_back(init: str) -> None:
    base = tiny_llama()
    original = snapshot(base)
    model = adapt(base, config(init))
    randomise_adapters(model, scale=0.05)
    model.add_adapter("other", config(True, target_modules=["q_proj"]))
    model.delete_adapter("default")
    now = base.state_dict()
    assert all(torch.allclose(now[k], v, atol=1e-6) for k, v in original.items() if k in now)
    model = adapt(tiny_llama(), config(init))
    plain = model.unload()
    fresh = snapshot(plain)
    assert all(torch.allclose(fresh[k], v, atol=1e-6) for k, v in original.items())


def test_merge_and_unload_keeps_the_trained_model() -> None:
    base = tiny_llama()
    ids = token_ids()
    model = adapt(base, config("pissa"))
    randomise_adapters(model, scale=0.05)
    trained = model(ids).logits
    model.merge_adapter()
    assert torch.allclose(model(ids).logits, trained, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(model(ids).logits, trained, atol=1e-5)
    merged = model.merge_and_unload()
    assert torch.allclose(merged(ids).logits, trained, atol=1e-5)


def test_dora_magnitude_is_taken_after_the_residual() -> None:
    base = tiny_llama()
    ids = token_ids()
    expected = base(ids).logits
    model = adapt(base, config("pissa", use_dora=True))
    assert rel(model(ids).logits, expected) < 1e-5


def test_reloading_a_pissa_checkpoint_on_the_original_base(tmp_path: Path) -> None:
    ids = token_ids()
    model = adapt(tiny_llama(), config("pissa"))
    randomise_adapters(model, scale=0.05)
    trained = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    )
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.allclose(loaded(ids).logits, trained, atol=1e-5)


def test_reloading_a_randomised_pissa_checkpoint_warns(tmp_path: Path) -> None:
    adapt(tiny_llama(), config("pissa_niter_2")).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="randomised SVD"):
        AdaptedModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize(
    "options",
    [{}, {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3.0}}],
    ids=["plain", "rslora-patterns"],
)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_to_a_plain_lora_for_the_original_base(
    init: str, options: dict[str, Any], tmp_path: Path
) -> None:
    ids = token_ids()
    model = adapt(tiny_llama(), config(init, **options))
    model.save_pretrained(tmp_path / "init")
    randomise_adapters(model, scale=0.05)
    trained = model(ids).logits
    model.save_pretrained(
        tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init"
    )
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    grow = math.sqrt(2) if options else 2
    assert math.isclose(saved["lora_alpha"], 8 * grow)
    assert saved["rank_pattern"] == {k: 2 * v for k, v in options.get("rank_pattern", {}).items()}
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    assert torch.allclose(loaded(ids).logits, trained, atol=1e-5)
    # the initial folder is read, not rewritten (PEFT rewrites its config)
    assert (
        json.loads((tmp_path / "init" / "adapter_config.json").read_text())["init_lora_weights"]
        == init
    )


def test_conversion_refuses_what_it_cannot_convert(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), config("pissa"))
    with pytest.raises(CheckpointError, match="not an adapter folder"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path)
    adapt(tiny_llama(), config("pissa", target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    with pytest.raises(CheckpointError, match="not this adapter before training"):
        model.save_pretrained(
            tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "a"
        )
    adapt(tiny_llama(), config("pissa", lora_alpha=3)).save_pretrained(tmp_path / "b")
    with pytest.raises(CheckpointError, match="lora_alpha"):
        model.save_pretrained(
            tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "b"
        )
    assert not (tmp_path / "out").exists()


def test_config_validation() -> None:
    for bad in ("pisa", "pissa_niter_x", "EVA", 3, "OLoRA"):
        with pytest.raises(ConfigError, match="init_lora_weights"):
            config(bad)
    with pytest.raises(ConfigError, match="needs loftq_config"):
        config("loftq")
    for loftq, match in (
        ({"loftq_bits": 3}, "loftq_bits must be 4"),
        ({"loftq_bits": 4, "loftq_iter": 0}, "loftq_iter"),
        ({"loftq_bits": 4, "iters": 2}, "unknown keys"),
        ("4bit", "LoftQConfig"),
    ):
        with pytest.raises(ConfigError, match=match):
            config("loftq", loftq_config=loftq)
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        assert config("pissa", loftq_config=LoftQConfig()).loftq_config == {}
    assert config("loftq", loftq_config=LoftQConfig(8, 2)).loftq_config == {
        "loftq_bits": 8,
        "loftq_iter": 2,
    }
    with pytest.raises(ConfigError, match="target_parameters"):
        config("pissa", target_parameters=["experts.down_proj"])


def test_refusals_leave_the_model_as_it_was() -> None:
    base = tiny_llama()
    before = snapshot(base)
    layout = [type(m).__name__ for m in base.modules()]
    with pytest.raises(TargetError, match="rank r=80 is larger"):
        adapt(base, LoraConfig(r=80, target_modules=["k_proj"], init_lora_weights="olora"))
    with pytest.raises(TargetError, match="rank r=80 is larger"):  # the last layer refuses
        adapt(base, LoraConfig(r=80, target_modules=TARGETS, init_lora_weights="pissa"))
    assert [type(m).__name__ for m in base.modules()] == layout
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


@pytest.mark.skipif(
    importlib.util.find_spec("adapt.bnb") is not None,
    reason="adapt-bnb is installed (this runs in the adapt-lora session, which has no adapt-bnb)",
)
def test_loftq_without_a_quantiser_says_what_to_install() -> None:
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ConfigError, match="pip install adapt-bnb"):
        adapt(base, config("loftq", loftq_config=LoftQConfig(4)))
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


def test_a_failure_part_way_gives_the_base_back(monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_llama()
    before = snapshot(base)
    calls = {"n": 0}
    real = inits_module.pissa_factors

    def failing(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the user stops a long init
        return real(*args, **kw)

    monkeypatch.setattr("adapt.lora.weight_init.pissa_factors", failing)
    with pytest.raises(KeyboardInterrupt):
        adapt(base, config("pissa"))
    now = base.state_dict()
    assert calls["n"] == 5
    assert all(torch.allclose(now[k], v, atol=1e-6) for k, v in before.items())
    assert not any(hasattr(m, "lora_A") for m in base.modules())


def test_embeddings_keep_the_default_init_with_a_warning() -> None:
    base = tiny_llama()
    ids = token_ids()
    expected = base(ids).logits
    with pytest.warns(UserWarning, match="linear layers only"):
        model = adapt(base, config("olora", target_modules=["embed_tokens", "q_proj"]))
    assert rel(model(ids).logits, expected) < 1e-5


class _GridBackend(DenseBackend):
    """A toy quantiser: values rounded to a grid of 1/32 (what LoftQ sees of a backend)."""

    loftq_bits: ClassVar[int] = 4
    priority: ClassVar[int] = 100

    @staticmethod
    def roundtrip(weight: torch.Tensor) -> torch.Tensor:
        return (weight * 32).round() / 32


class _only_quantiser:
    """Register the toy quantiser for ``bits`` in-process (highest priority) for a block."""

    def __init__(self, bits: int) -> None:
        self.bits = bits

    def __enter__(self) -> None:
        from adapt.core.registry import get_registry

        self.registry = get_registry()
        backend = _GridBackend()
        backend.loftq_bits = self.bits  # type: ignore[misc]
        backend.base_types = ("adapt_tests.NoSuchModule",)  # serves no module: a quantiser only
        register_backend(backend, name=f"toy-grid-{self.bits}", priority=100)

    def __exit__(self, *exc: object) -> None:
        self.registry.unregister(GROUP_BACKENDS, f"toy-grid-{self.bits}")


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_fits_the_quantisation_error(iterations: int) -> None:
    base = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith("proj")}
    with _only_quantiser(bits=4):
        model = adapt(base, config("loftq", loftq_config=LoftQConfig(4, iterations)))
    for path, layer in lora_layers(model).items():
        w = weights[path]
        q = layer.base_layer.weight
        assert torch.equal(q, _GridBackend.roundtrip(q))  # the base is on the grid
        if iterations == 1:
            assert torch.equal(q, _GridBackend.roundtrip(w))
        fitted = (
            q.detach()
            + layer.scaling["default"]
            * layer.lora_B["default"].weight
            @ layer.lora_A["default"].weight
        )
        plain = w - _GridBackend.roundtrip(w)
        assert (w - fitted).norm() < plain.norm(), path
        if iterations == 1:  # the best rank-r fit of the error: ‖E − E_r‖² = ‖E‖² − Σ σᵢ²
            sigma = torch.linalg.svdvals(plain)[:4]
            expected = plain.norm() ** 2 - (sigma**2).sum()
            assert math.isclose(float((w - fitted).norm() ** 2), float(expected), rel_tol=1e-3)
        assert not len(layer.lora_init)  # LoftQ's base is the quantised one: nothing to restore


def test_reduced_matmul_precision_does_not_reach_the_decomposition() -> None:
    """Under ``torch.set_float32_matmul_precision("medium")`` (TF32 on CUDA, bf16 passes on
    the CPU) the Gram matrix, residual and restore still run in full float32."""
    base = tiny_llama()
    ids = token_ids()
    expected = base(ids).logits
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        model = adapt(base, config("pissa"))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert rel(model(ids).logits, expected) < 1e-5
