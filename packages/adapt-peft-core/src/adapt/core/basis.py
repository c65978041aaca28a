"""Slicing utils: one frozen random basis shared by every layer, each layer taking a slice.

VeRA trains only scaling vectors; the projections A (r × in) and B (out × r) are random,
frozen and shared by all adapted layers. Layers of different shapes share one pair sized to
the largest (in, out) among the targets and take zero-copy slices ``A[:r, :in]`` and
``B[:out, :r]``. The pair is drawn from a seeded ``torch.Generator`` — A first, then B, each
Kaiming-uniform with gain √2 over its second dimension — so the same key and shape give the
same tensors bit for bit (and the same as HF PEFT's VeRA).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterStateError


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Uniform in ±√3·√2/√fan_in with fan_in = ``shape[1]``, drawn from ``generator``."""
    fan_in = shape[1]
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in) if fan_in else 0.0
    tensor = torch.empty(shape)
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)
    return tensor


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place modification counter (-1 for inference tensors, which have none)."""
    return -1 if tensor.is_inference() else int(tensor._version)


class ProjectionReaders:
    """How many calls of :meth:`SharedBasis.project_input` returned one product: the layers
    reading it, once the forward that made it is over (a recompute under gradient
    checkpointing, or a later forward on the same unmodified tensor, counts again). A
    backward may use it to choose between returning the product's gradient (several readers:
    autograd sums them before the one product with ``A_s``) and folding that product into its
    own input gradient (one reader: no separate input-sized gradient to add). Both are exact
    whatever the count; it only picks the cheaper."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 1


class _ProjectionCache:
    """The last ``x·A_sᵀ`` of :meth:`SharedBasis.project_input`: ``(key, weak ref to x, result,
    its readers)``. Copies and pickles of a model start empty (the kept tensor may be part of
    a graph)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: (
            tuple[tuple[Any, ...], weakref.ref[torch.Tensor], torch.Tensor, ProjectionReaders]
            | None
        ) = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _ProjectionCache:
        return _ProjectionCache()

    def __reduce__(self) -> tuple[type[_ProjectionCache], tuple[()]]:
        return (_ProjectionCache, ())


class SharedBasis(nn.Module):
    """A frozen pair ``A`` (r × max_in) and ``B`` (max_out × r) generated from ``seed``."""

    A: torch.Tensor
    B: torch.Tensor

    def __init__(self, r: int, max_in: int, max_out: int, seed: int) -> None:
        super().__init__()
        if min(r, max_in, max_out) <= 0:
            raise ValueError(
                f"a shared basis needs positive sizes, got r={r}, in={max_in}, out={max_out}"
            )
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("A", kaiming_uniform((r, max_in), generator))
        self.register_buffer("B", kaiming_uniform((max_out, r), generator))
        self.seed = seed
        self._projection = _ProjectionCache()

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(r, max_in, max_out)``."""
        return int(self.A.shape[0]), int(self.A.shape[1]), int(self.B.shape[0])

    def fits(self, r: int, in_features: int, out_features: int) -> bool:
        basis_r, max_in, max_out = self.shape
        return r <= basis_r and in_features <= max_in and out_features <= max_out

    def require(self, r: int, in_features: int, out_features: int, *, what: str) -> None:
        """Raise a clear error if ``what`` needs more than this basis holds."""
        if self.fits(r, in_features, out_features):
            return
        basis_r, max_in, max_out = self.shape
        raise AdapterStateError(
            f"{what} needs a shared basis of at least r={r}, in={in_features}, out={out_features}, "
            f"but this model's basis is r={basis_r}, in={max_in}, out={max_out} (fixed when the "
            "first adapter was added). Add the adapter with the largest rank and layers first, "
            "or size the basis up front for every adapter you plan to add (VeRA: "
            "VeraConfig(basis_shape=(r, max_in, max_out)) on the first adapter)"
        )

    def slices(
        self, in_features: int, out_features: int, r: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-copy views ``A[:r, :in_features]`` and ``B[:out_features, :r]``."""
        return self.A[:r, :in_features], self.B[:out_features, :r]

    def project_input(
        self, x: torch.Tensor, in_features: int, r: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """``x.to(dtype) @ A[:r, :in_features]ᵀ``, computed once for layers that read one input.

        Layers fed by the same tensor (a transformer's q/k/v projections, its gate/up pair)
        slice the same rows and columns of ``A``, so their products are equal: the last one is
        kept and returned again while the call is for the same input tensor (same object,
        unmodified), rank, dtype, grad mode and basis version. Autograd sees one shared node,
        so gradients are the same as computing it per layer. The product of a leaf that
        requires grad is not kept: such an input is fed again in the next step, whose backward
        would meet the graph the last one freed.
        """
        return self.counted_projection(x, in_features, r, dtype)[0]

    def counted_projection(
        self, x: torch.Tensor, in_features: int, r: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, ProjectionReaders | None]:
        """:meth:`project_input` and the count of its readers (this call included), or None
        for a product that is not kept: this call is its one reader."""
        a = self.A[:r, :in_features]
        if a.dtype != dtype or a.device != x.device:
            a = a.to(device=x.device, dtype=dtype)
        if torch.compiler.is_compiling():
            # no cache in a compiled graph (the compiler shares equal products itself), and
            # none of its checks (tensor versions, weak references) are traceable
            return F.linear(x.to(dtype), a), None
        if x.requires_grad and x.grad_fn is None:
            # a leaf that requires grad outlives a forward (a user's input, fed again every
            # step): its product's graph is freed by the first backward, so it is not kept
            return F.linear(x.to(dtype), a), None
        key = (
            r,
            in_features,
            dtype,
            x.device,
            _version(x),
            _version(self.A),
            torch.is_grad_enabled(),
        )
        last = self._projection.last
        if last is not None and last[0] == key and last[1]() is x:
            last[3].count += 1
            return last[2], last[3]
        h = F.linear(x.to(dtype), a)
        readers = ProjectionReaders()
        self._projection.last = (key, weakref.ref(x), h, readers)
        return h, readers

    def clear_cache(self) -> None:
        """Forget the kept projection (it is replaced by the next call anyway)."""
        self._projection.last = None

    def extra_repr(self) -> str:
        r, max_in, max_out = self.shape
        return f"r={r}, max_in={max_in}, max_out={max_out}, seed={self.seed}"
