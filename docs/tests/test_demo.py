"""The README's demo, for every method on a dense and a 4-bit model: the loss drops, the
reload check passes, the merge keeps the model working (short runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def load_demo():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("adapt_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["adapt_demo"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quantize", ["none", "4bit"])
@pytest.mark.parametrize("method", ["lora", "vera", "adalora"])
def test_demo(
    method: str, quantize: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("bitsandbytes")
    demo = load_demo()
    result = demo.main(
        ["--method", method, "--quantize", quantize, "--steps", "100", "--output-dir",
         str(tmp_path / "out")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "summary" in out and "reload check" in out and "(ok, logits up to" in out
    loss0, loss1 = result["loss"]
    assert loss1 < 0.9 * loss0
    acc0, acc1, acc_merged = result["accuracy"]
    assert acc1 > acc0 + 0.2
    assert acc_merged > acc0 + 0.2
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    if method == "adalora":
        assert (tmp_path / "out" / "ranks.png").is_file()
