"""The dense weight backend: canonical layout for reading and writing base weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapt.core import DenseBackend, MergeReport, TargetError, WeightBackend
from adapt.core.testing import ToyLayer

dense = DenseBackend()


def test_dense_backend_satisfies_the_protocol() -> None:
    assert isinstance(dense, WeightBackend)
    assert dense.lossy is False


def test_linear_layout() -> None:
    lin = nn.Linear(3, 5)
    assert dense.shape(lin) == (3, 5)
    w = dense.get_weight(lin)
    assert w.shape == (5, 3)
    assert w.data_ptr() == lin.weight.data_ptr()  # a view, no copy
    new = torch.randn(5, 3)
    assert dense.set_weight(lin, new) == MergeReport()
    assert torch.equal(lin.weight, new)


def test_transformers_conv1d_is_transposed() -> None:
    conv = Conv1D(5, 3)  # nf=out, nx=in: weight stored (in, out)
    torch.nn.init.normal_(conv.weight)
    assert tuple(conv.weight.shape) == (3, 5)
    assert dense.shape(conv) == (3, 5)
    w = dense.get_weight(conv)
    assert w.shape == (5, 3)  # canonical (out, in)
    x = torch.randn(2, 3)
    torch.testing.assert_close(F.linear(x, w, conv.bias), conv(x))

    new = torch.randn(5, 3)
    dense.set_weight(conv, new)
    assert torch.equal(conv.weight, new.T)
    torch.testing.assert_close(conv(x), F.linear(x, new, conv.bias))


def test_conv2d_layout() -> None:
    conv = nn.Conv2d(4, 6, (3, 2), groups=2)
    assert dense.shape(conv) == (4, 6)
    assert dense.get_weight(conv).shape == (6, 2, 3, 2)
    new = torch.randn(6, 2, 3, 2)
    dense.set_weight(conv, new)
    assert torch.equal(conv.weight, new)


def test_embedding_layout() -> None:
    emb = nn.Embedding(10, 4)
    assert dense.shape(emb) == (10, 4)
    assert dense.get_weight(emb).shape == (10, 4)
    new = torch.randn(10, 4)
    dense.set_weight(emb, new)
    assert torch.equal(emb.weight, new)


def test_set_weight_keeps_the_storage_dtype() -> None:
    lin = nn.Linear(2, 2).to(torch.float16)
    dense.set_weight(lin, torch.ones(2, 2, dtype=torch.float64))
    assert lin.weight.dtype == torch.float16
    assert torch.equal(lin.weight, torch.ones(2, 2, dtype=torch.float16))


@pytest.mark.parametrize(
    ("module", "bad", "stored"),
    [
        (nn.Linear(3, 5), (3, 5), (5, 3)),
        (Conv1D(5, 3), (3, 5), (3, 5)),  # given (in, out) → transposed to (5, 3) ≠ (3, 5)
        (nn.Embedding(10, 4), (4, 10), (10, 4)),
    ],
)
def test_set_weight_wrong_shape_says_both_shapes(
    module: nn.Module, bad: tuple[int, int], stored: tuple[int, int]
) -> None:
    before = module.weight.detach().clone()
    with pytest.raises(TargetError) as info:
        dense.set_weight(module, torch.zeros(bad))
    msg = str(info.value)
    assert type(module).__name__ in msg
    assert str(stored) in msg
    assert torch.equal(module.weight, before)


def test_compute_dtype() -> None:
    assert dense.compute_dtype(nn.Linear(2, 2).to(torch.bfloat16)) == torch.bfloat16
    assert dense.compute_dtype(nn.Linear(2, 2).double()) == torch.float64
    emb = nn.Embedding(3, 2)
    emb.weight = nn.Parameter(torch.zeros(3, 2, dtype=torch.int8), requires_grad=False)
    assert dense.compute_dtype(emb) == torch.float32


def test_layer_reads_sizes_through_the_backend() -> None:
    layer = ToyLayer(nn.Linear(3, 7))
    assert (layer.in_features, layer.out_features) == (3, 7)
    # the layer exposes the base weight and bias so code reading module.weight keeps working
    assert layer.weight is layer.base_layer.weight
    assert layer.bias is layer.base_layer.bias
