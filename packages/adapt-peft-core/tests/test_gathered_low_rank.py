"""``kernels.gathered_low_rank``: each row's adapter's ``(x Aᵀ) Bᵀ`` through both of its paths
(the masked dense product for few tokens per row, the gathered batched products otherwise),
against the per-row definition: values, the in-place sum, gradients, bfloat16."""

from __future__ import annotations

import pytest
import torch

from adapt.core import kernels
from adapt.core.kernels import gathered_low_rank, stack_factors
from adapt.core.testing import counting_torch_calls

RANKS = (4, 2, 3)  # three adapters, different ranks (zero-padded in the stacks)
IN, OUT = 12, 10


def factors(dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(r, IN, generator=gen).to(dtype) for r in RANKS]
    b = [torch.randn(OUT, r, generator=gen).to(dtype) for r in RANKS]
    return a, b


def definition(
    x: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], slots: torch.Tensor
) -> torch.Tensor:
    return torch.stack([(x[i] @ a[s].t()) @ b[s].t() for i, s in enumerate(slots.tolist())])


SLOTS = torch.tensor([2, 0, 0, 1, 2])


@pytest.mark.parametrize("tokens", [1, 3, 9])  # 3 adapters × tokens ≤ 16: dense for 1 and 3
def test_both_paths_equal_the_definition(tokens: int) -> None:
    a, b = factors()
    stacked_a, stacked_b = stack_factors(a, b)
    assert stacked_b.shape == (3, 4, OUT) and stacked_b.is_contiguous()
    x = torch.randn(len(SLOTS), tokens, IN, generator=torch.Generator().manual_seed(1))
    with counting_torch_calls(torch.bmm, torch.Tensor.baddbmm_) as batched:
        y = gathered_low_rank(x, stacked_a, stacked_b, SLOTS)
    assert batched.calls == (0 if 3 * tokens <= kernels.DENSE_MIX_LIMIT else 2)
    torch.testing.assert_close(y, definition(x, a, b, SLOTS), atol=1e-5, rtol=1e-5)
    base = torch.randn(len(SLOTS), tokens, OUT)
    out = base.clone()
    assert gathered_low_rank(x, stacked_a, stacked_b, SLOTS, out=out) is out
    torch.testing.assert_close(out, base + definition(x, a, b, SLOTS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("limit", [0, 10**6])  # the gathered path, the dense path
def test_gradients_equal_the_definitions(limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "DENSE_MIX_LIMIT", limit)
    a, b = factors()
    x = torch.randn(len(SLOTS), 2, IN, generator=torch.Generator().manual_seed(1))

    def grads(fast: bool) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (x, *a, *b)]
        xs, a_s, b_s = leaves[0], leaves[1:4], leaves[4:]
        if fast:
            y = gathered_low_rank(xs, *stack_factors(a_s, b_s), SLOTS)
        else:
            y = definition(xs, a_s, b_s, SLOTS)
        y.pow(2).sum().backward()
        return [t.grad for t in leaves]  # type: ignore[misc]

    for got, want in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 9])
def test_bfloat16_factors(tokens: int) -> None:
    a, b = factors(torch.bfloat16)
    x = torch.randn(len(SLOTS), tokens, IN, generator=torch.Generator().manual_seed(1))
    y = gathered_low_rank(x, *stack_factors(a, b), SLOTS)
    assert y.dtype == torch.bfloat16
    want = definition(x, [t.float() for t in a], [t.float() for t in b], SLOTS)
    torch.testing.assert_close(y.float(), want, atol=0.15, rtol=0.02)


def test_two_dimensional_rows() -> None:
    """One token per row without a token dim (``(rows, in)``): the dense path, same values."""
    a, b = factors()
    x = torch.randn(len(SLOTS), IN, generator=torch.Generator().manual_seed(1))
    y = gathered_low_rank(x, *stack_factors(a, b), SLOTS)
    assert y.shape == (len(SLOTS), OUT)
    torch.testing.assert_close(y, definition(x[:, None], a, b, SLOTS)[:, 0], atol=1e-5, rtol=1e-5)
