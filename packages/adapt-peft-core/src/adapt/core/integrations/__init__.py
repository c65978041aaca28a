"""adapt's side of other libraries' training loops (tier 7: nothing in adapt imports this).

Each module imports its library when *it* is imported, never before; ``import adapt.core``
imports none of them.

* :mod:`adapt.core.integrations.transformers`: ``Trainer``, transformers' Trainer that saves
  and resumes adapters in PEFT's format.
* :mod:`adapt.core.integrations.trl`: ``SFTTrainer`` and ``DPOTrainer``, TRL's trainers that
  take an ``AdaptedModel`` (fused LM head on the wrapped model; DPO's reference is the model
  with its adapters disabled: no second model in memory).
* :mod:`adapt.core.integrations.sentence_transformers`: ``adapt_sentence_transformer``, which
  adapts a ``SentenceTransformer`` in place so that ``st.save()`` writes the adapter.
"""
