"""add_scaled_product: result + s·h Wᵀ in one kernel, equal to the definition."""

from __future__ import annotations

import pytest
import torch

from adapt.core import add_scaled_product


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
