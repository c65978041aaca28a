"""Sibling dependencies are exact pins on the sibling's current version (lockstep releases).

Every dependency of a package under ``packages/`` on another package under ``packages/`` must be
``NAME==VERSION`` with VERSION the one in that sibling's ``__about__.py``: a released adapt-vera
then resolves to exactly the adapt-peft-core build it was tested with in CI, never to another
release (and never to another project's distribution). Run by ``nox -s lint``; exit 1 on a
mismatch, naming the file and the fix.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
VERSION = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.MULTILINE)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def packages() -> dict[str, tuple[Path, dict]]:
    found = {}
    for pyproject in sorted(ROOT.glob("packages/*/pyproject.toml")):
        with open(pyproject, "rb") as f:
            data = tomllib.load(f)
        found[normalise(data["project"]["name"])] = (pyproject, data)
    return found


def version_of(pyproject: Path, data: dict) -> str:
    about = pyproject.parent / data["tool"]["hatch"]["version"]["path"]
    match = VERSION.search(about.read_text())
    if not match:
        raise SystemExit(f"check_pins: FAIL: no __version__ in {about}")
    return match.group(1)


def main() -> int:
    found = packages()
    versions = {name: version_of(*entry) for name, entry in found.items()}
    problems = []
    for name, (pyproject, data) in found.items():
        if normalise(pyproject.parent.name) != name:
            problems.append(
                f"{pyproject.relative_to(ROOT)}: folder {pyproject.parent.name!r} and "
                f"distribution {name!r} differ: rename one"
            )
        for req in data["project"].get("dependencies", []):
            dep = normalise(re.split(r"[\s\[<>=!~;@(]", req.strip(), maxsplit=1)[0])
            if dep not in versions:
                continue
            wanted = f"{dep}=={versions[dep]}"
            if normalise(req.replace(" ", "")) != normalise(wanted):
                problems.append(
                    f"{pyproject.relative_to(ROOT)}: dependency {req!r} on a sibling must be the "
                    f"exact pin {wanted!r} (lockstep releases)"
                )
    for problem in problems:
        print(f"check_pins: FAIL: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_pins: ok: {', '.join(f'{n} {v}' for n, v in versions.items())}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
