"""Another project's regular ``adapt`` package next to ours: both layouts get a clear message.

Each case runs a fresh interpreter with a stand-in for the index's ``adapt`` project (a regular
``adapt/__init__.py``) built in a temporary folder. The guard is imported explicitly, as the
``.pth`` line of an installed wheel does at start-up. (`nox -s wheels` repeats the check with the
real project from the public index in a venv built from our wheels.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import adapt.core

OUR_CORE = Path(adapt.core.__file__).resolve().parent


def run(code: str, *path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in path), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-W", "default", "-c", f"import _adapt_peft_core_guard\n{code}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def foreign_adapt(root: Path, init: str = "import json\n", *, with_our_core: bool) -> Path:
    """A regular package `adapt` under root; with_our_core links our adapt/core into it (the
    same-folder layout of two projects installed into one site-packages)."""
    package = root / "adapt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    if with_our_core:
        (package / "core").symlink_to(OUR_CORE, target_is_directory=True)
    return root


def test_no_foreign_package_no_message(tmp_path: Path) -> None:
    result = run("import adapt.core; print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "another project" not in result.stderr


def test_elsewhere_on_sys_path_hides_core_and_is_explained(tmp_path: Path) -> None:
    root = foreign_adapt(tmp_path / "other", with_our_core=False)
    result = run("import adapt.core", root)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: No module named 'adapt.core': ")
    assert f"`adapt` at {root / 'adapt' / '__init__.py'}" in last
    assert "is another project" in last
    assert "hide the namespace package `adapt`" in last
    assert str(OUR_CORE) in last  # where ours really is
    assert "Fix: `pip uninstall adapt`" in last


def test_elsewhere_with_a_failing_init_is_explained(tmp_path: Path) -> None:
    root = foreign_adapt(
        tmp_path / "other", "import tensorflow_is_not_installed\n", with_our_core=False
    )
    result = run("import adapt.core", root)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: No module named 'tensorflow_is_not_installed'")
    assert f"imported by {root / 'adapt' / '__init__.py'}" in last
    assert "Fix: `pip uninstall adapt`" in last


def test_same_folder_runs_foreign_init_first_and_warns(tmp_path: Path) -> None:
    root = foreign_adapt(tmp_path / "site", "print('foreign init ran')\n", with_our_core=True)
    result = run("import adapt.core; print('imported', adapt.core.__version__)", root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["foreign init ran", f"imported {adapt.core.__version__}"]
    assert "UserWarning: adapt.core: the package `adapt` at" in result.stderr
    assert "its __init__.py runs before every `import adapt.core`" in result.stderr
    assert "Fix: `pip uninstall adapt`" in result.stderr
    # the warning points at the user's import line, not at adapt's own code
    assert result.stderr.startswith("<string>:2: UserWarning")


def test_same_folder_with_missing_dependency_is_explained(tmp_path: Path) -> None:
    root = foreign_adapt(
        tmp_path / "site", "import tensorflow_is_not_installed\n", with_our_core=True
    )
    result = run("import adapt.core", root)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: No module named 'tensorflow_is_not_installed'")
    assert "runs before every `import adapt.core`" in last
    assert "Fix: `pip uninstall adapt`" in last


@pytest.mark.parametrize("with_our_core", [True, False])
def test_a_subpackage_that_is_really_missing_keeps_pythons_error(
    tmp_path: Path, with_our_core: bool
) -> None:
    root = foreign_adapt(tmp_path / "site", with_our_core=with_our_core)
    result = run("import adapt.no_such_package", root)
    last = result.stderr.strip().splitlines()[-1]
    assert last == "ModuleNotFoundError: No module named 'adapt.no_such_package'"


def test_unrelated_missing_modules_keep_pythons_error(tmp_path: Path) -> None:
    root = foreign_adapt(tmp_path / "site", with_our_core=True)
    result = run("import adapt.core\nimport not_a_module_anywhere", root)
    last = result.stderr.strip().splitlines()[-1]
    assert last == "ModuleNotFoundError: No module named 'not_a_module_anywhere'"


def test_installing_twice_adds_one_finder() -> None:
    import _adapt_peft_core_guard as guard

    guard.install()
    guard.install()
    assert sum(f is guard.ShadowedNamespaceFinder for f in sys.meta_path) == 1
