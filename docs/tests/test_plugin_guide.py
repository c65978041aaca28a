"""docs/guides/writing-a-plugin.md: every ```python block runs, in order, in one namespace.

Needs the example plugin (docs/examples/adapt-gated-linear) installed; ``nox -s plugin``
installs it from its wheel into a fresh venv and runs this file there.
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
#: The package modules whose classes and functions the guide shows verbatim.
PACKAGE_MODULES = ("modules", "backend", "layer")


def python_blocks() -> list[tuple[int, str]]:
    """``(first line number, code)`` of each ```python block of the guide."""
    text = GUIDE.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def in_process_entries() -> list[tuple[str, str]]:
    from adapt.core import get_registry

    registry = get_registry()
    return [
        (group, e.name)
        for group in ("adapt.methods", "adapt.layers", "adapt.backends")
        for e in registry.entries(group)
        if e.distribution == "<in-process>"
    ]


def test_the_guide_has_python_blocks() -> None:
    assert len(python_blocks()) >= 8


def test_guide_blocks_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("adapt_gated_linear")
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


def test_guide_code_matches_the_package() -> None:
    """The classes and functions the guide shows are the example package's, verbatim."""
    pytest.importorskip("adapt_gated_linear")
    package: dict[str, str] = {}
    for name in PACKAGE_MODULES:
        module = importlib.import_module(f"adapt_gated_linear.{name}")
        for node in ast.parse(inspect.getsource(module)).body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef):
                package[node.name] = ast.dump(node)
    shown: dict[str, str] = {}
    for _, code in python_blocks():
        for node in ast.parse(code).body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name in package:
                shown[node.name] = ast.dump(node)
    assert {"GatedLinear", "GatedLinearBackend", "GatedLoraLinear"} <= set(shown)
    differ = sorted(name for name, dump in shown.items() if dump != package[name])
    assert not differ, f"the guide's copy of {differ} differs from adapt_gated_linear's"
