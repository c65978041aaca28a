"""Test kit for adapt and its plugins: a toy method and reusable assertions.

Core's own tests use it so that ``adapt.core`` is tested without any method package; plugin
authors can use it to check that their layers honour the layer protocol.

* :class:`ToyConfig`, :class:`ToyLayer`, :class:`ToyMethod`: the smallest complete method.
  ``ToyLayer`` wraps ``nn.Linear`` with ``ΔW = B @ A`` (``toy_A``: r × in, ``toy_B``:
  out × r); B starts at zero, so a new adapter is the identity, unless
  ``init_identity=False``.
* :func:`registered_toy` registers the toy method and layer in-process (for a ``with``
  block or a pytest fixture) and unregisters them afterwards.
* :func:`isolated_registry` swaps the process-wide registry for an empty one that ignores
  installed entry points, so a test sees only what it registers.
* :func:`assert_merge_roundtrip` and :func:`assert_mixed_batch_matches` check the merge
  protocol and mixed-batch routing of any :class:`~adapt.core.AdaptedModel`.

Models and data for tests (transformers is imported only when a builder is called):

* :func:`tiny_llama`: a seeded ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, 2 KV heads,
  vocabulary 128, in eval mode); a keyword overrides any ``LlamaConfig`` field.
* :func:`tiny_gpt2`: a seeded ``GPT2LMHeadModel`` (Conv1D layers; n_embd 64, 2 layers, 4 heads).
* :func:`tiny_mixtral`, :func:`tiny_qwen3_moe`: seeded mixtures of experts (4 experts, top-2;
  fused expert parameters in transformers ≥ 5).
* :func:`tiny_bert`: a seeded ``BertModel`` (hidden 64, 2 layers, 4 heads, intermediate 128).
* :func:`tiny_llama_config`, :func:`tiny_gpt2_config`, :func:`tiny_bert_config`: their configs,
  for ``from_config`` or a saved folder.
* :func:`token_ids`: a seeded ``batch × length`` batch of token ids in ``[low, vocab_size)``.
* :func:`randomise_adapters`: seeded noise into a model's trainable (or chosen) parameters, so
  an identity-initialised adapter changes the output.

Probes for fast paths: :func:`counting_apply` counts an autograd ``Function``'s calls in a block;
:func:`counting_torch_calls` counts calls of torch functions (which kernel path ran);
:func:`recording_saved` records the tensors autograd keeps for the backward in a block;
:func:`loss_and_grads` runs one causal-LM step (under autocast if asked) and returns its loss and
gradients, to compare a fast path with the plain one.

Example, as pytest fixtures::

    import pytest
    from adapt.core.testing import isolated_registry, registered_toy


    @pytest.fixture(autouse=True)
    def toy():
        with isolated_registry(), registered_toy() as method:
            yield method

The kit's modules, by concern: :mod:`.toy` (the toy method), :mod:`.registries` (registry
isolation), :mod:`.asserts` (assertions over a model), :mod:`.models` (the model under
test, its inputs, seeded adapter weights), :mod:`.probes` (call counts, one step's gradients),
:mod:`.transformers_models` (tiny transformers models), :mod:`.checks` and :mod:`.conformance`
(:func:`check_layer`). Import from ``adapt.core.testing`` itself; the modules are its layout,
not its API.
"""

from __future__ import annotations

from .asserts import assert_merge_roundtrip, assert_mixed_batch_matches, output_tensor
from .backend_kit import check_backend
from .conformance import ConformanceReport, check_layer
from .models import randomise_adapters, token_ids
from .probes import (
    CallCount,
    SavedTensors,
    counting_apply,
    counting_torch_calls,
    loss_and_grads,
    recording_saved,
)
from .registries import isolated_registry
from .toy import TOY_LAYER_NAME, TOY_METHOD_NAME, ToyConfig, ToyLayer, ToyMethod, registered_toy
from .transformers_models import (
    tiny_bert,
    tiny_bert_config,
    tiny_gpt2,
    tiny_gpt2_config,
    tiny_llama,
    tiny_llama_config,
    tiny_mixtral,
    tiny_qwen3_moe,
)

__all__ = [
    "TOY_LAYER_NAME",
    "TOY_METHOD_NAME",
    "CallCount",
    "ConformanceReport",
    "SavedTensors",
    "ToyConfig",
    "ToyLayer",
    "ToyMethod",
    "assert_merge_roundtrip",
    "assert_mixed_batch_matches",
    "check_backend",
    "check_layer",
    "counting_apply",
    "counting_torch_calls",
    "isolated_registry",
    "loss_and_grads",
    "output_tensor",
    "randomise_adapters",
    "recording_saved",
    "registered_toy",
    "tiny_bert",
    "tiny_bert_config",
    "tiny_gpt2",
    "tiny_gpt2_config",
    "tiny_llama",
    "tiny_llama_config",
    "tiny_mixtral",
    "tiny_qwen3_moe",
    "token_ids",
]
