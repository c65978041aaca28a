"""VeRA's training nodes (:mod:`adapt.vera.training`): the step through ``W + ΔW`` and the
definition's products in one node; the same output and the same gradients as the definition's
order, where each is taken and where neither is."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from adapt.core import AdapterLayer, adapt
from adapt.core.basis import ProjectionReaders
from adapt.core.testing import counting_apply, loss_and_grads, recording_saved
from adapt.vera import VeraConfig, VeraLinear
from adapt.vera.training import (
    VeraLinearFunction,
    VeraMergedFunction,
    VeraScaledBasisFunction,
    merged_training_pays,
)

transformers = pytest.importorskip("transformers")

from vera_testutils import tiny_llama, trained_vera  # noqa: E402


def definition(x: Any, w: Any, bias: Any, lb: Any, ld: Any, a: Any, b: Any) -> torch.Tensor:
    out: torch.Tensor = F.linear(x, w, bias) + lb * F.linear(ld * F.linear(x, a), b)
    return out


def readers(count: int) -> ProjectionReaders:
    kept = ProjectionReaders()
    kept.count = count
    return kept


def apply_node(node: str, *args: Any) -> torch.Tensor:
    """One of the training nodes on ``(x, w, bias, λ_b, λ_d, A_s, B_s, h)``: "merged"
    (:class:`VeraMergedFunction`), "linear" (:class:`VeraLinearFunction`, ``h`` read by
    this layer alone) or "linear-shared" (``h`` counted with two readers)."""
    out: torch.Tensor
    if node == "merged":
        out = VeraMergedFunction.apply(*args)  # type: ignore[no-untyped-call]
    else:
        kept = readers(2 if node == "linear-shared" else 1)
        out = VeraLinearFunction.apply(*args, kept)  # type: ignore[no-untyped-call]
    return out


@pytest.mark.parametrize("node", ["merged", "linear", "linear-shared"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_function_equals_the_definition(node: str, dtype: torch.dtype, with_bias: bool) -> None:
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
    out = apply_node(node, x, w, bias, lb, ld, a, b, h)
    grads = torch.autograd.grad(out, leaves, g)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert (out - ref).abs().max().item() < tol
    for got, want in zip(grads, ref_grads, strict=True):
        assert (got - want).abs().max().item() < tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("count", [1, 2, 3])
def test_one_reader_folds_the_projection_gradient_into_the_input_gradient(count: int) -> None:
    """With one reader of ``h`` the node adds ``∂h A_s`` into its own ``∂x`` and ``h`` gets no
    gradient (no input-sized gradient of its own for autograd to add); with several, ``∂h``
    goes to ``h`` (autograd sums the readers' before one product with ``A_s``). ``∂x`` is
    the definition's either way, also when the other readers add theirs."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 24, generator=gen, dtype=torch.float64).requires_grad_()
    w, a = torch.randn(40, 24, dtype=torch.float64), torch.randn(16, 24, dtype=torch.float64)
    b = torch.randn(40, 16, dtype=torch.float64)
    lbs = [torch.randn(40, dtype=torch.float64).requires_grad_() for _ in range(count)]
    lds = [torch.randn(16, dtype=torch.float64).requires_grad_() for _ in range(count)]
    h = F.linear(x, a)
    reached: list[torch.Tensor] = []
    h.register_hook(reached.append)
    kept = readers(count)
    outs = [
        VeraLinearFunction.apply(x, w, None, lb, ld, a, b, h, kept)  # type: ignore[no-untyped-call]
        for lb, ld in zip(lbs, lds, strict=True)
    ]
    g = torch.randn(2, 9, 40, generator=gen, dtype=torch.float64)
    leaves = [x, *lbs, *lds]
    got = torch.autograd.grad(sum(o * g for o in outs).sum(), leaves)
    ref = sum(definition(x, w, None, lb, ld, a, b) * g for lb, ld in zip(lbs, lds, strict=True))
    want = torch.autograd.grad(ref.sum(), leaves)
    # one reader: autograd may still visit h, with no gradient (nothing to compute)
    assert any(t is not None for t in reached) == (count > 1)
    for grad, expected in zip(got, want, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


def test_cost_rule() -> None:
    assert merged_training_pays(1024, 512, 512)  # the bench model's attention
    assert merged_training_pays(1024, 1024, 2752)  # a wide up projection, 4 × 256 rows
    assert not merged_training_pays(1024, 2752, 1024)  # its down projection: no
    assert not merged_training_pays(16, 512, 512)  # few rows: the definition's order


def model_and_batch() -> tuple[Any, torch.Tensor]:
    ids = torch.randint(3, 64, (4, 48), generator=torch.Generator().manual_seed(1))
    return trained_vera(), ids


@pytest.mark.parametrize("node", ["merged", "linear"])
def test_model_step_equals_the_definitions(node: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny Llama step (q/k/v and gate/up sharing their inputs' projection, o and down
    reading theirs alone): every layer takes the node the cost rule picks, and the loss and
    every λ gradient are those of the general path (no training node)."""
    model, ids = model_and_batch()
    if node == "linear":
        monkeypatch.setattr("adapt.vera.layer.merged_training_pays", lambda *a: False)
    taken, other = (
        (VeraMergedFunction, VeraLinearFunction)
        if node == "merged"
        else (VeraLinearFunction, VeraMergedFunction)
    )
    with counting_apply(taken) as count, counting_apply(other) as not_taken:
        loss, grads = loss_and_grads(model, ids)
    assert count.calls == 2 * 7 and not_taken.calls == 0
    monkeypatch.setattr(VeraLinear, "fused_forward", AdapterLayer.fused_forward)
    with counting_apply(VeraMergedFunction) as merged, counting_apply(VeraLinearFunction) as lin:
        ref_loss, ref = loss_and_grads(model, ids)
    assert merged.calls == lin.calls == 0
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
    with counting_apply(VeraMergedFunction) as count, counting_apply(VeraLinearFunction) as lin:
        if case == "no_grad":
            with torch.no_grad():
                model(input_ids=ids)
        else:
            loss_and_grads(model, ids, torch.bfloat16 if case == "autocast" else None)
    assert count.calls == 0
    # few rows: the definition's products, in one node with the base's
    assert lin.calls == (2 * 7 if case == "few_rows" else 0)


@pytest.mark.compile
@pytest.mark.parametrize("node", ["merged", "linear"])
def test_under_torch_compile_without_graph_breaks(
    node: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both training nodes compile into one graph (aot_eager: autograd included) and give the
    eager gradients."""
    import torch._dynamo

    if node == "linear":
        monkeypatch.setattr("adapt.vera.layer.merged_training_pays", lambda *a: False)
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


@pytest.mark.parametrize("frozen", ["x", "lambda_b", "lambda_d", "bias", "none"])
def test_linear_node_with_frozen_inputs_keeps_what_the_general_path_keeps(frozen: str) -> None:
    """Every combination of what needs a gradient: the definition's gradients, and the same
    saved activations (bytes, the frozen weight and slices aside) as the general path's
    ``result.addcmul_(λ_b, F.linear(λ_d ⊙ h, B_s))``."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 7, 24, generator=gen, dtype=torch.float64).requires_grad_(frozen != "x")
    w, a = torch.randn(40, 24, dtype=torch.float64), torch.randn(16, 24, dtype=torch.float64)
    b = torch.randn(40, 16, dtype=torch.float64)
    bias = torch.randn(40, dtype=torch.float64).requires_grad_(frozen != "bias")
    lb = torch.randn(40, dtype=torch.float64).requires_grad_(frozen != "lambda_b")
    ld = torch.randn(16, dtype=torch.float64).requires_grad_(frozen != "lambda_d")
    leaves = [t for t in (x, bias, lb, ld) if t.requires_grad]

    def activation_bytes(saved: Any) -> int:
        """Bytes of the distinct saved tensors shaped like activations (rows first)."""
        distinct = {
            (t.data_ptr(), t.numel() * t.element_size())
            for t in saved.tensors
            if t.dim() > 1 and t.shape[:2] == x.shape[:2]
        }
        return sum(size for _, size in distinct)

    h = F.linear(x, a)
    with recording_saved() as ours:
        out = VeraLinearFunction.apply(x, w, bias, lb, ld, a, b, h, None)  # type: ignore[no-untyped-call]
    with recording_saved() as general:
        ref = F.linear(x, w, bias).addcmul_(lb, F.linear(ld * F.linear(x, a), b))
    g = torch.randn(2, 7, 40, generator=gen, dtype=torch.float64)
    for got, want in zip(
        torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert activation_bytes(ours) <= activation_bytes(general), (ours.tensors, general.tensors)


@pytest.mark.parametrize("node", ["merged", "linear"])
def test_no_second_derivative_is_refused_not_wrong(node: str) -> None:
    """The nodes' backwards reuse products kept without a graph: a ``create_graph`` backward
    raises and says how to get higher-order gradients, instead of returning wrong ones."""
    x = torch.randn(3, 24).requires_grad_()
    w, a, b = torch.randn(40, 24), torch.randn(16, 24), torch.randn(40, 16)
    lb, ld = torch.randn(40).requires_grad_(), torch.randn(16).requires_grad_()
    out = apply_node(node, x, w, None, lb, ld, a, b, F.linear(x, a))
    with pytest.raises(RuntimeError, match=r"no second derivative.*fuse_adapter_output"):
        torch.autograd.grad(out.sum(), [lb], create_graph=True)


def test_the_definition_node_keeps_no_input_sized_tensor() -> None:
    """:class:`VeraLinearFunction` keeps ``h`` and the product ``B_s(λ_d ⊙ h)`` (what the
    general path keeps), views of the frozen weight and slices, never the input."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 24, generator=gen).requires_grad_()
    w, a, b = torch.randn(40, 24, generator=gen), torch.randn(16, 24), torch.randn(40, 16)
    lb, ld = torch.randn(40).requires_grad_(), torch.randn(16).requires_grad_()
    h = F.linear(x, a)
    with recording_saved() as saved:
        VeraLinearFunction.apply(x, w, None, lb, ld, a, b, h, None)  # type: ignore[no-untyped-call]
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(40, 24), (16, 24), (40, 16), (2, 7, 16), (2, 7, 40), (40,), (16,)])
