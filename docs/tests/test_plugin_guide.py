"""docs/guides/writing-a-plugin.md: every ```python block runs, in order, in one namespace.

Needs the example plugins (docs/examples/adapt-gated-linear, docs/examples/adapt-example-ia3,
docs/examples/adapt-example-scaled-lora) installed, and PEFT; ``nox -s plugin`` installs them
from their wheels into a fresh venv and runs this file there.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "guides" / "writing-a-plugin.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
#: The example packages' modules whose classes and functions the guide shows verbatim.
PACKAGE_MODULES = (
    "adapt_gated_linear.modules",
    "adapt_gated_linear.backend",
    "adapt_gated_linear.layer",
    "adapt_example_ia3.config",
    "adapt_example_ia3.layer",
    "adapt_example_ia3.method",
    "adapt_example_scaled_lora.variant",
)
#: The example packages the guide runs against.
EXAMPLES = ("adapt_gated_linear", "adapt_example_ia3", "adapt_example_scaled_lora")


def python_blocks() -> list[tuple[int, str]]:
    """``(first line number, code)`` of each ```python block of the guide."""
    text = GUIDE.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def in_process_entries() -> list[tuple[str, str]]:
    from adapt.core import get_registry

    registry = get_registry()
    return [
        (group, e.name)
        for group in ("adapt.methods", "adapt.layers", "adapt.backends", "adapt.lora_variants")
        for e in registry.entries(group)
        if e.distribution == "<in-process>"
    ]


def test_the_guide_has_python_blocks() -> None:
    assert len(python_blocks()) >= 8


def test_guide_blocks_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for example in EXAMPLES:
        pytest.importorskip(example)
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    before = in_process_entries()
    # "__main__": class paths in the guide's printed output read as in a notebook
    namespace: dict[str, object] = {"__name__": "__main__"}
    for line, code in python_blocks():
        # pad so that tracebacks point at the guide's own line numbers
        compiled = compile("\n" * (line - 1) + code, str(GUIDE), "exec", dont_inherit=True)
        exec(compiled, namespace)
    out = capsys.readouterr().out
    # the guide leaves the process-wide registry as it found it
    assert in_process_entries() == before
    # what the guide's ```text blocks show
    assert "no weight backend can read the weight of __main__.GatedLinear" in out
    assert "shadowed by square-gated-lora for GatedLinear" in out
    assert "plugin conflict for adapt_gated_linear.modules.GatedLinear" in out
    assert "{('layers', 'gated-lora-linear'): ['ok'], ('backends', 'gated-linear'): ['ok']}" in out
    assert "GatedLoraLinear: 12 passed, 0 failed, 0 skipped" in out
    assert "adapt conformance of __main__.UngatedLora" in out
    assert "  FAIL  merged output equals unmerged" in out
    assert "GatedLinearBackend: 7 passed, 0 failed, 0 skipped" in out
    # part II, the IA³ method, and part III, the LoRA variant "scaled"
    assert text_blocks_after("# Part III: a LoRA variant")
    for line in text_blocks_after("# Part II: a new method"):
        assert line in out, f"the guide shows {line!r}, the code printed:\n{out}"


def text_blocks_after(heading: str) -> list[str]:
    """The lines of every ```text block after ``heading``."""
    text = GUIDE.read_text(encoding="utf-8")
    part = text[text.index(heading) :]
    blocks = re.findall(r"^```text\n(.*?)^```", part, re.DOTALL | re.MULTILINE)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_guide_code_matches_the_package() -> None:
    """The classes and functions the guide shows are the example packages', verbatim."""
    for example in EXAMPLES:
        pytest.importorskip(example)
    package: dict[str, str] = {}
    for dotted in PACKAGE_MODULES:
        module = importlib.import_module(dotted)
        for node in ast.parse(inspect.getsource(module)).body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef):
                package[node.name] = ast.dump(node)
    shown: dict[str, str] = {}
    for _, code in python_blocks():
        for node in ast.parse(code).body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name in package:
                shown[node.name] = ast.dump(node)
    assert {"GatedLinear", "GatedLinearBackend", "GatedLoraLinear"} <= set(shown)
    assert {"IA3Config", "IA3Linear", "IA3Method"} <= set(shown)
    assert {"ScaledLora"} <= set(shown)
    differ = sorted(name for name, dump in shown.items() if dump != package[name])
    assert not differ, f"the guide's copy of {differ} differs from the example package's"
