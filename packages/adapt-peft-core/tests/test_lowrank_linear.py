"""``LowRankLinearFunction`` (LoRA's and AdaLoRA's training node) against the definition
``x Wᵀ + b + s·(x Aᵀ) Bᵀ`` in every layout its products take (``rank_major_is_faster``):
float32 and bfloat16, ranks on both sides of the rules (factor gradients: float32 r ≤ 8,
bfloat16 r ≤ 32), thin and wide inputs and outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapt.core.kernels import rank_major_is_faster
from adapt.core.lowrank_linear import LowRankLinearFunction, low_rank_linear
from adapt.core.testing import recording_saved

CASES = [
    (r, n_in, n_out)
    for r in (1, 4, 8, 16, 32)
    for n_in, n_out in ((24, 40), (1024, 48), (40, 2048))
]


def _tensors(
    r: int, n_in: int, n_out: int, dtype: torch.dtype, bias: bool
) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(r * 7 + n_in)
    x = torch.randn(2, 3, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g) / n_in**0.5
    b = torch.randn(n_out, generator=g) if bias else None
    a = torch.randn(r, n_in, generator=g) / n_in**0.5
    bb = torch.randn(n_out, r, generator=g)
    return [None if t is None else t.to(dtype) for t in (x, w, b, a, bb)]


def _grads(
    fn: object, tensors: list[torch.Tensor | None], upstream: torch.Tensor
) -> list[torch.Tensor]:
    leaves = [
        None if t is None else t.clone().requires_grad_(i != 1) for i, t in enumerate(tensors)
    ]
    out = fn(*leaves)  # type: ignore[operator]
    (out.float() * upstream).sum().backward()
    return [out] + [t.grad for t in leaves if t is not None and t.grad is not None]


def _definition(x, w, b, a, bb, scale=0.5):  # type: ignore[no-untyped-def]
    return F.linear(x, w, b) + scale * ((x @ a.t()) @ bb.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("r", "n_in", "n_out"), CASES)
def test_values_and_gradients_equal_the_definition(
    dtype: torch.dtype, r: int, n_in: int, n_out: int
) -> None:
    tensors = _tensors(r, n_in, n_out, dtype, bias=r % 2 == 0)
    upstream = torch.randn(2, 3, n_out, generator=torch.Generator().manual_seed(1))
    got = _grads(lambda *t: LowRankLinearFunction.apply(*t, 0.5), tensors, upstream)
    # the reference in float64: the Function's float32 / bfloat16 products against exact ones
    ref = _grads(_definition, [None if t is None else t.double() for t in tensors], upstream)
    assert len(got) == len(ref)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 4e-2, "atol": 4e-2}
    for g, want in zip(got, ref, strict=True):
        assert g.dtype == dtype and g.shape == want.shape
        scale = want.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g.double() / scale, want / scale, **tol)


def test_the_layout_rules() -> None:
    f32, bf16 = torch.empty(1), torch.empty(1, dtype=torch.bfloat16)
    # float32: gᵀ h rank-major for 2 ≤ r ≤ 8; x Aᵀ and g B in the plain layout
    assert [rank_major_is_faster(r, 512, f32, "factor") for r in (1, 2, 8, 16)] == [
        False, True, True, False,
    ]  # fmt: skip
    assert not any(rank_major_is_faster(8, 512, f32, p) for p in ("input", "output"))
    # bfloat16: factor gradients rank-major to r = 32; x Aᵀ and g B in the plain layout
    assert not any(
        rank_major_is_faster(r, w, bf16, p)
        for r in (2, 8, 16)
        for w in (512, 1024, 1376, 2048)
        for p in ("input", "output")
    )
    assert rank_major_is_faster(8, 1376, bf16, "factor")
    assert rank_major_is_faster(32, 512, bf16, "factor")
    assert not rank_major_is_faster(64, 512, bf16, "factor")
    # other dtypes and devices: the plain layout
    assert not rank_major_is_faster(8, 512, torch.empty(1, dtype=torch.float16), "output")
    assert not rank_major_is_faster(8, 512, torch.empty(1, device="meta"), "output")


def test_under_autocast_the_node_computes_in_the_autocast_dtype() -> None:
    """``low_rank_linear`` casts every operand (autocast does not reach into a custom
    Function); the result and the input gradient are those of the same expression run with
    autocast's own casts."""
    torch.manual_seed(0)
    base = nn.Linear(64, 1024).requires_grad_(False)
    a = (torch.randn(8, 64) / 8).requires_grad_()
    b = torch.randn(1024, 8).requires_grad_()
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = low_rank_linear(x, base, a, b, 2.0)
        want = base(x) + 2.0 * F.linear(F.linear(x, a), b)
    assert got is not None and got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    upstream = torch.randn(5, 1024)
    grads = [torch.autograd.grad((y.float() * upstream).sum(), (x, a, b)) for y in (got, want)]
    for g, w in zip(*grads, strict=True):
        assert g.dtype == w.dtype == torch.float32
        scale = w.abs().max()
        torch.testing.assert_close(g / scale, w / scale, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_the_down_factor_is_kept_only_for_the_input_gradient(
    x_needs_grad: bool, amp: torch.dtype | None
) -> None:
    """A serves only ``∂x = g W + s·(g B) A``: where the input needs no gradient (a first
    layer's input) it is not kept (AdaLoRA's ``E ⊙ A`` is a fresh ``r × in`` tensor, as PEFT's
    is freed there), in float32 and under autocast (where the node gets A's cast copy), and A's,
    E's and B's gradients still equal the definition's."""
    torch.manual_seed(0)
    base = nn.Linear(48, 40).requires_grad_(False)
    x = torch.randn(2, 5, 48, requires_grad=x_needs_grad)
    a0, e = torch.randn(6, 48).requires_grad_(), torch.randn(6, 1).requires_grad_()
    b = torch.randn(40, 6).requires_grad_()
    autocast = torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None)
    with recording_saved() as saved, autocast:
        product = a0 * e
        out = low_rank_linear(x, base, product, b, 0.5)
    assert out is not None
    # the down factor or its cast copy; a0 itself is kept by the product's own node
    kept = [t for t in saved if t.shape == product.shape and t is not a0]
    assert len(kept) == int(x_needs_grad)
    if amp is None:
        assert saved.keeps(product) is x_needs_grad
    upstream = torch.randn(2, 5, 40)
    leaves = [x, a0, e, b] if x_needs_grad else [a0, e, b]
    got = torch.autograd.grad((out.float() * upstream).sum(), leaves)
    with autocast:
        want_out = _definition(x, base.weight, base.bias, a0 * e, b)
    want = torch.autograd.grad((want_out.float() * upstream).sum(), leaves)
    tol = 1e-5 if amp is None else 3e-2
    for g, w in zip(got, want, strict=True):
        scale = w.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g / scale, w / scale, rtol=tol, atol=tol)
