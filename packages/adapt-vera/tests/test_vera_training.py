"""VeRA's training step through ``W + ΔW`` (:mod:`adapt.vera.training`): the same output and
the same gradients as the definition's order, where it is taken and where it is not."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from adapt.core import adapt
from adapt.core.testing import counting_apply, loss_and_grads, recording_saved
from adapt.vera import VeraConfig
from adapt.vera.training import VeraMergedFunction, VeraScaledBasisFunction, merged_training_pays

transformers = pytest.importorskip("transformers")

from vera_testutils import tiny_llama, trained_vera  # noqa: E402


def definition(x: Any, w: Any, bias: Any, lb: Any, ld: Any, a: Any, b: Any) -> torch.Tensor:
    out: torch.Tensor = F.linear(x, w, bias) + lb * F.linear(ld * F.linear(x, a), b)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_function_equals_the_definition(dtype: torch.dtype, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)

    x, w, a, b = rand(3, 50, 24, grad=True), rand(40, 24), rand(16, 24), rand(40, 16)
    bias = rand(40, grad=True) if with_bias else None
    lb, ld = rand(40, grad=True), rand(16, grad=True)
    g = rand(3, 50, 40)
    leaves = [t for t in (x, bias, lb, ld) if t is not None]
    ref = definition(x, w, bias, lb, ld, a, b)
    ref_grads = torch.autograd.grad(ref, leaves, g)
    h = F.linear(x, a)
    out = VeraMergedFunction.apply(x, w, bias, lb, ld, a, b, h)  # type: ignore[no-untyped-call]
    grads = torch.autograd.grad(out, leaves, g)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert (out - ref).abs().max().item() < tol
    for got, want in zip(grads, ref_grads, strict=True):
        assert (got - want).abs().max().item() < tol * max(1.0, want.abs().max().item())


def test_cost_rule() -> None:
    assert merged_training_pays(1024, 512, 512)  # the bench model's attention
    assert merged_training_pays(1024, 1024, 2752)  # a wide up projection, 4 × 256 rows
    assert not merged_training_pays(1024, 2752, 1024)  # its down projection: no
    assert not merged_training_pays(16, 512, 512)  # few rows: the definition's order


def model_and_batch() -> tuple[Any, torch.Tensor]:
    ids = torch.randint(3, 64, (4, 48), generator=torch.Generator().manual_seed(1))
    return trained_vera(), ids


def test_model_step_equals_the_definitions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny Llama step (q/k/v and gate/up sharing their inputs' projection): the merged
    path is taken and gives the loss and every λ gradient of the definition's order."""
    model, ids = model_and_batch()
    with counting_apply(VeraMergedFunction) as count:
        loss, grads = loss_and_grads(model, ids)
    assert count.calls > 0
    monkeypatch.setattr("adapt.vera.layer.merged_training_pays", lambda *a: False)
    with counting_apply(VeraMergedFunction) as count:
        ref_loss, ref = loss_and_grads(model, ids)
    assert count.calls == 0
    assert abs(loss - ref_loss) < 1e-5
    assert grads.keys() == ref.keys() and len(grads) == 2 * 7 * 2
    for name, want in ref.items():
        assert (grads[name] - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("case", ["no_grad", "autocast", "dropout", "frozen", "few_rows"])
def test_not_taken_where_it_would_not_be_right_or_cheaper(case: str) -> None:
    model, ids = model_and_batch()
    if case == "dropout":
        model = adapt(tiny_llama(), VeraConfig(r=16, vera_dropout=0.1, target_modules=["q_proj"]))
        model.train()
    if case == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    if case == "few_rows":
        ids = ids[:1, :4]
    with counting_apply(VeraMergedFunction) as count:
        if case == "no_grad":
            with torch.no_grad():
                model(input_ids=ids)
        else:
            loss_and_grads(model, ids, torch.bfloat16 if case == "autocast" else None)
    assert count.calls == 0


@pytest.mark.compile
def test_under_torch_compile_without_graph_breaks() -> None:
    """The merged step compiles into one graph (aot_eager: autograd included) and gives the
    eager gradients."""
    import torch._dynamo

    model, ids = model_and_batch()
    _, eager = loss_and_grads(model, ids)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explained.graph_break_count == 0
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _, got = loss_and_grads(compiled, ids)
    for name, want in eager.items():
        key = name if name in got else f"_orig_mod.{name}"
        assert (got[key] - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_w_plus_delta_w_is_kept_only_for_the_input_gradient(x_needs_grad: bool) -> None:
    """``W + ΔW`` (out × in) serves only ``∂x``: where the input needs no gradient (a first
    layer's q/k/v) the node keeps no weight-sized tensor, and the λ gradients are the
    definition's."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 24, generator=gen).requires_grad_(x_needs_grad)
    w, a, b = torch.randn(40, 24, generator=gen), torch.randn(16, 24), torch.randn(40, 16)
    lb, ld = torch.randn(40).requires_grad_(), torch.randn(16).requires_grad_()
    h = F.linear(x, a).detach()
    with recording_saved() as saved:
        out = VeraMergedFunction.apply(x, w, None, lb, ld, a, b, h)  # type: ignore[no-untyped-call]
    weight_sized = [t for t in saved if t.shape == w.shape]
    assert len(weight_sized) == int(x_needs_grad)
    g = torch.randn(2, 7, 40, generator=gen)
    leaves = [x, lb, ld] if x_needs_grad else [lb, ld]
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(definition(x, w, None, lb, ld, a, b), leaves, g)
    for grad, ref in zip(got, want, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("h_needs_grad", [False, True])
def test_the_scaled_slice_is_kept_only_for_the_projection_gradient(h_needs_grad: bool) -> None:
    """Under autocast the folded ``λ_b ⊙ B_s ⊙ λ_dᵀ`` (bfloat16, out × r) serves only ``∂h``."""
    h = torch.randn(5, 8).to(torch.bfloat16).requires_grad_(h_needs_grad)
    lb, ld = torch.randn(6).requires_grad_(), torch.randn(8).requires_grad_()
    b = torch.randn(6, 8)
    with recording_saved() as saved:
        out = VeraScaledBasisFunction.apply(
            torch.zeros(5, 6, dtype=torch.bfloat16), h, lb, ld, b, False
        )  # type: ignore[no-untyped-call]
    folded = [t for t in saved if t.dtype == torch.bfloat16 and t.shape == b.shape]
    assert len(folded) == int(h_needs_grad)
    grads = torch.autograd.grad(out.float().sum(), [lb, ld])
    p = torch.ones(5, 6).t() @ h.float()  # P = gᵀ h
    want = ((p * b) @ ld.detach(), lb.detach() @ (p * b))
    for grad, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(grad, ref, rtol=2e-2, atol=2e-2)
