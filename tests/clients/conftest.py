"""Real clients (transformers Trainer, TRL, sentence-transformers) on the kit's tiny models.

Models come from configs, tokenizers from a word list (nothing is downloaded); HF offline.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from adapt.core import testing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = (  # noqa: SIM905 - one line of words reads better
    "the a cat dog car bus sat ran on under mat road red blue big small fast slow "
    "is was and or yes no good bad answer question what which why"
).split()


def word_tokenizer() -> Any:
    """A WordLevel tokenizer over WORDS with <pad>, <eos>, <unk> and a plain chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}{% endif %}"
    )
    return tok


#: the kit's tiny Llama (:func:`adapt.core.testing.tiny_llama`) at width 32, vocabulary 64,
#: with the word tokenizer's ids (<pad> 0, <eos> 1, also bos)
tiny_llama = partial(
    testing.tiny_llama,
    hidden_size=32,
    intermediate_size=64,
    vocab_size=64,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
    tie_word_embeddings=False,
)


def sft_rows(n: int = 16) -> list[dict[str, str]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (6,), generator=g).tolist()
        rows.append({"text": " ".join(WORDS[i] for i in idx)})
    return rows


def dpo_rows(n: int = 8) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt": f"question what is the {WORDS[3 + i % 4]}",
                "chosen": " answer yes good",
                "rejected": " answer no bad",
            }
        )
    return rows


@pytest.fixture
def tokenizer() -> Any:
    return word_tokenizer()


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"
