"""The kit's probes: counting an autograd Function's calls, the tensors autograd keeps, one
step's loss and gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adapt.core.lowrank_linear import LowRankLinearFunction
from adapt.core.testing import (
    counting_apply,
    counting_torch_calls,
    loss_and_grads,
    recording_saved,
    tiny_llama,
    token_ids,
)


class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad


def test_counting_apply_counts_and_restores() -> None:
    x = torch.ones(3, requires_grad=True)
    with counting_apply(Double) as count:
        y = Double.apply(Double.apply(x))  # type: ignore[no-untyped-call]
        assert count.calls == 2
    y.sum().backward()  # the counted calls built a real graph
    assert torch.equal(x.grad, torch.full((3,), 4.0))
    assert "apply" not in Double.__dict__  # the inherited classmethod is back
    Double.apply(x)  # type: ignore[no-untyped-call]
    assert count.calls == 2  # not counted outside the block


def test_counting_apply_restores_on_error() -> None:
    with pytest.raises(ValueError, match="inside"), counting_apply(LowRankLinearFunction):
        raise ValueError("inside")
    assert "apply" not in LowRankLinearFunction.__dict__


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_loss_and_grads_is_one_step(autocast: torch.dtype | None) -> None:
    pytest.importorskip("transformers")
    model = tiny_llama().train()
    ids = token_ids(batch=2, length=8, vocab_size=128)
    loss, grads = loss_and_grads(model, ids, autocast)
    again, grads_again = loss_and_grads(model, ids, autocast)  # zeroed first: not accumulated
    assert loss == again and loss > 0
    assert grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads.items():
        assert torch.equal(grad, grads_again[name]), name
        assert grad.dtype == torch.float32


def test_recording_saved_sees_built_in_and_custom_nodes() -> None:
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(t)
            return t * 2

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return g * 2

    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 3)
    with recording_saved() as saved:
        y = x @ w.t()  # mm keeps x (for w's gradient); w is not needed: x needs none
        z = Twice.apply(y)  # type: ignore[no-untyped-call]
    assert saved.keeps(x) and saved.keeps(y) and not saved.keeps(w)
    assert saved.nbytes == x.nbytes + y.nbytes
    z.sum().backward()  # the unpack hook gives the tensors back
    torch.testing.assert_close(w.grad, 2 * torch.ones(5, 4).t() @ x)


def test_counting_torch_calls_counts_functions_and_methods_named() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    with counting_torch_calls(torch.bmm, torch.Tensor.baddbmm_) as count:
        y = torch.bmm(a, b)
        y.baddbmm_(a, b)
        torch.mm(a[0], b[0])  # not counted
    assert count.calls == 2
    with counting_torch_calls(torch.bmm) as after:
        torch.mm(a[0], b[0])
    assert after.calls == 0
