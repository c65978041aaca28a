"""Are our distribution names still free on the public index?

Lists every distribution name declared under ``packages/*/pyproject.toml`` and
``docs/examples/*/pyproject.toml`` and asks the public index for each (``pip index versions``,
with pip's own default index and no local configuration: no find-links, no extra indexes, no
local mirrors). We have published nothing, so a project found under one of our names belongs to
someone else: the name is taken, and a user installing our wheels next to the index could get
theirs (dependency confusion). Exit 1 then.

If the index cannot be reached (a control lookup of ``pip`` itself fails), prints a loud
``NOT CHECKED`` line and exits 0: a network blip must not turn CI red.

Run by ``nox -s names``; ``python tools/check_names.py`` works in any environment with pip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
CONTROL = "pip"  # a project that is certainly on the index
FOUND = re.compile(r"^(?P<name>\S+) \((?P<version>[^)]+)\)", re.MULTILINE)


def declared_names() -> dict[str, Path]:
    """Distribution name → pyproject.toml that declares it."""
    names: dict[str, Path] = {}
    for pattern in ("packages/*/pyproject.toml", "docs/examples/*/pyproject.toml"):
        for pyproject in sorted(ROOT.glob(pattern)):
            with open(pyproject, "rb") as f:
                name = tomllib.load(f).get("project", {}).get("name")
            if name:
                names[re.sub(r"[-_.]+", "-", name).lower()] = pyproject.relative_to(ROOT)
    return names


def public_index_env() -> dict[str, str]:
    """The environment minus every pip setting: pip's default (public) index only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf of any level
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def lookup(name: str) -> tuple[str, str]:
    """('taken', versions) | ('free', '') | ('unknown', why) for one name."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", "--retries", "1", "--timeout", "20"]
    try:
        result = subprocess.run(
            [*cmd, name], capture_output=True, text=True, env=public_index_env(), timeout=120
        )
    except subprocess.TimeoutExpired:
        return "unknown", "timed out"
    output = result.stdout + result.stderr
    if result.returncode == 0 and (match := FOUND.search(result.stdout)):
        return "taken", match.group("version")
    if re.search(r"retrying|connection|resolve|network|timed out|ssl", output, re.IGNORECASE):
        return "unknown", output.strip().splitlines()[-1] if output.strip() else "no answer"
    if "No matching distribution found" in output:
        return "free", ""
    return "unknown", output.strip().splitlines()[-1] if output.strip() else "no answer"


def main() -> int:
    names = declared_names()
    if not names:
        print("check_names: FAIL: no pyproject.toml with a [project] name found", file=sys.stderr)
        return 1
    status, detail = lookup(CONTROL)
    if status != "taken":
        print(
            f"check_names: NOT CHECKED: the public index did not answer ({CONTROL!r}: {detail}); "
            f"{len(names)} names unverified: {', '.join(names)}",
            flush=True,
        )
        return 0
    taken = []
    print(f"{'distribution':<24} {'declared in':<48} public index")
    for name, where in names.items():
        status, detail = lookup(name)
        if status == "taken":
            taken.append(name)
            shown = f"TAKEN by another project (versions {detail})"
        elif status == "free":
            shown = "free (No matching distribution found)"
        else:
            shown = f"NOT CHECKED ({detail})"
        print(f"{name:<24} {where!s:<48} {shown}", flush=True)
    if taken:
        print(
            f"check_names: FAIL: {', '.join(taken)} already exist on the public index. We have "
            "published nothing, so they are someone else's: rename the distribution (folder "
            "and [project] name) to a free name.",
            file=sys.stderr,
        )
        return 1
    print(f"check_names: ok: {len(names)} names free on the public index")
    return 0


if __name__ == "__main__":
    sys.exit(main())
