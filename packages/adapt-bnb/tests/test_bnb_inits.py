"""Weight-derived LoRA initialisations with real bitsandbytes layers (on the CPU): OLoRA on
quantised bases, the refusals of PiSSA and in-place LoftQ there, LoftQ on a float model with
bitsandbytes' quantiser, ``replace_lora_weights_loftq`` on a transformers 4-bit Llama, and the
base weight given back when an OLoRA adapter is deleted or unloaded."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from bnb_testutils import (
    MAIN_KINDS,
    Net,
    dense_net,
    ids,
    llama_folder,
    load_llama,
    quantise,
    quantised_net,
    raw_storage,
)
from torch import nn

from adapt.bnb import FourBitBackend, Int8Backend
from adapt.core import AdaptedModel, CheckpointError, ConfigError, TargetError, adapt
from adapt.core.testing import tiny_llama
from adapt.lora import LoftQConfig, LoraConfig, replace_lora_weights_loftq

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: relative (Frobenius) output error of the OLoRA model at init vs the quantised base model:
#: measured 0.0074 (8bit), 0.121 (nf4), 0.170 (fp4) on x_batch(), bounds with room
OLORA_OUTPUT_TOL = {"8bit": 0.02, "nf4": 0.25, "fp4": 0.3}


def backend(kind: str) -> Int8Backend | FourBitBackend:
    return Int8Backend() if kind == "8bit" else FourBitBackend()


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def x_batch(seed: int = 3) -> torch.Tensor:
    return torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))


def factors(layer: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
    a = layer.lora_A["default"].weight.detach().float()
    b = layer.lora_B["default"].weight.detach().float()
    return a, b, float(layer.scaling["default"])


def tail_norm(matrix: torch.Tensor, r: int) -> float:
    """‖matrix − its best rank-r approximation‖ (Eckart–Young)."""
    return float(torch.linalg.svdvals(matrix)[r:].norm())


# --------------------------------------------------------------------------- OLoRA


@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_olora_on_a_quantised_base(kind: str) -> None:
    net = quantised_net(kind)
    be = backend(kind)
    before = {n: be.get_weight(getattr(net, n)).float().clone() for n in ("up", "down")}
    x = x_batch()
    with torch.no_grad():
        base_out = net(x)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights="olora")
    with pytest.warns(UserWarning, match="quantised again") as record:
        model = adapt(net, config)
    message = next(str(w.message) for w in record if "quantised again" in str(w.message))
    found = re.search(r"relative weight error ([0-9.e+-]+)", message)
    assert found is not None, message
    reported = float(found.group(1))
    worst = 0.0
    for path, layer in model.adapter_layers():
        w = before[path]
        q, r_factor = torch.linalg.qr(w)
        a, b, s = factors(layer)
        torch.testing.assert_close(a, r_factor[:4], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, q[:, :4], rtol=1e-5, atol=1e-6)
        residual = w - s * b @ a
        err = rel(be.get_weight(layer.base_layer), residual)
        assert err < be.max_rel_error, f"{kind} {path}: {err:.3g}"
        worst = max(worst, err)
    assert reported == pytest.approx(worst, rel=1e-2)
    with torch.no_grad():
        out = model(x)
        with model.disable_adapter():
            residual_out = model(x)
    err = rel(out, base_out)
    print(f"OLoRA {kind}: weight error {worst:.4f}, output error at init {err:.4f}")
    assert err < OLORA_OUTPUT_TOL[kind]
    # the adapter carries a large part of the output: without it the model is far off
    assert rel(residual_out, base_out) > 0.5  # measured 0.77 (fp4)


# --------------------------------------------------------------------------- refusals


def snapshot(model: nn.Module) -> tuple[list[tuple[str, type]], dict[str, torch.Tensor]]:
    layout = [(name, type(m)) for name, m in model.named_modules()]
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            tensors.update({f"{name}:raw:{k}": v for k, v in raw_storage(module).items()})
    return layout, tensors


def assert_unchanged(model: nn.Module, before: tuple[list[tuple[str, type]], Any]) -> None:
    layout, tensors = snapshot(model)
    assert layout == before[0]
    assert tensors.keys() == before[1].keys()
    for key, value in tensors.items():
        old = before[1][key]
        assert value.dtype == old.dtype and torch.equal(value, old), key


@pytest.mark.parametrize("kind", MAIN_KINDS)
@pytest.mark.parametrize(
    ("init", "match"),
    [
        ("pissa", "PiSSA on a quantised layer"),
        ("pissa_niter_2", "PiSSA on a quantised layer"),
        ("loftq", "replace_lora_weights_loftq"),
    ],
)
def test_pissa_and_loftq_are_refused_on_a_quantised_base(kind: str, init: str, match: str) -> None:
    net = quantised_net(kind)
    before = snapshot(net)
    extra: dict[str, Any] = {"loftq_config": LoftQConfig()} if init == "loftq" else {}
    config = LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=init, **extra)
    with pytest.raises(TargetError, match=match):
        adapt(net, config)
    assert_unchanged(net, before)


# --------------------------------------------------------------------------- LoftQ, float model


def loftq_model(bits: int, iterations: int) -> AdaptedModel:
    loftq = LoftQConfig(loftq_bits=bits, loftq_iter=iterations)
    config = LoraConfig(
        r=8,
        lora_alpha=16,  # s = 2: the factors are scaled so that s·BA fits W − Q
        target_modules=["up", "down"],
        init_lora_weights="loftq",
        loftq_config=loftq,
    )
    return adapt(dense_net(0), config)


@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_on_a_float_model_reduces_the_quantisation_error(bits: int, iterations: int) -> None:
    roundtrip = FourBitBackend.roundtrip if bits == 4 else Int8Backend.roundtrip
    reference = dense_net(0).eval()
    originals = {n: getattr(reference, n).weight.detach().clone() for n in ("up", "down")}
    model = loftq_model(bits, iterations).eval()
    plain = dense_net(0).eval()  # the quantised model without adapter
    with torch.no_grad():
        for name, w in originals.items():
            getattr(plain, name).weight.copy_(roundtrip(w))
    for path, layer in model.adapter_layers():
        w, q = originals[path], layer.base_layer.weight.detach()
        a, b, s = factors(layer)
        if iterations == 1:
            assert torch.equal(q, roundtrip(w)), path
        loftq_err = float((w - (q + s * b @ a)).norm())
        quant_err = float((w - roundtrip(w)).norm())
        # s·BA is the best rank-r part of W − Q: with alpha ≠ r that holds only if the
        # factors carry 1/√s each
        assert loftq_err == pytest.approx(tail_norm(w - q, 8), rel=1e-3)
        assert loftq_err < quant_err, path
        print(
            f"LoftQ {bits}-bit iter {iterations} {path}: weight error "
            f"{loftq_err / w.norm():.4f} vs quantised {quant_err / w.norm():.4f}"
        )
    x = x_batch()
    with torch.no_grad():
        want = reference(x)
        loftq_out, plain_out = rel(model(x), want), rel(plain(x), want)
    print(f"LoftQ {bits}-bit iter {iterations}: output error {loftq_out:.4f} vs {plain_out:.4f}")
    assert loftq_out < plain_out


@pytest.mark.parametrize("iterations", [1, 2])
def test_loftq_base_quantised_for_real_gives_the_same_model(iterations: int) -> None:
    model = loftq_model(4, iterations)
    base = model.get_base_model()
    real = Net(quantise(base.up.base_layer, "nf4"), quantise(base.down.base_layer, "nf4"))
    for name in ("up", "down"):
        q = getattr(base, name).base_layer.weight.detach()
        # the dequantised Q is on nf4's grid: it quantises to itself
        assert torch.equal(FourBitBackend().get_weight(getattr(real, name)), q), name
    quantised = adapt(real, LoraConfig(r=8, lora_alpha=16, target_modules=["up", "down"]))
    layers = dict(quantised.adapter_layers())
    with torch.no_grad():
        for path, layer in model.adapter_layers():
            for attr in ("lora_A", "lora_B"):
                target = getattr(layers[path], attr)["default"].weight
                target.copy_(getattr(layer, attr)["default"].weight)
    x = x_batch()
    for training in (True, False):
        model.train(training)
        quantised.train(training)
        with torch.no_grad():
            err = rel(quantised(x), model(x))
        # train mode: bnb's dequantising matmul, exact up to float rounding; eval mode: the
        # CPU kernel repacks the weight with bfloat16 absmax (measured 0.0048)
        assert err < (1e-5 if training else 0.02), (training, err)


# --------------------------------------------------------------------------- transformers 4-bit


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    path = llama_folder(tmp_path_factory.mktemp("llama"))
    try:
        load_llama(path, "nf4")
    except AttributeError as exc:  # transformers 4.46 cannot load bnb models on the CPU
        pytest.skip(f"transformers {transformers.__version__} cannot load bnb on the CPU: {exc}")
    return path


@pytest.fixture(scope="module")
def float_logits() -> torch.Tensor:
    with torch.no_grad():
        return tiny_llama(0).eval()(input_ids=ids()).logits  # type: ignore[no-any-return]


def qlora(folder: Path) -> AdaptedModel:
    return adapt(load_llama(folder, "nf4"), LoraConfig(r=8, target_modules=LLAMA_TARGETS)).eval()


def lora_factors(model: AdaptedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_replace_lora_weights_loftq_reduces_the_error(
    folder: Path, float_logits: torch.Tensor
) -> None:
    model = qlora(folder)
    with torch.no_grad():
        before = rel(model(input_ids=ids()).logits, float_logits)
    replace_lora_weights_loftq(model, model_path=folder)
    with torch.no_grad():
        after = rel(model(input_ids=ids()).logits, float_logits)
    print(f"replace_lora_weights_loftq: logits error {before:.4f} (QLoRA init) -> {after:.4f}")
    assert after < before
    reference = tiny_llama(0)
    layers = list(model.adapter_layers())
    assert len(layers) == 2 * len(LLAMA_TARGETS)
    for path, layer in layers:
        w = reference.get_submodule(path).weight.detach()
        q = layer.backend.get_weight(layer.base_layer).float()
        a, b, s = factors(layer)
        err = float((w - (q + s * b @ a)).norm())
        assert err < float((w - q).norm()), path
        assert err == pytest.approx(tail_norm(w - q, 8), rel=1e-3), path


def test_replace_callback_can_reject_every_layer(folder: Path) -> None:
    model = qlora(folder)
    before = lora_factors(model)
    seen: list[str] = []

    def reject(m: nn.Module, name: str) -> bool:
        assert m is model
        seen.append(name)
        return False

    replace_lora_weights_loftq(model, model_path=folder, callback=reject)
    assert sorted(seen) == sorted(p for p, _ in model.adapter_layers())
    after = lora_factors(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_replace_needs_the_float_safetensors(folder: Path, tmp_path: Path) -> None:
    shutil.copy(folder / "config.json", tmp_path / "config.json")  # a folder without weights
    model = qlora(folder)
    before = lora_factors(model)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        replace_lora_weights_loftq(model, model_path=tmp_path)
    after = lora_factors(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_replace_needs_a_quantised_lora_layer(folder: Path) -> None:
    model = adapt(tiny_llama(0), LoraConfig(r=8, target_modules=LLAMA_TARGETS))
    with pytest.raises(ConfigError, match="no LoRA layer"):
        replace_lora_weights_loftq(model, model_path=folder)


def test_replace_finds_the_folder_the_model_was_loaded_from(folder: Path) -> None:
    model = qlora(folder)
    # transformers records the folder a model was loaded from
    assert model.get_base_model().config._name_or_path == str(folder)
    replace_lora_weights_loftq(model)
    explicit = qlora(folder)
    replace_lora_weights_loftq(explicit, model_path=folder)
    got, want = lora_factors(model), lora_factors(explicit)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # no folder to read from: a ConfigError, not a guess
    model.get_base_model().config._name_or_path = "no/such/folder"
    with pytest.raises(ConfigError, match="model_path"):
        replace_lora_weights_loftq(model)


# --------------------------------------------------------------------------- removing OLoRA


@pytest.mark.filterwarnings("ignore:.*quantised again")
@pytest.mark.parametrize("how", ["delete", "unload"])
@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_removing_an_olora_adapter_gives_the_base_back(kind: str, how: str) -> None:
    net = quantised_net(kind)
    be = backend(kind)
    before = {n: be.get_weight(getattr(net, n)).float().clone() for n in ("up", "down")}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights="olora")
    model = adapt(net, config)
    residual = {}
    for path, layer in model.adapter_layers():
        a, b, _ = factors(layer)
        record = layer.lora_init["default"]
        assert torch.equal(record.a, a) and torch.equal(record.b, b)
        residual[path] = be.get_weight(layer.base_layer).float().clone()
    # A₀, B₀ are kept out of every state dict (non-persistent buffers)
    assert not [k for k in model.state_dict() if "lora_init" in k]
    if how == "delete":
        model.delete_adapter("default")
        restored: nn.Module = model.get_base_model()
    else:
        restored = model.unload()
    for name, w in before.items():
        module = getattr(restored, name)
        assert type(module).__name__ == ("Linear8bitLt" if kind == "8bit" else "Linear4bit")
        err = rel(be.get_weight(module), w)
        # s·B₀A₀ is back (measured 0.0055-0.0068 int8, 0.14-0.15 nf4, 0.18 fp4: two
        # quantisations); the residual alone is ~0.6 away
        assert err < be.max_rel_error, f"{kind} {name}: {err:.3g}"
        assert rel(residual[name], w) > 0.4
