"""The shared projection x·A_sᵀ: layers that read the same input (q/k/v, gate/up) compute it
once. Outputs and gradients must equal computing it per layer, and the reuse must never serve a
stale product (another input, an input modified in place, another rank, grad mode)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from vera_testutils import LLAMA_TARGETS, basis_of, input_ids, randomise_lambdas, tiny_llama

from adapt.core import AdapterLayer, SharedBasis, adapt
from adapt.vera import VeraConfig, VeraLinear


def _unshared(monkeypatch: object) -> None:
    """Make every VeRA layer use the core's unfused, uncached definition (no training node of
    :mod:`adapt.vera.training` either)."""
    monkeypatch.setattr(VeraLinear, "add_adapter_output", AdapterLayer.add_adapter_output)  # type: ignore[attr-defined]
    monkeypatch.setattr(VeraLinear, "fused_forward", AdapterLayer.fused_forward)  # type: ignore[attr-defined]


def _model() -> torch.nn.Module:
    model = adapt(tiny_llama(), VeraConfig(r=8, target_modules=LLAMA_TARGETS))
    randomise_lambdas(model, seed=3)
    return model


def test_q_k_v_share_one_product() -> None:
    model = _model()
    basis = basis_of(model)
    calls = []
    real = torch.nn.functional.linear

    def spy(x: torch.Tensor, w: torch.Tensor, *rest: object) -> torch.Tensor:
        if w.data_ptr() == basis.A.data_ptr():
            calls.append(tuple(w.shape))
        return real(x, w, *rest)

    torch.nn.functional.linear = spy  # type: ignore[assignment]
    try:
        with torch.no_grad():
            model(input_ids=input_ids())
    finally:
        torch.nn.functional.linear = real  # type: ignore[assignment]
    # per decoder layer: one product for q/k/v, one for o, one for gate/up, one for down
    assert len(calls) == 4 * 2, calls


def test_outputs_and_gradients_equal_per_layer_products(monkeypatch: object) -> None:
    model = _model()
    reference = copy.deepcopy(model)
    ids = input_ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    _unshared(monkeypatch)
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == ref.keys() and grads
    for name, grad in grads.items():
        assert grad is not None and ref[name] is not None, name
        torch.testing.assert_close(grad, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_never_stale() -> None:
    basis = SharedBasis(8, 16, 16, seed=0)
    x = torch.randn(3, 16)
    h = basis.project_input(x, 16, 8, torch.float32)
    assert basis.project_input(x, 16, 8, torch.float32) is h  # same input: reused
    torch.testing.assert_close(h, x @ basis.A.T)
    assert basis.project_input(x.clone(), 16, 8, torch.float32) is not h  # another tensor
    assert basis.project_input(x, 16, 4, torch.float32).shape == (3, 4)  # another rank
    h = basis.project_input(x, 16, 8, torch.float32)
    x.mul_(2)  # modified in place: recomputed
    again = basis.project_input(x, 16, 8, torch.float32)
    assert again is not h
    torch.testing.assert_close(again, x @ basis.A.T)
    with torch.no_grad():
        assert not basis.project_input(x, 16, 8, torch.float32).requires_grad
        basis.A.mul_(0.5)  # the basis changed (e.g. a loaded projection): recomputed
    torch.testing.assert_close(basis.project_input(x, 16, 8, torch.float32), x @ basis.A.T)
    with torch.inference_mode():
        y = torch.randn(2, 12)
        torch.testing.assert_close(
            basis.project_input(y, 12, 8, torch.float32), y @ basis.A[:, :12].T
        )
    assert basis.project_input(x, 16, 8, torch.float64).dtype == torch.float64


@pytest.mark.parametrize("leaf_requires_grad", [False, True])
def test_an_input_fed_every_step_trains(leaf_requires_grad: bool) -> None:
    """Full-batch training: the same input tensor every step, straight into targeted layers
    (float32, rows enough for the merged step). A leaf that requires grad is not kept (its
    product's graph is freed by each backward); every step's λ gradients and the input's
    equal the definition's."""
    torch.manual_seed(0)
    toy = nn.ModuleDict({"a": nn.Linear(48, 40), "b": nn.Linear(48, 24)})

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = toy

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers["a"](x).sum(-1) + self.layers["b"](x).sum(-1)

    x = torch.randn(512, 48, requires_grad=leaf_requires_grad)
    model = adapt(Two(), VeraConfig(r=8, target_modules=["a", "b"]))
    randomise_lambdas(model, seed=3)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            x.grad = None
            if m is reference:
                with pytest.MonkeyPatch.context() as mp:
                    _unshared(mp)
                    (m(x) ** 2).mean().backward()
            else:
                (m(x) ** 2).mean().backward()
            if leaf_requires_grad:
                m.x_grad = x.grad.clone()  # type: ignore[assignment, union-attr]
            o.step()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            if p.requires_grad:
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # values ~50
        if leaf_requires_grad:
            got, want = model.x_grad, reference.x_grad
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # W + ΔW rounds apart


def test_dropout_is_not_shared() -> None:
    """With dropout each layer sees its own mask, so nothing is reused."""
    model = adapt(tiny_llama(), VeraConfig(r=8, target_modules=LLAMA_TARGETS, vera_dropout=0.5))
    model.train()
    basis = basis_of(model)
    model(input_ids=input_ids())
    assert basis._projection.last is None


def test_model_copies_and_pickles_after_a_training_forward() -> None:
    model = _model()
    ids = input_ids()
    loss = model(input_ids=ids, labels=ids).loss  # leaves a product that is part of a graph
    assert loss.requires_grad
    copied = copy.deepcopy(model)
    assert basis_of(copied)._projection.last is None
    restored = pickle.loads(pickle.dumps(basis_of(model)))
    assert restored._projection.last is None and torch.equal(restored.A, basis_of(model).A)
    with torch.no_grad():
        torch.testing.assert_close(copied(input_ids=ids).logits, model(input_ids=ids).logits)


def test_gradient_checkpointing_matches(monkeypatch: object) -> None:
    model = _model()
    model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model.train()
    reference = copy.deepcopy(model)
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    _unshared(monkeypatch)
    reference(input_ids=ids, labels=ids).loss.backward()
    for (name, p), (_, q) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_half_precision_output_rounds_like_the_definition() -> None:
    lin = nn.Linear(16, 24).to(torch.bfloat16)
    model = adapt(nn.Sequential(lin), VeraConfig(r=4, target_modules=["0"]))
    randomise_lambdas(model, seed=1)
    layer = model.model[0]
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        got = model(x)
        want = AdapterLayer.add_adapter_output(layer, layer.base_layer(x), x, "default")
    assert torch.equal(got, want)


def test_no_grad_forward_over_many_rows_and_add_delta_weight() -> None:
    """Inference over many rows runs as x (W + ΔW)ᵀ: the same outputs as with gradients."""
    model = adapt(
        nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 32)),
        VeraConfig(r=16, target_modules=["0", "1"]),
    )
    randomise_lambdas(model, seed=2)
    model.eval()
    layer = model.model[0]
    w = layer.base_layer.weight
    torch.testing.assert_close(
        layer.add_delta_weight(w, "default"), w + layer.delta_weight("default")
    )
    x = torch.randn(4, 64, 32)
    with_grad = model(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), with_grad.detach(), rtol=1e-5, atol=1e-5)


def test_readers_are_counted_per_input() -> None:
    """:meth:`SharedBasis.counted_projection` counts the layers that read one kept product:
    per decoder layer q/k/v 3, gate/up 2, o and down 1 each."""
    model = _model()
    basis = basis_of(model)
    seen: list[object] = []
    real = basis.counted_projection

    def spy(*args: object) -> object:
        h, readers = real(*args)  # type: ignore[arg-type]
        if all(r is not readers for r in seen):
            seen.append(readers)
        return h, readers

    basis.counted_projection = spy  # type: ignore[method-assign]
    ids = input_ids()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    counts = [r.count for r in seen]  # type: ignore[attr-defined]
    assert counts == [3, 1, 2, 1] * 2, counts
