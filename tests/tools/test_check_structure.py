"""tools/check_structure.py on planted trees: each rule fails where it should, with a line that
names the file and the rule, and a clean tree passes. No torch needed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "check_structure.py"


def _tiers() -> dict[str, int]:
    spec = importlib.util.spec_from_file_location("check_structure", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    tiers: dict[str, int] = module.TIERS
    return tiers


#: the script's own tier map: the expected messages follow it
T = _tiers()
CORE = Path("packages/adapt-peft-core/src/adapt/core")

#: a small adapt-core whose imports all go down the tiers, plus its neighbours
CLEAN = {
    CORE / "__init__.py": "from .errors import AdaptError\nfrom .model import AdaptedModel\n",
    CORE / "__about__.py": '__version__ = "0.0.0"\n',
    CORE / "errors.py": "class AdaptError(Exception):\n    pass\n",
    CORE / "config.py": "from .errors import AdaptError\n",
    CORE / "layer.py": "from . import config\nfrom .errors import AdaptError\n",
    CORE / "registry.py": "from adapt.core.config import AdaptError\n",
    CORE / "model.py": """
        from typing import TYPE_CHECKING

        import torch

        from .layer import config
        from .registry import AdaptError

        if TYPE_CHECKING:
            from .method import Method


        class AdaptedModel:
            def add(self):
                from adapt.core import errors
                import adapt.core.config
    """,
    CORE / "method.py": "from .config import AdaptError\n",
    CORE / "trainer.py": "from .model import AdaptedModel\n",
    # inside a subpackage: its own modules freely, core below it by both relative forms
    CORE / "testing" / "__init__.py": "from .toy import Toy\nfrom .asserts import check\n",
    CORE / "testing" / "toy.py": "from .. import registry\nfrom ..model import AdaptedModel\n"
    "from . import asserts\n\nclass Toy:\n    pass\n",
    CORE
    / "testing"
    / "asserts.py": "from adapt.core.testing import toy\n\ndef check():\n    pass\n",
    CORE / "integrations" / "__init__.py": "",
    CORE
    / "integrations"
    / "trl.py": "from ..trainer import AdaptedModel\nfrom ._saving import x\n",
    CORE / "integrations" / "_saving.py": "x = 1\n",
    # beside the namespace: not a core module
    Path("packages/adapt-peft-core/src/_guard.py"): "import adapt.core.model\n",
    # another package may import any of core
    Path(
        "packages/adapt-other/src/adapt/other/__init__.py"
    ): "from adapt.core import AdaptedModel\n",
    # at the limits, not over them: 400 lines, a 60-line function
    Path("tools/at_limit.py"): "def f():\n" + "    x = 1\n" * 59 + "\n" * 340,
}


def plant(root: Path, files: dict[Path, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))


def run(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    plant(tmp_path, CLEAN)
    assert len((tmp_path / "tools/at_limit.py").read_text().splitlines()) == 400
    result = run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "check_structure: ok"


def function_of(n_lines: int) -> str:
    """A method whose def line to last line is ``n_lines`` lines."""
    return "class C:\n    def long(self):\n" + "        x = 1\n" * (n_lines - 1)


CASES = {
    "a 401-line file in a package": (
        {Path("packages/adapt-other/src/adapt/other/big.py"): "x = 1\n" * 401},
        "packages/adapt-other/src/adapt/other/big.py:1: file-length: 401 lines, the limit is 400",
    ),
    "a 401-line file in tools": (
        {Path("tools/bench/big.py"): "x = 1\n" * 401},
        "tools/bench/big.py:1: file-length: 401 lines, the limit is 400",
    ),
    "a 61-line method": (
        {Path("packages/adapt-other/src/adapt/other/long.py"): function_of(61)},
        "packages/adapt-other/src/adapt/other/long.py:2: function-length: long() is 61 lines "
        "(def to last line), the limit is 60",
    ),
    "an upward import at top level": (
        {CORE / "errors.py": "from .model import AdaptedModel\n"},
        f"{CORE.as_posix()}/errors.py:1: import-tier: errors (tier 0) imports model (tier {T['model']}, "
        "a higher tier) at module level",
    ),
    "an upward import under TYPE_CHECKING": (
        {
            CORE / "config.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
            "    from .layer import X\n"
        },
        f"{CORE.as_posix()}/config.py:4: import-tier: config (tier {T['config']}) imports layer "
        f"(tier {T['layer']}, "
        "a higher tier) under TYPE_CHECKING",
    ),
    "an upward import inside a function, absolute": (
        {CORE / "method.py": "def hook():\n    from adapt.core.model import AdaptedModel\n"},
        f"{CORE.as_posix()}/method.py:2: import-tier: method (tier {T['method']}) imports model "
        f"(tier {T['model']}, "
        "a higher tier) inside hook()",
    ),
    "a same-tier import": (
        {CORE / "merging.py": "from .injection import plan\n"},
        f"{CORE.as_posix()}/merging.py:1: import-tier: merging (tier {T['merging']}) imports "
        f"injection (tier {T['injection']}, the same tier) at module level",
    ),
    "an upward `from . import module`": (
        {CORE / "config.py": "from . import registry\n"},
        f"{CORE.as_posix()}/config.py:1: import-tier: config (tier {T['config']}) imports registry "
        f"(tier {T['registry']}",
    ),
    "an upward `from .. import module` in a subpackage": (
        {CORE / "testing" / "toy.py": "from .. import integrations\n"},
        f"{CORE.as_posix()}/testing/toy.py:1: import-tier: testing (tier {T['testing']}) "
        f"imports integrations (tier {T['integrations']}",
    ),
    "importing the package itself from core": (
        {CORE / "model.py": "from adapt.core import AdaptedModel\n"},
        f"{CORE.as_posix()}/model.py:1: import-tier: model (tier {T['model']}) imports "
        f"adapt.core (the package __init__) (tier {T['__init__']}, a higher tier)",
    ),
    "importing the package itself, relative": (
        {CORE / "trainer.py": "from . import AdaptedModel\n"},
        f"{CORE.as_posix()}/trainer.py:1: import-tier: trainer (tier {T['trainer']}) imports "
        "adapt.core",
    ),
    "a package touching a module's __dict__": (
        {
            Path(
                "packages/adapt-other/src/adapt/other/state.py"
            ): "def f(m):\n    m.__dict__['x'] = 1\n"
        },
        "packages/adapt-other/src/adapt/other/state.py:2: module-internals: touches .__dict__",
    ),
    "core touching _modules": (
        {CORE / "config.py": "def f(m):\n    return m._modules.get('x')\n"},
        f"{CORE.as_posix()}/config.py:2: module-internals: touches ._modules",
    ),
    "an unmapped module": (
        {CORE / "newthing.py": "from .errors import AdaptError\n"},
        f"{CORE.as_posix()}/newthing.py:1: unmapped-module: adapt.core.newthing has no tier",
    ),
    "an unmapped subpackage": (
        {CORE / "newpkg" / "__init__.py": "", CORE / "newpkg" / "a.py": ""},
        f"{CORE.as_posix()}/newpkg/a.py:1: unmapped-module: adapt.core.newpkg.a has no tier; "
        "fix: add 'newpkg' to TIERS",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_violation_fails_with_a_line_naming_file_and_rule(tmp_path: Path, case: str) -> None:
    planted, expected = CASES[case]
    plant(tmp_path, {**CLEAN, **planted})
    result = run(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) >= 1 and all(": fix: " in line or "; fix: " in line for line in lines)
    assert any(line.startswith(expected) for line in lines), result.stdout
    assert "violation(s)" in result.stderr


def test_every_violation_is_listed_once(tmp_path: Path) -> None:
    planted = {
        CORE / "errors.py": "from .model import A, B\nfrom . import model, config\n",
        Path("tools/big.py"): "x = 1\n" * 401,
    }
    plant(tmp_path, {**CLEAN, **planted})
    result = run(tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    # one line per import statement and module (A and B come from one module), one per file
    assert [line.split(": ")[0:2] for line in lines] == [
        [f"{CORE.as_posix()}/errors.py:1", "import-tier"],
        [f"{CORE.as_posix()}/errors.py:2", "import-tier"],
        [f"{CORE.as_posix()}/errors.py:2", "import-tier"],
        ["tools/big.py:1", "file-length"],
    ]
    assert result.stderr.strip() == "check_structure: 4 violation(s)"


def test_a_syntax_error_is_a_violation_not_a_crash(tmp_path: Path) -> None:
    plant(tmp_path, {**CLEAN, Path("tools/broken.py"): "def f(:\n"})
    result = run(tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith("tools/broken.py:1: syntax-error: cannot parse")
