"""The index's unrelated ``adapt`` project next to our installed wheels: both layouts explained.

Run by ``nox -s wheels`` with the python of a venv that holds our wheels (``pip install
adapt-vera adapt-bnb``). Installs the real ``adapt`` project (a domain-adaptation toolbox with a
regular ``adapt/__init__.py``; ``--no-deps``, so its tensorflow / scikit-learn are missing, as for
most users who get it by mistake) from the public index:

1. into a separate folder on ``PYTHONPATH`` (another sys.path entry): ``import adapt.core`` must
   fail with our explanation and the fix, not a bare ``ModuleNotFoundError``;
2. into the venv itself (the same site-packages as ours): the same;
3. ``pip uninstall -y adapt`` (the fix we print): ``import adapt.core`` works again and our files
   are intact.

If the index cannot be reached, prints ``NOT CHECKED`` and exits 0 (the unit tests in
adapt-peft-core cover both layouts with a stand-in package).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

PY = sys.executable
FIX = "Fix: `pip uninstall adapt`"


def fail(msg: str) -> None:
    print(f"check_shadowing: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "pip", *args], capture_output=True, text=True, timeout=600)


def import_core(env_path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if env_path:
        env["PYTHONPATH"] = env_path
    return subprocess.run(
        [PY, "-c", "import adapt.core; print('adapt.core', adapt.core.__version__)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def expect_explained(result: subprocess.CompletedProcess[str], layout: str) -> None:
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    if result.returncode == 0 or "is another project" not in last or FIX not in last:
        fail(f"{layout}: expected our explanation, got exit {result.returncode}:\n{result.stderr}")
    print(f"{layout}:\n  {last}", flush=True)


def main() -> None:
    before = import_core()
    if before.returncode != 0:
        fail(f"adapt.core does not import before the test:\n{before.stderr}")

    with tempfile.TemporaryDirectory() as elsewhere:
        got = pip("install", "--quiet", "--no-deps", "--target", elsewhere, "adapt")
        if got.returncode != 0:
            print(
                "check_shadowing: NOT CHECKED: the index's `adapt` project could not be "
                f"installed: {got.stderr.strip().splitlines()[-1:]}",
                flush=True,
            )
            return
        if not (Path(elsewhere) / "adapt" / "__init__.py").is_file():
            fail("the index's `adapt` project no longer ships adapt/__init__.py: update this check")
        expect_explained(import_core(elsewhere), "another sys.path entry (PYTHONPATH)")

    got = pip("install", "--quiet", "--no-deps", "adapt")
    if got.returncode != 0:
        fail(f"pip install --no-deps adapt into the venv failed:\n{got.stderr}")
    try:
        expect_explained(import_core(), "the same site-packages")
    finally:
        removed = pip("uninstall", "--yes", "adapt")
    if removed.returncode != 0:
        fail(f"pip uninstall adapt failed:\n{removed.stderr}")
    after = import_core()
    if after.returncode != 0:
        fail(f"after `pip uninstall adapt`, adapt.core does not import:\n{after.stderr}")
    print(f"after `pip uninstall adapt`: {after.stdout.strip()} imports again", flush=True)
    print("check_shadowing: ok")


if __name__ == "__main__":
    main()
