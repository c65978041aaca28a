"""add_scaled_product: result + s·h Wᵀ in one kernel, equal to the definition."""

from __future__ import annotations

import pytest
import torch

from adapt.core import (
    add_scaled_product,
    factor_grad,
    matmul_factor,
    transposed_factor_is_faster,
)


@pytest.mark.parametrize("lead", [(7,), (2, 5), (2, 3, 4), (0,)])
@pytest.mark.parametrize("k", [0, 1, 6])
def test_equals_definition(lead: tuple[int, ...], k: int) -> None:
    g = torch.Generator().manual_seed(len(lead) * 10 + k)
    result = torch.randn(*lead, 9, generator=g)
    h = torch.randn(*lead, k, generator=g)
    weight = torch.randn(9, k, generator=g)
    got = add_scaled_product(result, h, weight, 0.37)
    assert got.shape == result.shape
    torch.testing.assert_close(got, result + 0.37 * (h @ weight.T), rtol=1e-6, atol=1e-6)


def test_out_of_place_and_differentiable() -> None:
    result = torch.randn(4, 3, requires_grad=True)
    h = torch.randn(4, 2, requires_grad=True)
    weight = torch.randn(3, 2, requires_grad=True)
    before = result.detach().clone()
    out = add_scaled_product(result * 1, h, weight, 2.0)
    out.square().sum().backward()
    assert torch.equal(result.detach(), before)
    ref = [t.detach().clone().requires_grad_() for t in (result, h, weight)]
    (ref[0] + 2.0 * ref[1] @ ref[2].T).square().sum().backward()
    for t, r in zip((result, h, weight), ref, strict=True):
        torch.testing.assert_close(t.grad, r.grad)


def test_mixed_dtypes_cast_to_result() -> None:
    result = torch.randn(3, 4, dtype=torch.bfloat16)
    h = torch.randn(3, 2)
    weight = torch.randn(4, 2)
    got = add_scaled_product(result, h, weight, 0.5)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, result + (0.5 * (h @ weight.T)).to(torch.bfloat16))


def test_one_dimensional_input() -> None:
    result, h, weight = torch.randn(4), torch.randn(2), torch.randn(4, 2)
    torch.testing.assert_close(
        add_scaled_product(result, h, weight, 3.0), result + 3.0 * weight @ h
    )


@pytest.mark.parametrize("r", [1, 2, 8, 9, 16])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("lead", [(6,), (2, 5)])
def test_gradients_equal_the_definition_for_thin_factors(
    r: int, in_place: bool, lead: tuple[int, ...]
) -> None:
    """For ranks 2–8 the weight goes in transposed and contiguous (the fast layout for the
    backward); values and all three gradients stay those of result + s·h Wᵀ."""
    g = torch.Generator().manual_seed(r)
    tensors = [torch.randn(*lead, 11, generator=g), torch.randn(*lead, r, generator=g)]
    tensors.append(torch.randn(11, r, generator=g))
    result, h, weight = (t.clone().requires_grad_() for t in tensors)
    ref = [t.clone().requires_grad_() for t in tensors]
    # in place needs a non-leaf result: the output of a layer
    got = add_scaled_product(result * 1, h, weight, 0.5, in_place=in_place)
    want = ref[0] + 0.5 * ref[1] @ ref[2].T
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(want.shape, generator=g)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    for t, w in zip((result, h, weight), ref, strict=True):
        assert t.grad is not None and t.grad.shape == t.shape
        torch.testing.assert_close(t.grad, w.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [1, 2, 4, 8, 12, 16])
def test_factor_products_equal_the_plain_products(r: int) -> None:
    g = torch.Generator().manual_seed(r)
    grad = torch.randn(37, 20, generator=g)
    factor = torch.randn(20, r, generator=g)
    h = torch.randn(37, r, generator=g)
    assert transposed_factor_is_faster(factor) == (2 <= r <= 8)
    torch.testing.assert_close(matmul_factor(grad, factor), grad @ factor)
    torch.testing.assert_close(factor_grad(grad, h), grad.T @ h)
    assert factor_grad(grad, h).shape == (20, r)


def test_the_transposed_layout_is_only_for_float32_on_the_cpu() -> None:
    assert transposed_factor_is_faster(torch.empty(10, 8))
    assert not transposed_factor_is_faster(torch.empty(10, 8, dtype=torch.bfloat16))
    assert not transposed_factor_is_faster(torch.empty(10, 8, device="meta"))
    assert not transposed_factor_is_faster(torch.empty(2, 10, 8))
