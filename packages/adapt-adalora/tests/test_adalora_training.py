"""Rank allocation in real training runs: the budget is met, important matrices keep rank,
loss falls, and the rank pattern round-trips through save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adalora_testutils import LLAMA_TARGETS, ids, llama
from safetensors.torch import load_file
from torch import nn

from adapt.adalora import AdaLoraConfig
from adapt.core import AdaptedModel, AdapterStateError, adapt

STEPS = 60


def train_llama(tmp: Path | None = None) -> tuple[AdaptedModel, list[float]]:
    config = AdaLoraConfig(
        init_r=6,
        target_r=3,
        tinit=10,
        tfinal=10,
        deltaT=5,
        total_step=STEPS,
        lora_alpha=12,
        target_modules=LLAMA_TARGETS,
    )
    model = adapt(llama(), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = ids(batch=8, length=16, seed=2)
    losses = []
    model.train()
    for step in range(STEPS):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


@pytest.fixture(scope="module")
def trained() -> tuple[AdaptedModel, list[float]]:
    return train_llama()


def test_budget_is_met_and_loss_decreases(trained: tuple[AdaptedModel, list[float]]) -> None:
    model, losses = trained
    config = model.peft_config["default"]
    pattern = config.rank_pattern
    assert pattern is not None
    n_matrices = 2 * len(LLAMA_TARGETS)
    assert len(pattern) == n_matrices
    kept = sum(sum(mask) for mask in pattern.values())
    assert kept == config.target_r * n_matrices  # the target budget, exactly
    # ranks are allocated unevenly: budgeting is not a uniform cut
    assert len({sum(mask) for mask in pattern.values()}) > 1
    # masked singular values are zero in the live layers
    for path, layer in model.adapter_layers():
        mask = torch.tensor(pattern[f"{path}.lora_E"])
        assert torch.all(layer.lora_E["default"].view(-1)[~mask] == 0)
    assert losses[-1] < 0.8 * losses[0], (losses[0], losses[-1])
    print("rank pattern:", {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()})


def test_rank_pattern_round_trips(
    trained: tuple[AdaptedModel, list[float]], tmp_path: Path
) -> None:
    model, _ = trained
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids()).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    pattern = saved["rank_pattern"]
    assert pattern == model.peft_config["default"].rank_pattern
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for key, mask in pattern.items():
        path = key.removesuffix(".lora_E")
        kept = sum(mask)
        prefix = f"base_model.model.{path}"
        assert tensors[f"{prefix}.lora_A"].shape[0] == kept
        assert tensors[f"{prefix}.lora_E"].shape == (kept, 1)
        assert tensors[f"{prefix}.lora_B"].shape[1] == kept
    loaded = AdaptedModel.from_pretrained(llama(), tmp_path).eval()
    for path, layer in loaded.adapter_layers():
        assert layer.r["default"] == sum(pattern[f"{path}.lora_E"])
        assert layer.ranknum["default"] == 6.0  # the scale still divides by init_r
    with torch.no_grad():
        got = loaded(input_ids=ids()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # saving the loaded (already pruned) adapter writes the same files
    loaded.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    # a budgeted adapter cannot be budgeted again
    trainable = AdaptedModel.from_pretrained(llama(), tmp_path, is_trainable=True)
    with pytest.raises(AdapterStateError, match="already budgeted"):
        trainable.update_and_allocate(0)


class TwoPaths(nn.Module):
    """y = strong(x) + 0.01 · weak(x): the weak path barely matters to the loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.strong = nn.Linear(32, 32)
        self.weak = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.strong(x) + 0.01 * self.weak(x)  # type: ignore[no-any-return]


def test_more_important_matrices_keep_more_rank() -> None:
    config = AdaLoraConfig(
        init_r=8, target_r=4, tinit=5, tfinal=5, deltaT=2, total_step=40, lora_alpha=8,
        target_modules=["strong", "weak"], orth_reg_weight=0.0,
    )  # fmt: skip
    model = adapt(TwoPaths(), config)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    target = x @ torch.randn(32, 32, generator=gen) * 0.5
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(40):
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None
    strong, weak = sum(pattern["strong.lora_E"]), sum(pattern["weak.lora_E"])
    assert strong + weak == 8
    assert strong > weak, pattern


def test_passing_total_step_without_allocation_warns() -> None:
    config = AdaLoraConfig(init_r=4, target_r=2, total_step=10, tfinal=2, target_modules=["0"])
    model = adapt(nn.Sequential(nn.Linear(8, 8)), config)
    with pytest.warns(UserWarning, match="no rank was ever allocated"):
        model.update_and_allocate(9)


def test_a_matrix_pruned_to_rank_zero_saves_and_loads(tmp_path: Path) -> None:
    config = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["0", "1"])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model = adapt(net, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    config.rank_pattern = {"0.lora_E": [False] * 4, "1.lora_E": [True, True, False, True]}
    for path, layer in model.adapter_layers():
        layer.apply_mask("default", config.rank_pattern[f"{path}.lora_E"])
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.0.lora_A"].shape == (0, 8)
    assert tensors["base_model.model.0.lora_E"].shape == (0, 1)
    assert tensors["base_model.model.0.lora_B"].shape == (8, 0)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    loaded = AdaptedModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want)


def test_inspect_plots_the_rank_heat_map(
    trained: tuple[AdaptedModel, list[float]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    from adapt.core import cli
    from adapt.core.cli import rank_grid

    model, _ = trained
    model.save_pretrained(tmp_path / "adapter")
    png = tmp_path / "ranks.png"
    assert cli.main(["inspect", str(tmp_path / "adapter"), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "init_r:" in out and f"rank heat map written to {png}" in out
    assert "\nr:" not in out  # the r PEFT writes for AdaLoRA means nothing; not shown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pattern = model.peft_config["default"].rank_pattern
    ranks = {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    rows, columns, grid = rank_grid(ranks)
    assert rows == ["model.layers.0", "model.layers.1"]
    assert "self_attn.q_proj" in columns and "mlp.down_proj" in columns
    assert grid[0][columns.index("self_attn.q_proj")] == ranks["model.layers.0.self_attn.q_proj"]
