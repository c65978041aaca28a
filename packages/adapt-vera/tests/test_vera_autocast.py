"""VeRA under bf16 autocast (:class:`adapt.vera.training.VeraScaledBasisFunction`): the λ
folded into the basis slice, one GEMM onto the base output; values and gradients against a
float64 definition, a model step against the definition's order, and where it is not taken."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from adapt.core.testing import counting_apply, loss_and_grads
from adapt.vera.layer import VeraLinear
from adapt.vera.training import VeraScaledBasisFunction

transformers = pytest.importorskip("transformers")

from vera_testutils import GPT2_TARGETS, tiny_gpt2, tiny_llama, trained_vera  # noqa: E402

BF16 = torch.bfloat16


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_function_equals_the_definition(in_place: bool, rows: int) -> None:
    """bf16 result and h, float32 λ and slice: the output and the gradients of result, h, λ_b
    and λ_d agree with the float64 definition ``result + λ_b ⊙ (B_s (λ_d ⊙ h))`` to bf16
    rounding (relative error ≤ 1e-2; float32 λ gradients as float32)."""
    gen = torch.Generator().manual_seed(0)
    out, r = 40, 24

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    result = rand(3, rows, out).to(BF16)
    h = rand(3, rows, r).to(BF16)
    lb, ld, b = rand(out), rand(r), rand(out, r)
    g = rand(3, rows, out).to(BF16)

    ref_leaves = [t.double().requires_grad_() for t in (result, h, lb, ld)]
    r64, h64, lb64, ld64 = ref_leaves
    ref = r64 + lb64 * F.linear(ld64 * h64, b.double())
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())

    leaves = [result.clone().requires_grad_(), h.clone().requires_grad_()]
    lbg, ldg = lb.clone().requires_grad_(), ld.clone().requires_grad_()
    base = leaves[0] * 1 if in_place else leaves[0]  # in place needs a non-leaf result
    got = VeraScaledBasisFunction.apply(base, leaves[1], lbg, ldg, b, in_place)  # type: ignore[no-untyped-call]
    assert got.dtype == BF16 and (got is base) == in_place
    grads = torch.autograd.grad(got, [*leaves, lbg, ldg], g)
    assert rel_err(got, ref) < 1e-2
    names = ("result", "h", "λ_b", "λ_d")
    for t, grad, want in zip(names, grads, ref_grads, strict=True):
        assert grad.dtype == (BF16 if t in ("result", "h") else torch.float32), t
        assert rel_err(grad, want) < 1e-2, t


def test_no_gradient_asked_for_frozen_lambdas() -> None:
    h = torch.randn(5, 8).to(BF16).requires_grad_()
    lb, ld, b = torch.randn(6), torch.randn(8), torch.randn(6, 8)
    out = VeraScaledBasisFunction.apply(torch.zeros(5, 6, dtype=BF16), h, lb, ld, b, False)  # type: ignore[no-untyped-call]
    (grad_h,) = torch.autograd.grad(out.float().sum(), [h])
    want = torch.ones(5, 6) @ (lb[:, None] * b * ld)
    assert rel_err(grad_h, want) < 1e-2


def batch(vocab: int = 64) -> torch.Tensor:
    return torch.randint(3, vocab, (4, 24), generator=torch.Generator().manual_seed(1))


def step(m: Any, ids: torch.Tensor, autocast: bool = True) -> tuple[float, dict[str, torch.Tensor]]:
    return loss_and_grads(m, ids, BF16 if autocast else None)


def definition_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the layers take the definition's order under autocast (the path before the node)."""
    monkeypatch.setattr(VeraLinear, "folds_lambdas", lambda self, *args: False)


@pytest.mark.parametrize("case", ["llama", "gpt2", "dropout"])
def test_model_step_matches_the_definition_order(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16-autocast step of a tiny Llama (plain Linear: in place) and GPT-2 (Conv1D: out of
    place): the node is taken on every targeted layer and its loss and λ gradients are as close
    to the float32 step's as the definition's order under the same autocast is (bf16 rounding)."""
    if case == "gpt2":
        m, ids = trained_vera(tiny_gpt2, GPT2_TARGETS), batch(100)
    else:
        m, ids = trained_vera(vera_dropout=0.1 if case == "dropout" else 0.0), batch()
    n_layers = 4 * 2 if case == "gpt2" else 7 * 2
    torch.manual_seed(3)
    ref_loss, ref = step(m, ids, autocast=False)  # float32: the yardstick
    with counting_apply(VeraScaledBasisFunction) as count:
        torch.manual_seed(3)
        loss, grads = step(m, ids)
    assert count.calls == n_layers
    definition_order(monkeypatch)
    with counting_apply(VeraScaledBasisFunction) as count:
        torch.manual_seed(3)
        def_loss, def_grads = step(m, ids)
    assert count.calls == 0
    assert grads.keys() == ref.keys() == def_grads.keys() and len(grads) == 2 * n_layers
    assert abs(loss - ref_loss) <= max(2 * abs(def_loss - ref_loss), 5e-3 * abs(ref_loss))
    for name, want in ref.items():
        assert grads[name].dtype == torch.float32
        err, def_err = rel_err(grads[name], want), rel_err(def_grads[name], want)
        assert err <= max(2 * def_err, 2e-2), (name, err, def_err)


def test_inference_under_autocast_matches_the_definition_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m, ids = trained_vera().eval(), batch()
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        with counting_apply(VeraScaledBasisFunction) as count, torch.autocast("cpu", dtype=BF16):
            got = m(input_ids=ids).logits
        assert count.calls > 0  # short inputs of small layers take the W + ΔW forward instead
        definition_order(monkeypatch)
        with torch.autocast("cpu", dtype=BF16):
            want = m(input_ids=ids).logits
    assert rel_err(got, ref) <= max(2 * rel_err(want, ref), 1e-2)


@pytest.mark.parametrize("case", ["float32", "fp16 autocast", "bf16 base"])
def test_not_taken_outside_bf16_autocast(case: str) -> None:
    """float32 keeps its paths; fp16 autocast keeps the definition's order (a float16 P = gᵀ h
    could overflow under a loss scaler); a bf16 base without autocast keeps its float32
    adapter arithmetic (PEFT's values)."""
    m, ids = trained_vera(), batch()
    if case == "bf16 base":
        m = trained_vera(lambda: tiny_llama().to(BF16))
    with counting_apply(VeraScaledBasisFunction) as count:
        loss_and_grads(m, ids, torch.float16 if case == "fp16 autocast" else None)
    assert count.calls == 0


@pytest.mark.compile
def test_under_torch_compile_and_autocast() -> None:
    """The node compiles (aot_eager: autograd included) under bf16 autocast, without graph
    breaks, to the eager step's gradients."""
    import torch._dynamo

    m, ids = trained_vera(), batch()
    _, eager = step(m, ids)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=BF16):
        explained = torch._dynamo.explain(m)(input_ids=ids, labels=ids)
    assert explained.graph_break_count == 0
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    _, got = step(compiled, ids)
    for name, want in eager.items():
        key = name if name in got else f"_orig_mod.{name}"
        assert rel_err(got[key], want) < 3e-2, name  # bf16 rounding in another op order
