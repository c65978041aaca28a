"""Quantisation round trips offered by weight backends, for initialisations that model the
quantisation error (LoftQ).

A backend plugin (entry-point group ``adapt.backends``) may declare, besides reading and writing
weights, how it quantises a fresh float weight:

* ``loftq_bits: ClassVar[int]`` — the bit width LoftQ asks for (``LoftQConfig.loftq_bits``);
* ``roundtrip(weight) -> Tensor`` — ``weight`` (canonical layout, float32) quantised as a new
  layer of this backend would store it, and dequantised again (float32, same shape).

adapt-bnb declares ``4`` (nf4) and ``8`` (LLM.int8 row-wise absmax), as PEFT's LoftQ uses them.
Core knows no quantisation library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch

from .errors import ConfigError
from .plugins import GROUP_BACKENDS, current_store

__all__ = ["quantiser_for"]

Roundtrip = Callable[[torch.Tensor], torch.Tensor]


def quantiser_for(bits: int) -> Roundtrip:
    """The installed backends' round trip for ``bits`` (``loftq_bits``; of the backend with the
    highest ``priority`` when several offer it); :class:`ConfigError` saying what to install
    when none offers it."""
    store = current_store()
    offered: list[int] = []
    # the highest-priority backend first (a plugin may override adapt-bnb's quantiser)
    for entry in sorted(store.entries(GROUP_BACKENDS), key=lambda e: -e.priority):
        backend = entry.obj
        if backend is None:
            continue
        if isinstance(backend, type):
            backend = backend()
            entry.obj = backend
        declared = getattr(backend, "loftq_bits", None)
        roundtrip = getattr(backend, "roundtrip", None)
        if declared is None or roundtrip is None:
            continue
        if int(declared) == bits:
            return cast(Roundtrip, roundtrip)
        offered.append(int(declared))
    have = (
        f"the installed backends offer {sorted(set(offered))}"
        if offered
        else "no installed weight backend quantises"
    )
    raise ConfigError(
        f"LoftQ with loftq_bits={bits} needs a weight backend that quantises to {bits} bits, and "
        f"{have}: pip install adapt-bnb (4 = nf4, 8 = int8)" + store.broken_note(GROUP_BACKENDS)
    )
