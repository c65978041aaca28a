"""adapt-adalora's presets of the kit's models and batches (:mod:`adapt.core.testing`)."""

from __future__ import annotations

from functools import partial

from adapt.core.testing import tiny_gpt2, tiny_llama, token_ids

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: the kit's default tiny Llama and GPT-2, left in training mode
llama = partial(tiny_llama, training=True)
gpt2 = partial(tiny_gpt2, training=True)
#: 4 sequences of 12 ids in [0, 128), seed 5
ids = partial(token_ids, batch=4, length=12, seed=5)
