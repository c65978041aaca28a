"""Running a module's own forward with one of its parameters adapted (``target_parameters``).

An adapter on a parameter ``W`` (a 2-D matrix, or a 3-D stack of expert matrices
``(E, out, in)``, ``(E, in, out)`` when the module stores them transposed) means the module's
forward runs as if ``W`` were ``W + ΔW`` with ``ΔW[e] = s · B[e] A[e]``. Two ways, both exact:

* **low-rank** (:class:`LowRankMode`): while the module's forward runs, a
  ``TorchFunctionMode`` follows ``W`` and the views taken of it; where the forward multiplies
  by it — ``F.linear(x, W[e])`` (transformers' eager expert loop), ``grouped_mm(x, Wᵀ, offs)``
  (its grouped path), ``torch.bmm(W[ids], x)`` (its batched path), ``x @ W[e]`` — the mode
  adds ``s · (x A[e]ᵀ) B[e]ᵀ`` to the product. No dense ΔW is formed and no gradient of the
  size of ``W`` is computed: training costs a few thin products per expert. Any other use of
  ``W`` raises :class:`NeedsDense` before its result is used, and the caller runs the module
  again the dense way;
* **dense** (:func:`swapped_parameter`): ``W`` is replaced by ``W + ΔW`` for the duration of
  the forward (PEFT's way: the module sees an ordinary tensor whatever it does with it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .amp import autocast_dtype

__all__ = ["Factors", "LowRankMode", "NeedsDense", "swapped_parameter"]

#: grouped matrix products, by name (``torch._grouped_mm`` reaches a mode as the builtin)
_GROUPED = ("grouped_mm", "_grouped_mm")
_INDEX = (torch.Tensor.__getitem__,)
_TRANSPOSE = (torch.Tensor.transpose, torch.transpose)
_MATMUL = (torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul)


@dataclass(frozen=True)
class Factors:
    """One adapter's update of a parameter: ``ΔW[e] = scale · b[e] @ a[e]`` (out × in)."""

    a: torch.Tensor  # (E, r, in)
    b: torch.Tensor  # (E, out, r)
    scale: float


class NeedsDense(Exception):
    """Raised inside a forward when the parameter is used in a way the low-rank path does
    not follow; ``mode`` says whose parameter it was."""

    def __init__(self, mode: LowRankMode, what: str) -> None:
        super().__init__(f"the forward uses the adapted parameter in {what}")
        self.mode = mode


class LowRankMode(TorchFunctionMode):
    """Adds the low-rank update of ``param`` to every product the forward takes with it."""

    def __init__(self, param: torch.Tensor, factors: list[Factors], transposed: bool) -> None:
        super().__init__()
        self.param = param
        self.factors = factors
        self.transposed = transposed  # param stored (E, in, out)
        # views of the parameter the forward took: id -> (view, kind, index); the view is
        # kept so that its id is not reused while the forward runs
        self._views: dict[int, tuple[torch.Tensor, str, Any]] = {}

    # -- what a tensor is ---------------------------------------------------------------------
    def _kind(self, t: Any) -> tuple[str, Any] | None:
        if t is self.param:
            return ("whole", None)
        hit = self._views.get(id(t)) if isinstance(t, torch.Tensor) else None
        if hit is not None and hit[0] is t:
            return hit[1], hit[2]
        return None

    def _touches(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return any(self._kind(a) is not None for a in (*args, *kwargs.values()))

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if not self._touches(args, kwargs):
            return func(*args, **kwargs)
        if getattr(func, "__name__", "") == "__get__":  # .shape, .dtype, .device, ...
            return func(*args, **kwargs)
        out = self._follow(func, args, kwargs)
        if out is not None:
            return out
        result = func(*args, **kwargs)
        if _has_tensor(result):
            raise NeedsDense(self, f"{getattr(func, '__name__', func)}()")
        return result  # .size(), .dim(), ...: nothing of W's values flows on

    def _follow(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The result of ``func`` with the update applied, or None if it is not a product
        this mode knows (then the caller decides)."""
        if func in _INDEX and self._kind(args[0]) == ("whole", None):
            return self._index(func, args, kwargs)
        if func in _TRANSPOSE and self._kind(args[0]) == ("whole", None):
            dims = {d % self.param.dim() for d in (*args[1:], *kwargs.values())}
            if self.param.dim() == 3 and dims == {1, 2}:
                return self._remember(func(*args, **kwargs), "whole_t", None)
            return None
        if func is F.linear:
            return self._linear(func, args, kwargs)
        if func in _MATMUL and len(args) == 2 and self._kind(args[0]) is None:
            return self._matmul(func, args, kwargs)
        if getattr(func, "__name__", None) in _GROUPED:
            return self._grouped(func, args, kwargs)
        if func is torch.bmm and len(args) == 2 and self._kind(args[1]) is None:
            return self._bmm(func, args, kwargs)
        return None

    def _remember(self, view: torch.Tensor, kind: str, index: Any) -> torch.Tensor:
        self._views[id(view)] = (view, kind, index)
        return view

    def _index(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        index = args[1]
        if self.param.dim() != 3:
            return None
        if isinstance(index, int) or (
            isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point()
        ):
            return self._remember(func(*args, **kwargs), "expert", index)
        if (
            isinstance(index, torch.Tensor)
            and index.dim() == 1
            and index.dtype in (torch.int64, torch.int32)
        ):
            return self._remember(func(*args, **kwargs), "gather", index)
        return None

    # -- the products -------------------------------------------------------------------------
    def _low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> Any:
        amp = autocast_dtype(x.device.type)
        h = F.linear(x if amp is not None else x.to(a.dtype), a)
        return F.linear(h * s, b)  # the scale on the thin (rows, r) tensor

    def _linear(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x, weight = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
        kind = self._kind(weight)
        if kind is None or self._kind(x) is not None or self.transposed:
            return None
        if kind[0] == "expert":
            pairs = [(f.a[kind[1]], f.b[kind[1]], f.scale) for f in self.factors]
        elif kind[0] == "whole" and self.param.dim() == 2:
            pairs = [(f.a[0], f.b[0], f.scale) for f in self.factors]
        else:
            return None
        out = func(*args, **kwargs)
        for a, b, s in pairs:
            _add(out, self._low_rank(x, a, b, s))
        return out

    def _matmul(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x, weight = args
        kind = self._kind(weight)
        if kind is None or not self.transposed or kind[0] != "expert":
            return None  # x @ W[e] with W[e] (in, out): transposed storage only
        out = func(*args, **kwargs)
        for f in self.factors:
            _add(out, self._low_rank(x, f.a[kind[1]], f.b[kind[1]], f.scale))
        return out

    def _grouped(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x, weight = args[0], args[1]
        offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
        want = ("whole", None) if self.transposed else ("whole_t", None)
        if self._kind(weight) != want or self._kind(x) is not None or offs is None:
            return None
        if len(args) > 3 or any(v is not None for k, v in kwargs.items() if k != "offs"):
            return None  # bias / out_dtype: not followed
        out = func(*args, **kwargs)
        amp = autocast_dtype(x.device.type)
        for f in self.factors:
            dtype = amp or f.a.dtype
            a, b = _aligned(f.a.to(dtype), f.b.to(dtype))
            a_t = a.transpose(-2, -1)  # (E, in, r)
            b_t = b.contiguous().transpose(-2, -1)  # (E, r, out)
            h = func(x.to(dtype), a_t, offs=offs) * f.scale
            _add(out, func(h, b_t, offs=offs))
        return out

    def _bmm(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        weight, x = args  # (S, out, in) @ (S, in, 1): transformers' batched expert path
        kind = self._kind(weight)
        if kind is None or kind[0] != "gather" or self.transposed or kwargs:
            return None
        out = func(*args, **kwargs)
        ids = kind[1]
        for f in self.factors:
            h = torch.bmm(f.a[ids], x.to(f.a.dtype)) * f.scale  # (S, r, 1)
            _add(out, torch.bmm(f.b[ids], h))
        return out


def _aligned(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` (E, r, in) and ``b`` (E, out, r) with r padded by zeros to a multiple of 16
    bytes (grouped_mm's stride rule; zeros add nothing to the product)."""
    step = max(1, 16 // a.element_size())
    pad = -a.shape[1] % step
    if not pad:
        return a, b
    return F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))


def _add(out: torch.Tensor, update: torch.Tensor) -> None:
    """``out += update`` in place: ``out`` is the fresh result of the product just taken,
    which no backward reads (a product's gradient needs its inputs, not its output)."""
    out.add_(update.to(out.dtype))


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


@contextlib.contextmanager
def swapped_parameter(module: nn.Module, name: str, value: torch.Tensor) -> Iterator[None]:
    """``module.<name>`` reads ``value`` (a plain tensor, autograd intact) inside the block;
    the parameter is back in place afterwards, whatever happened."""
    params = module._parameters
    if name not in params:
        raise KeyError(f"{type(module).__name__} has no parameter {name!r}")
    original = params[name]
    params[name] = value  # type: ignore[assignment]
    try:
        yield
    finally:
        params[name] = original
