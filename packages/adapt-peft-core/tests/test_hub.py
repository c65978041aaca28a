"""Adapters by Hugging Face Hub repo id, through huggingface_hub's own cache code (a cache folder
built on disk: no network here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from core_testutils import assert_unchanged, mlp, snapshot

from adapt.core import AdaptedModel, CheckpointError, adapt, load_config
from adapt.core.testing import ToyConfig

pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def trained() -> AdaptedModel:
    torch.manual_seed(5)
    model = adapt(mlp(), ToyConfig(target_modules=["up", "down"], init_identity=False, r=3))
    model.add_adapter("other", ToyConfig(target_modules=["up"], init_identity=False, r=2))
    return model


def hub_cache(tmp_path: Path, repo: str, folder: Path) -> Path:
    """A Hub cache holding ``folder`` as the ``main`` snapshot of ``repo``."""
    cache = tmp_path / "hub-cache"
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / COMMIT)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture
def cached(tmp_path: Path) -> tuple[AdaptedModel, Path]:
    model = trained()
    model.save_pretrained(tmp_path / "saved")
    return model, hub_cache(tmp_path, "acme/tiny-adapter", tmp_path / "saved")


def test_from_pretrained_by_repo_id(cached: tuple[AdaptedModel, Path], x: torch.Tensor) -> None:
    model, cache = cached
    loaded = AdaptedModel.from_pretrained(
        mlp(), "acme/tiny-adapter", cache_dir=str(cache), local_files_only=True
    )
    torch.testing.assert_close(loaded(x), model(x))
    config = load_config("acme/tiny-adapter", cache_dir=str(cache), local_files_only=True)
    assert config.peft_type == "TOY"


def test_load_adapter_from_a_subfolder_by_repo_id(
    cached: tuple[AdaptedModel, Path], x: torch.Tensor
) -> None:
    model, cache = cached
    loaded = AdaptedModel.from_pretrained(
        mlp(), "acme/tiny-adapter", cache_dir=str(cache), local_files_only=True
    )
    loaded.load_adapter(
        "acme/tiny-adapter", "other", subfolder="other", cache_dir=str(cache), revision="main"
    )
    loaded.set_adapter("other")
    model.set_adapter("other")
    torch.testing.assert_close(loaded(x), model(x))


def test_a_local_folder_wins_over_the_hub(
    cached: tuple[AdaptedModel, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    x: torch.Tensor,
) -> None:
    model, _ = cached
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme").mkdir()
    shutil.copytree(tmp_path / "saved", tmp_path / "acme" / "tiny-adapter")
    # no cache_dir and offline: only the local folder can satisfy this
    loaded = AdaptedModel.from_pretrained(mlp(), "acme/tiny-adapter", local_files_only=True)
    torch.testing.assert_close(loaded(x), model(x))


def test_repo_not_in_the_cache_offline_is_a_clear_error(cached: tuple[AdaptedModel, Path]) -> None:
    _, cache = cached
    base = mlp()
    before = snapshot(base)
    with pytest.raises(CheckpointError) as err:
        AdaptedModel.from_pretrained(
            base, "acme/no-such-adapter", cache_dir=str(cache), local_files_only=True
        )
    msg = str(err.value)
    assert "no local folder 'acme/no-such-adapter'" in msg and "Hugging Face Hub" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert_unchanged(base, before)


def test_paths_that_are_not_repo_ids_stay_local(tmp_path: Path) -> None:
    for path in (str(tmp_path / "missing"), "missing", "./acme/x", "a/b/c"):
        with pytest.raises(CheckpointError, match="the folder does not exist"):
            AdaptedModel.from_pretrained(mlp(), path, local_files_only=True)


def test_unknown_download_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match=r"unexpected arguments \['mirror'\]"):
        AdaptedModel.from_pretrained(mlp(), "acme/tiny-adapter", mirror="x")
