"""The ``adapt`` command line on real LoRA adapters and a transformers model folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adapt.core import adapt  # noqa: E402
from adapt.core.cli import main  # noqa: E402
from adapt.core.testing import tiny_llama  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402


def _llama(layers: int = 2) -> torch.nn.Module:
    # the kit's tiny Llama at width 32 (transformers' default max_position_embeddings)
    return tiny_llama(
        hidden_size=32,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=2048,
        num_hidden_layers=layers,
    )


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    _llama().save_pretrained(base_dir)
    torch.manual_seed(1)
    model = adapt(
        _llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(adapter_dir)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    return base_dir, adapter_dir, expected


def test_merge_writes_a_model_with_the_adapter_folded_in(
    saved: tuple[Path, Path, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_dir, adapter_dir, expected = saved
    out = tmp_path / "merged"
    assert (
        main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "[3/4] merging 4 adapted layers" in text and "done in" in text
    merged = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=torch.arange(10).unsqueeze(0)).logits
    assert (got - expected).abs().max().item() < 1e-5


def test_merge_refuses_a_non_empty_output(
    saved: tuple[Path, Path, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_dir, adapter_dir, _ = saved
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert (
        main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)])
        == 1
    )
    assert "--overwrite" in capsys.readouterr().err


def test_inspect_lists_method_targets_and_ranks(
    saved: tuple[Path, Path, torch.Tensor], capsys: pytest.CaptureFixture[str]
) -> None:
    _, adapter_dir, _ = saved
    assert main(["inspect", str(adapter_dir)]) == 0
    text = capsys.readouterr().out
    assert "method:       LORA" in text
    assert "model.layers.0.self_attn.q_proj" in text
    assert "tensors:      8 in 4 modules" in text
    row = next(
        line for line in text.splitlines() if line.startswith("model.layers.1.self_attn.v_proj")
    )
    assert row.split()[1] == "4"


def test_inspect_asks_lora_for_keys_modules_and_ranks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Embeddings (lora_embedding_A), per-module ranks, modules_to_save, the 20-module cut."""
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=[*every, "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"q_proj": 2},
    )
    adapt(_llama(layers=3), config).save_pretrained(tmp_path / "big")
    assert main(["inspect", str(tmp_path / "big")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[4:9] == [
        "r:            4",
        "lora_alpha:   8",
        "use_rslora:   False",
        "use_dora:     False",
        "modules_to_save: ['lm_head']",
    ]
    rows = {line.split()[0]: line.split() for line in lines[13:33]}
    assert rows["lm_head"][1:] == ["weight", "[64,", "32]"]  # saved whole: no rank
    assert rows["model.embed_tokens"][1] == "4"
    assert rows["model.layers.0.self_attn.q_proj"][1:3] == ["2", "lora_A.weight"]
    assert lines[-1] == "… 3 more modules (use --all to list every one)"
    assert main(["inspect", str(tmp_path / "big"), "--all"]) == 0
    assert "model.layers.2.self_attn.v_proj  4 " in capsys.readouterr().out


def test_inspect_says_a_qalora_folder_uses_a_feature_adapt_lacks(
    saved: tuple[Path, Path, torch.Tensor], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import json
    import shutil

    _, adapter_dir, _ = saved
    dora = tmp_path / "dora"
    shutil.copytree(adapter_dir, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_qalora": True}))
    assert main(["inspect", str(dora)]) == 0
    method = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("method:")
    )
    assert method == (
        "method:       LORA — uses use_qalora=True, a PEFT feature adapt does not implement: "
        "adapt cannot load it"
    )
    # and a plain LoRA folder has no such note
    assert main(["inspect", str(adapter_dir)]) == 0
    assert "method:       LORA\n" in capsys.readouterr().out


def test_inspect_missing_folder_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_plugins_lists_lora_with_its_distribution() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adapt.core.cli", "plugins"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = {tuple(line.split()[:3]) for line in out.splitlines()[2:]}
    assert ("methods", "lora", "adapt-lora") in lines
    assert ("layers", "lora-linear", "adapt-lora") in lines


def test_inspect_into_a_closed_pipe_stops_quietly(saved: tuple[Path, Path, torch.Tensor]) -> None:
    """`adapt inspect DIR | head -1`: no traceback when the reader has gone away."""
    _, adapter_dir, _ = saved
    code = "import sys; from adapt.core.cli import main; sys.exit(main(['inspect', sys.argv[1]]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(adapter_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_inspect_shows_parameter_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """target_parameters: the parameters line, and per-expert rank × number of experts."""
    from adapt.core.testing import tiny_mixtral

    model = tiny_mixtral()
    if not any(n.endswith("experts.gate_up_proj") for n, _ in model.named_parameters()):
        pytest.skip("this transformers stores experts as Linear modules")
    params = ["experts.gate_up_proj", "experts.down_proj"]
    config = LoraConfig(r=4, target_modules=["q_proj"], target_parameters=params)
    adapt(model, config).save_pretrained(tmp_path / "moe")
    assert main(["inspect", str(tmp_path / "moe")]) == 0
    text = capsys.readouterr().out
    assert f"parameters:   {params}" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("model.")}
    assert "4 × 4 experts" in rows["model.layers.0.mlp.experts.base_layer"]
    assert "lora_A.weight [16, 64]" in rows["model.layers.0.mlp.experts.base_layer"]
    assert rows["model.layers.0.self_attn.q_proj"].split()[1] == "4"
